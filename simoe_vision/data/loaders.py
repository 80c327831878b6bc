"""Dataset and DataLoader factories: named datasets, seeded train/val holdout and fixed subsets, loaders."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, get_worker_info

from .fashion_mnist import FashionMNIST
from .folders import RobustImageFolder, check_split_classes, collate_skip_bad, imagefolder_split

__all__ = ['DATASETS', 'SPLITS', 'build_dataset', 'build_loader', 'fixed_subset', 'seed_worker', 'split_train_val']

DATASETS = ('fashion_mnist', 'imagefolder')
SPLITS = ('train', 'val', 'test')


def split_train_val(num_items: int, val_size: int | float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deterministically carve ``val_size`` items (a count, or a fraction in (0, 1)) out of ``num_items``.

    Returns sorted, disjoint ``(train_indices, val_indices)`` covering ``range(num_items)``; the same seed gives
    the same split on every machine (numpy's PCG64 permutation).
    """
    if isinstance(val_size, float):
        if not 0.0 < val_size < 1.0:
            raise ValueError(f'a fractional val_size must be in (0, 1), got {val_size}')
        val_size = round(val_size * num_items)
    if not 0 < val_size < num_items:
        raise ValueError(f'val_size must leave both parts non-empty: got {val_size} of {num_items} items')
    order = np.random.default_rng(seed).permutation(num_items)
    return np.sort(order[val_size:]), np.sort(order[:val_size])


def fixed_subset(dataset: Dataset, n: int, seed: int = 0) -> Subset:
    """A seeded, fixed subset of ``n`` items (sorted indices) for quick evaluations; the whole set if ``n >= len``."""
    if n <= 0:
        raise ValueError(f'subset size must be positive, got {n}')
    total = len(dataset)
    if n >= total:
        return Subset(dataset, list(range(total)))
    indices = np.sort(np.random.default_rng(seed).permutation(total)[:n])
    return Subset(dataset, indices.tolist())


def build_dataset(
        name: str,
        data_dir: Optional[str | Path],
        split: str,
        transform: Optional[Callable[[Any], Any]] = None,
        strict: bool = False,
        *,
        val_size: int | float = 0,
        split_seed: int = 0,
) -> Dataset:
    """Build ``name`` ('fashion_mnist' or 'imagefolder') for ``split`` 'train', 'val' or 'test'.

    With ``val_size > 0``, 'train' is the training set minus a seeded holdout of ``val_size`` items
    (``split_train_val``) and 'val' is that holdout: model selection without touching the test set. With
    ``val_size == 0``, 'train' is the whole training set and 'val' is the dataset's evaluation split.
    'test' is always the evaluation split: Fashion-MNIST's 10000 test images, or ``<data_dir>/val`` for image
    folders, whose train/ and val/ must hold the same class folders (``ClassFoldersMismatchError`` otherwise).
    ``data_dir=None`` for Fashion-MNIST means Debian's ``dataset-fashion-mnist``.
    """
    if name not in DATASETS:
        raise ValueError(f'unknown dataset {name!r}; choose one of {DATASETS}')
    if split not in SPLITS:
        raise ValueError(f'unknown split {split!r}; choose one of {SPLITS}')

    def load(which: str) -> Dataset:  # which: 'train' or the evaluation split
        if name == 'fashion_mnist':
            return FashionMNIST(data_dir, split='train' if which == 'train' else 'test', transform=transform)
        if data_dir is None:
            raise ValueError("the 'imagefolder' dataset needs a data_dir (--data-dir) holding train/ and val/")
        check_split_classes(data_dir)  # before any image is listed: mismatched splits would shift the labels
        return RobustImageFolder(imagefolder_split(data_dir, 'train' if which == 'train' else 'val'),
                                 transform=transform, strict=strict)

    if split == 'test' or (split == 'val' and not val_size):
        return load('eval')
    train = load('train')
    if not val_size:
        return train
    train_idx, val_idx = split_train_val(len(train), val_size, split_seed)
    return Subset(train, (train_idx if split == 'train' else val_idx).tolist())


def _base_dataset(dataset: Dataset) -> Dataset:
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed python, numpy and the dataset's albumentations pipelines per worker.

    ``torch.initial_seed()`` in a worker is the loader's per-epoch base seed + worker id, so every worker and every
    epoch draws different augmentations, reproducibly from the loader's generator. Without the reseed, forked
    workers would share one copied albumentations state and repeat each other's augmentations.
    """
    seed = torch.initial_seed() % 2 ** 32
    random.seed(seed)
    np.random.seed(seed)
    info = get_worker_info()
    transform = getattr(_base_dataset(info.dataset), 'transform', None) if info is not None else None
    if hasattr(transform, 'reseed'):
        transform.reseed(seed)


def build_loader(
        dataset: Dataset,
        batch_size: int,
        train: bool,
        workers: int = 0,
        distributed: bool = False,
        seed: int = 0,
        drop_last: Optional[bool] = None,
        *,
        num_replicas: Optional[int] = None,
        rank: Optional[int] = None,
) -> DataLoader:
    """DataLoader yielding ``(images, targets, num_skipped)`` batches (``collate_skip_bad``).

    ``train`` shuffles (seeded by ``seed``) and by default drops the last incomplete batch; evaluation keeps order
    and every item. ``distributed`` uses a ``DistributedSampler`` (``num_replicas``/``rank`` default to the process
    group's; call ``loader.sampler.set_epoch(epoch)`` each epoch when training). In distributed evaluation the
    sampler pads the last round with repeated items so every rank gets the same count. With ``workers == 0`` the
    dataset's augmentation is seeded from ``seed`` too, so a run is reproducible end to end.
    """
    if batch_size <= 0:
        raise ValueError(f'batch_size must be positive, got {batch_size}')
    if workers < 0:
        raise ValueError(f'workers must be >= 0, got {workers}')
    drop_last = train if drop_last is None else drop_last
    sampler = None
    if distributed:
        sampler = DistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=train, seed=seed,
                                     drop_last=drop_last)
    # Per-rank seed for augmentation (worker base seeds / in-process pipelines): ranks must not share crops.
    aug_seed = seed + (sampler.rank if sampler is not None else 0)
    generator = torch.Generator()
    generator.manual_seed(aug_seed)
    if workers == 0:
        transform = getattr(_base_dataset(dataset), 'transform', None)
        if hasattr(transform, 'reseed'):
            transform.reseed(aug_seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train and sampler is None,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_skip_bad,
        pin_memory=torch.cuda.is_available(),
        drop_last=drop_last,
        worker_init_fn=seed_worker,
        generator=generator,
        persistent_workers=workers > 0,
    )

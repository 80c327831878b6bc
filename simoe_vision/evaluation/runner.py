"""The evaluation suites of ``evaluate.py`` for one loaded model: clean, corruptions (ImageNet-C or generated),
ImageNet-A/R, adversarial and routing, each a thin driver over ``simoe_vision.robustness`` and ``metrics``.

The clean set is held as uint8 arrays (the evaluation split, or a seeded ``--eval-subset`` of it) so that the
generated corruptions, the clean metrics and the clean-vs-corrupted routing comparison all see exactly the same
images through the same transform.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..data import RobustImageFolder, eval_transforms, fixed_subset, imagefolder_split
from ..data.fashion_mnist import FashionMNIST
from ..metrics import RoutingRecorder, routing_agreement
from ..robustness import (
    ALEXNET_ERRORS,
    IMAGENET_CLASSES,
    CorruptedArrayDataset,
    CorruptionCache,
    adversarial_accuracy,
    build_corruptions,
    evaluate_corruptions,
    evaluate_loader,
    imagenet_ar_dataset,
    imagenet_c_dataset,
    imagenet_c_transform,
    imagenet_model_problem,
    mean_corruption_error,
    prepare_images,
    validate_imagenet_c,
)

__all__ = ['CleanSet', 'EvalSettings', 'build_cache', 'imagenet_model_error', 'load_clean_set', 'run_adversarial',
           'run_clean', 'run_corruptions', 'run_imagenet_ar', 'run_imagenet_c', 'subset']


@dataclass
class EvalSettings:
    """What every suite needs besides the model: device, batch size, subset size and seed, progress bars."""

    device: torch.device
    batch_size: int = 128
    workers: int = 0
    eval_subset: Optional[int] = None
    seed: int = 0
    progress: bool = True


@dataclass
class CleanSet:
    """The clean evaluation images (uint8, channels-last or HxW) and their targets."""

    images: np.ndarray
    targets: np.ndarray
    name: str

    def dataset(self, data_config: Dict[str, Any]) -> CorruptedArrayDataset:
        return CorruptedArrayDataset(self.images, self.targets, array_transform(data_config))


def array_transform(data_config: Dict[str, Any]) -> Callable:
    """The eval transform for images already at (or below) the model's size: no crop (``crop_pct=1``)."""
    return eval_transforms({**data_config, 'crop_pct': 1.0})


def subset(dataset: Dataset, settings: EvalSettings) -> Dataset:
    """The seeded ``--eval-subset`` of a dataset (the same indices for every model and cell of the same length)."""
    return fixed_subset(dataset, settings.eval_subset, seed=settings.seed) if settings.eval_subset else dataset


def load_clean_set(data: str, data_dir: Optional[str], image_size: int, settings: EvalSettings) -> CleanSet:
    """Fashion-MNIST's test split or ``<data_dir>/val`` (ImageNet-C preprocessing to ``image_size``) as arrays."""
    if data == 'fashion_mnist':
        full = FashionMNIST(data_dir, split='test')
        indices = np.asarray(subset(full, settings).indices)
        return CleanSet(full.images[indices], full.targets[indices], 'fashion_mnist test')
    if data == 'imagefolder':
        folder = imagefolder_split(data_dir, 'val') if data_dir else None
        if folder is None:
            raise ValueError("--data imagefolder needs --data-dir (a folder holding val/<class>/*)")
        images, targets = prepare_images(subset(RobustImageFolder(folder, strict=True), settings), size=image_size)
        return CleanSet(images, targets, f'{folder}')
    raise ValueError(f"unknown --data {data!r}; choose 'fashion_mnist' or 'imagefolder'")


def _pairs(loader: Iterable) -> Iterator[tuple[Tensor, Tensor]]:
    """(images, targets) from a loader whose batches may carry extra items (``collate_skip_bad``'s count)."""
    for batch in loader:
        yield batch[0], batch[1]


def _loader(dataset: Dataset, settings: EvalSettings) -> DataLoader:
    return DataLoader(dataset, batch_size=settings.batch_size, num_workers=settings.workers)


def run_clean(model: nn.Module, dataset: Dataset, settings: EvalSettings,
              recorder: Optional[RoutingRecorder] = None) -> Dict[str, Any]:
    """Top-1, top-5, NLL, ECE; with a ``recorder``, the routing of the same pass (load, CV, dropped, entropy)."""
    loader = _loader(dataset, settings)
    if recorder is None:
        return evaluate_loader(model, loader, device=settings.device)
    recorder.reset()
    with recorder:
        metrics = evaluate_loader(model, loader, device=settings.device)
    return {**metrics, 'routing': recorder.summary(), 'top1_experts': recorder.top1()}


def build_cache(clean: CleanSet, cache_dir: str, corruptions: Sequence[str], severities: Sequence[int],
                settings: EvalSettings) -> CorruptionCache:
    """Generated corruptions of the clean arrays, cached under ``cache_dir/<set>-<hash>`` (the manifest re-checks
    the source images, so one folder per source set keeps caches of different subsets from evicting each other)."""
    key = hashlib.sha256(np.ascontiguousarray(clean.images).tobytes()).hexdigest()[:12]
    folder = os.path.join(cache_dir, f'{clean.name.split()[0].replace(os.sep, "_")}-{len(clean.images)}-{key}')
    return build_corruptions(clean.images, folder, corruptions, severities, seed=settings.seed,
                             progress=settings.progress)


def run_corruptions(model: nn.Module, make_dataset: Callable[[str, int], Dataset], corruptions: Sequence[str],
                    severities: Sequence[int], settings: EvalSettings,
                    recorder: Optional[RoutingRecorder] = None, clean_top1: Optional[Dict[str, Tensor]] = None,
                    ) -> Dict[str, Any]:
    """Every (corruption, severity) cell, scored unnormalised (``reference=None``; relative CEs come later).

    With a ``recorder`` and the clean pass's top-1 experts, adds ``routing_agreement[c][s][layer]`` (and 'mean'):
    the cells run in ``evaluate_corruptions``' order (corruption-major, unshuffled), so the recording splits into
    one (images, tokens) block per cell, aligned with the clean images.
    """
    kwargs = dict(corruptions=corruptions, severities=severities, reference=None, batch_size=settings.batch_size,
                  num_workers=settings.workers, device=settings.device, progress=settings.progress)
    if recorder is None:
        return evaluate_corruptions(model, make_dataset, **kwargs)
    recorder.reset()
    with recorder:
        result = evaluate_corruptions(model, make_dataset, **kwargs)
    result['routing_agreement'] = agreement_table(clean_top1, recorder.top1(), corruptions, severities)
    return result


def agreement_table(clean: Dict[str, Tensor], corrupted: Dict[str, Tensor], corruptions: Sequence[str],
                    severities: Sequence[int]) -> Dict[str, Dict[int, Dict[str, float]]]:
    """``[c][s][layer]`` share of tokens with the same top-1 expert clean vs corrupted, plus 'mean' over layers.

    ``corrupted[layer]`` stacks the cells corruption-major: (len(corruptions) * len(severities) * images, tokens).
    """
    table: Dict[str, Dict[int, Dict[str, float]]] = {}
    cells = [(c, s) for c in corruptions for s in severities]
    for layer, reference in clean.items():
        blocks = corrupted[layer]
        if blocks.shape[0] != len(cells) * reference.shape[0]:
            raise ValueError(f'{layer}: recorded {blocks.shape[0]} corrupted images for {len(cells)} cells of '
                             f'{reference.shape[0]} clean images')
        for (c, s), block in zip(cells, blocks.split(reference.shape[0]), strict=True):
            table.setdefault(c, {}).setdefault(s, {})[layer] = routing_agreement(reference, block)
    for by_severity in table.values():
        for layers in by_severity.values():
            layers['mean'] = sum(layers.values()) / len(layers)
    return table


def imagenet_model_error(model: nn.Module, data_config: Dict[str, Any], suite: str,
                         name: str = 'the model') -> Optional[str]:
    """Why ``model`` cannot run ImageNet suite ``suite`` ('c', 'a' or 'r'), or None."""
    problem = imagenet_model_problem(getattr(model, 'num_classes', IMAGENET_CLASSES), data_config['input_size'][0])
    if not problem:
        return None
    return f'--suite {suite} needs an ImageNet-1k model (1000 classes, RGB input), but {name} {problem}'


def _require_imagenet_model(model: nn.Module, data_config: Dict[str, Any], suite: str) -> None:
    error = imagenet_model_error(model, data_config, suite)
    if error:
        raise ValueError(error)


def run_imagenet_c(model: nn.Module, root: str, data_config: Dict[str, Any], corruptions: Sequence[str],
                   severities: Sequence[int], settings: EvalSettings) -> Dict[str, Any]:
    """The ImageNet-C folders (checked first: one error lists everything missing), center crop only; CE against
    AlexNet for the 15 standard corruptions among ``corruptions``, unnormalised for the extra ones."""
    _require_imagenet_model(model, data_config, 'c')
    validate_imagenet_c(root, corruptions, severities)
    transform = imagenet_c_transform(data_config)
    result = run_corruptions(model, lambda c, s: subset(imagenet_c_dataset(root, c, s, transform), settings),
                             corruptions, severities, settings)
    standard = [c for c in corruptions if c in ALEXNET_ERRORS]
    if standard:
        result['alexnet'] = mean_corruption_error(result['errors'], ALEXNET_ERRORS, standard, severities)
    return result


def run_imagenet_ar(model: nn.Module, root: str, variant: str, data_config: Dict[str, Any],
                    settings: EvalSettings) -> Dict[str, Any]:
    """ImageNet-A (``'a'``) or -R (``'r'``): the 200-class slice of the model's 1000-way logits."""
    _require_imagenet_model(model, data_config, variant)
    dataset, indices = imagenet_ar_dataset(root, variant, transform=eval_transforms(data_config))
    return evaluate_loader(model, _loader(subset(dataset, settings), settings), device=settings.device,
                           class_indices=indices)


def run_adversarial(model: nn.Module, dataset: Dataset, data_config: Dict[str, Any], attacks: Sequence[str],
                    eps_list: Sequence[float], steps: int, step_size: Optional[float],
                    settings: EvalSettings, autoattack_subset: Optional[int] = None,
                    autoattack_eps: Optional[Sequence[float]] = None) -> list[Dict[str, Any]]:
    """Top-1 under each attack and eps (1/255 units) on the clean set; the random start is seeded. AutoAttack
    (its own step counts: ``steps`` None in the result) attacks only the first ``autoattack_subset`` images, at
    the radii ``autoattack_eps`` (None: all of ``eps_list``)."""
    out = []
    for attack in attacks:
        radii = autoattack_eps if attack == 'autoattack' and autoattack_eps is not None else eps_list
        for eps in radii:
            result = adversarial_accuracy(model, _pairs(_loader(dataset, settings)), data_config['mean'],
                                          data_config['std'], attack=attack, eps=eps, alpha=step_size, steps=steps,
                                          device=settings.device, seed=settings.seed,
                                          max_samples=autoattack_subset if attack == 'autoattack' else None)
            out.append({**result, 'steps': {'pgd': steps, 'fgsm': 1}.get(attack)})
    return out


"""ImageNet-A / ImageNet-R: 200-class subsets scored by slicing a model's 1000-way ImageNet logits.

Class lists come from the files timm ships in ``timm/data/_info``: ``imagenet_synsets.txt`` (the 1000 wnids in
logit order), ``imagenet_{a,r}_synsets.txt`` (each subset's 200 wnids) and ``imagenet_{a,r}_indices.txt`` (the
logit column of each of those wnids). The dataset's targets are positions in the 200-wnid list, so the sliced
logits and the targets share one index space.
"""
from __future__ import annotations

import functools
import importlib.resources
import os
from typing import Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor
from torchvision.datasets import ImageFolder

__all__ = [
    'IMAGENET_AR_VARIANTS', 'IMAGENET_CLASSES', 'WnidImageFolder', 'check_class_folders', 'imagenet_ar_classes',
    'imagenet_ar_dataset', 'imagenet_model_problem', 'imagenet_synsets', 'read_timm_info', 'slice_logits',
]

IMAGENET_AR_VARIANTS = ('a', 'r')
IMAGENET_CLASSES = 1000


@functools.cache
def read_timm_info(filename: str) -> tuple[str, ...]:
    """Non-empty lines of a class-info file shipped with timm (``timm/data/_info/<filename>``)."""
    ref = importlib.resources.files('timm.data') / '_info' / filename
    if not ref.is_file():
        raise FileNotFoundError(f'timm ships no class-info file {filename!r} (looked in {ref}); timm==1.0.31 does')
    return tuple(line.strip() for line in ref.read_text().splitlines() if line.strip())


def imagenet_synsets() -> tuple[str, ...]:
    """The 1000 ImageNet-1k wnids in the order of a timm model's logits."""
    return read_timm_info('imagenet_synsets.txt')


def imagenet_ar_classes(variant: str) -> tuple[tuple[str, ...], Tensor]:
    """(200 wnids, their 1000-way logit indices) for ImageNet-A (``'a'``) or ImageNet-R (``'r'``)."""
    if variant not in IMAGENET_AR_VARIANTS:
        raise ValueError(f'unknown ImageNet variant {variant!r}; choose one of {IMAGENET_AR_VARIANTS}')
    synsets = read_timm_info(f'imagenet_{variant}_synsets.txt')
    indices = torch.tensor([int(i) for i in read_timm_info(f'imagenet_{variant}_indices.txt')], dtype=torch.long)
    if len(synsets) != len(indices):
        raise ValueError(f'timm lists {len(synsets)} ImageNet-{variant.upper()} synsets but {len(indices)} indices')
    return synsets, indices


def imagenet_model_problem(num_classes: int, in_chans: int) -> str:
    """Why a model cannot be scored on ImageNet-C/-A/-R ('has 10 classes', 'takes 1 input channel'), or ''."""
    problems = []
    if num_classes != IMAGENET_CLASSES:
        problems.append(f'has {num_classes} classes')
    if in_chans != 3:
        problems.append(f'takes {in_chans} input channel{"s" if in_chans != 1 else ""}')
    return ' and '.join(problems)


def slice_logits(logits: Tensor, class_indices: Tensor) -> Tensor:
    """Keep the logit columns of a class subset, in the subset's order: (B, 1000) -> (B, len(class_indices))."""
    if class_indices.numel() and int(class_indices.max()) >= logits.shape[-1]:
        raise ValueError(f'the class subset needs logit column {int(class_indices.max())} but the model gives '
                         f'{logits.shape[-1]} logits (ImageNet-A/-R need a {IMAGENET_CLASSES}-class ImageNet model)')
    return logits.index_select(-1, class_indices.to(logits.device))


def check_class_folders(root: str, expected: Sequence[str], allow_missing: bool = False) -> list[str]:
    """Class folder names under ``root``, checked against ``expected``; returns the sorted names found.

    Raises one ``ValueError`` listing every unexpected folder and (unless ``allow_missing``) every missing one.
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f'dataset folder {root!r} does not exist')
    found = sorted(e.name for e in os.scandir(root) if e.is_dir())
    expected_set = set(expected)
    unexpected = [name for name in found if name not in expected_set]
    missing = [] if allow_missing else sorted(expected_set.difference(found))
    if unexpected or missing:
        lines = [f'class folders under {root!r} do not match the {len(expected)} expected wnids:']
        if unexpected:
            lines.append(f'  unexpected ({len(unexpected)}): {", ".join(unexpected)}')
        if missing:
            lines.append(f'  missing ({len(missing)}): {", ".join(missing)}')
        lines.append('  point at the folder whose sub-folders are the wnids (e.g. imagenet-a/, not its parent)')
        raise ValueError('\n'.join(lines))
    if not found:
        raise FileNotFoundError(f'no class folders under {root!r}')
    return found


class WnidImageFolder(ImageFolder):
    """``ImageFolder`` whose targets come from a fixed ``wnid -> index`` map instead of the folders' sorted order.

    With a subset of the classes on disk a plain ``ImageFolder`` renumbers them 0..n-1 and silently misaligns the
    targets with the model's logits; here the index of a class never depends on which other folders exist.
    """

    def __init__(
            self,
            root: str,
            class_to_idx: Mapping[str, int],
            transform: Optional[Callable] = None,
            allow_missing: bool = False,
    ):
        self._fixed_class_to_idx = dict(class_to_idx)
        self._allow_missing = allow_missing
        super().__init__(root, transform=transform)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        found = check_class_folders(directory, list(self._fixed_class_to_idx), allow_missing=self._allow_missing)
        return found, {name: self._fixed_class_to_idx[name] for name in found}


def imagenet_ar_dataset(
        root: str,
        variant: str,
        transform: Optional[Callable] = None,
) -> tuple[WnidImageFolder, Tensor]:
    """ImageNet-A/-R folder dataset (targets 0..199 in timm's synset order) and the logit columns to score with.

    Use with ``evaluate_loader(model, loader, class_indices=indices)``. Every one of the 200 wnid folders must be
    present and no other: a mismatch raises a ``ValueError`` listing the unexpected and missing names.
    """
    synsets, indices = imagenet_ar_classes(variant)
    dataset = WnidImageFolder(root, {wnid: i for i, wnid in enumerate(synsets)}, transform=transform)
    return dataset, indices

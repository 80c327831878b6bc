"""ImageNet-C: folder layout checks, datasets, and the corruption error (CE / mCE) of Hendrycks & Dietterich (2019).

``CE_c = mean_s err(model, c, s) / err_ref(c)`` where the reference error is already averaged over the 5
severities (AlexNet's, below, by default), and ``mCE = 100 * mean_c CE_c`` over the 15 standard corruptions.
Errors are fractions in [0, 1].
"""
from __future__ import annotations

import math
import os
from typing import Callable, Mapping, Optional, Sequence, Union

import torch
from rich.progress import Progress
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from .clean import evaluate_loader
from .imagenet_ar import WnidImageFolder, imagenet_synsets

__all__ = [
    'ALEXNET_ERRORS', 'CORRUPTIONS', 'EXTRA_CORRUPTIONS', 'SEVERITIES', 'corruption_error', 'evaluate_corruptions',
    'imagenet_c_dataset', 'imagenet_c_transform', 'mean_corruption_error', 'validate_imagenet_c',
]

CORRUPTIONS = (
    'gaussian_noise', 'shot_noise', 'impulse_noise',
    'defocus_blur', 'glass_blur', 'motion_blur', 'zoom_blur',
    'snow', 'frost', 'fog', 'brightness',
    'contrast', 'elastic_transform', 'pixelate', 'jpeg_compression',
)
EXTRA_CORRUPTIONS = ('speckle_noise', 'gaussian_blur', 'spatter', 'saturate')
SEVERITIES = (1, 2, 3, 4, 5)

# AlexNet top-1 error per corruption, averaged over the 5 severities (Hendrycks & Dietterich 2019). Keyed by name on
# purpose: pairing a list of numbers with a list of names by position is how one public script got them wrong.
ALEXNET_ERRORS = {
    'gaussian_noise': 0.886428,
    'shot_noise': 0.894468,
    'impulse_noise': 0.922640,
    'defocus_blur': 0.819880,
    'glass_blur': 0.826268,
    'motion_blur': 0.785948,
    'zoom_blur': 0.798360,
    'snow': 0.866816,
    'frost': 0.826572,
    'fog': 0.819324,
    'brightness': 0.564592,
    'contrast': 0.853204,
    'elastic_transform': 0.646056,
    'pixelate': 0.717840,
    'jpeg_compression': 0.606500,
}

ErrorTable = Mapping[str, Mapping[int, float]]


def corruption_error(model_err_by_severity: Union[Sequence[float], Mapping[int, float]], alexnet_err: float) -> float:
    """CE of one corruption: the model's error averaged over severities, divided by the reference's mean error."""
    errs = list(model_err_by_severity.values()) if isinstance(model_err_by_severity, Mapping) \
        else list(model_err_by_severity)
    if not errs:
        raise ValueError('corruption_error needs at least one severity')
    if not alexnet_err > 0:
        raise ValueError(f'the reference error must be positive, got {alexnet_err}')
    return sum(errs) / len(errs) / alexnet_err


def _check_error_table(errors: ErrorTable, corruptions: Sequence[str], severities: Sequence[int], what: str) -> None:
    problems = []
    for c in corruptions:
        if c not in errors:
            problems.append(f'{c}: missing')
            continue
        missing = [s for s in severities if s not in errors[c]]
        if missing:
            problems.append(f'{c}: severities {missing} missing')
        bad = [f'{s}={errors[c][s]}' for s in severities if s in errors[c]
               and not (0.0 <= errors[c][s] <= 1.0 and math.isfinite(errors[c][s]))]
        if bad:
            problems.append(f'{c}: errors must be fractions in [0, 1] (not percentages), got {", ".join(bad)}')
    if problems:
        raise ValueError(f'{what} error table is incomplete or invalid:\n  ' + '\n  '.join(problems))


def mean_corruption_error(
        errors: ErrorTable,
        reference: Union[Mapping[str, float], ErrorTable, None] = ALEXNET_ERRORS,
        corruptions: Sequence[str] = CORRUPTIONS,
        severities: Sequence[int] = SEVERITIES,
) -> dict:
    """Per-corruption CE, mCE and mean corruption accuracy from ``errors[corruption][severity] -> top-1 error``.

    ``reference`` is either per-corruption errors already averaged over severities (AlexNet's, the default) or a
    full results table of another model in the same ``[corruption][severity]`` form (e.g. the softmax-router model,
    where no AlexNet numbers exist: Fashion-MNIST-C, extra corruptions). Against itself every CE is 1 and mCE 100.
    ``reference=None`` gives the unnormalised scores: CE_c = mean error, mCE = 100 * mean error.

    Returns ``{'ce': {c: CE_c}, 'mce': 100 * mean CE, 'mean_error': {c: unnormalised CE = mean error over
    severities}, 'mean_corruption_accuracy': 100 * (1 - mean error over all corruptions and severities)}``.
    """
    corruptions = tuple(corruptions)
    if not corruptions:
        raise ValueError('mean_corruption_error needs at least one corruption')
    _check_error_table(errors, corruptions, severities, 'model')
    if reference is None:
        reference = {c: 1.0 for c in corruptions}
    missing_ref = [c for c in corruptions if c not in reference]
    if missing_ref:
        raise ValueError(f'the reference has no errors for {", ".join(missing_ref)}; pass a reference results table '
                         '(e.g. the softmax-router model) for corruptions without AlexNet numbers')
    ref_mean = {}
    for c in corruptions:
        if isinstance(reference[c], Mapping):
            _check_error_table({c: reference[c]}, (c,), severities, 'reference')
            ref_mean[c] = sum(reference[c][s] for s in severities) / len(severities)
        else:
            ref_mean[c] = float(reference[c])
    mean_error = {c: sum(errors[c][s] for s in severities) / len(severities) for c in corruptions}
    ce = {c: corruption_error([errors[c][s] for s in severities], ref_mean[c]) for c in corruptions}
    return {
        'ce': ce,
        'mce': 100.0 * sum(ce.values()) / len(ce),
        'mean_error': mean_error,
        'mean_corruption_accuracy': 100.0 * (1.0 - sum(mean_error.values()) / len(mean_error)),
    }


def validate_imagenet_c(
        root: str,
        corruptions: Sequence[str] = CORRUPTIONS,
        severities: Sequence[int] = SEVERITIES,
) -> list[str]:
    """Check ``<root>/<corruption>/<severity>/<wnid>/*`` for every pair; returns the wnids (same in every folder).

    Collects every problem (missing corruption or severity folder, a severity folder without wnid folders, wnid
    folders that differ from the first complete one, names that are not ImageNet-1k wnids) and raises ONE
    ``FileNotFoundError`` listing them all, so a partial download is diagnosed in one run.
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f'ImageNet-C root {root!r} does not exist')
    known = set(imagenet_synsets())
    problems: list[str] = []
    reference: Optional[tuple[str, list[str]]] = None
    for c in corruptions:
        if not os.path.isdir(os.path.join(root, c)):
            problems.append(f'{c}/ (the whole corruption)')
            continue
        for s in severities:
            folder = os.path.join(root, c, str(s))
            if not os.path.isdir(folder):
                problems.append(f'{c}/{s}/')
                continue
            wnids = sorted(e.name for e in os.scandir(folder) if e.is_dir())
            if not wnids:
                problems.append(f'{c}/{s}/ has no wnid folders')
                continue
            unknown = [w for w in wnids if w not in known]
            if unknown:
                problems.append(f'{c}/{s}/ has folders that are not ImageNet-1k wnids: {", ".join(unknown[:10])}'
                                + (f' (+{len(unknown) - 10} more)' if len(unknown) > 10 else ''))
            if reference is None:
                reference = (f'{c}/{s}', wnids)
            elif wnids != reference[1]:
                lacking = sorted(set(reference[1]).difference(wnids))
                extra = sorted(set(wnids).difference(reference[1]))
                problems.append(f'{c}/{s}/ class folders differ from {reference[0]}/: '
                                f'missing {lacking[:10]}{"..." if len(lacking) > 10 else ""}, '
                                f'extra {extra[:10]}{"..." if len(extra) > 10 else ""}')
    if problems:
        raise FileNotFoundError(
            f'ImageNet-C at {root!r} is incomplete ({len(problems)} problems); expected '
            f'<root>/<corruption>/<1-5>/<wnid>/*.JPEG:\n  ' + '\n  '.join(problems))
    return reference[1] if reference else []


def imagenet_c_transform(data_config: Mapping) -> Callable:
    """Eval transform for ImageNet-C's pre-cropped 224 px images: center-crop to the model's size, no resize.

    ``data_config`` is timm's ``resolve_data_config(model=model)`` (uses ``input_size``, ``mean``, ``std``).
    """
    size = tuple(data_config['input_size'][-2:])
    return transforms.Compose([
        transforms.CenterCrop(size),
        transforms.ToTensor(),
        transforms.Normalize(mean=data_config['mean'], std=data_config['std']),
    ])


def imagenet_c_dataset(
        root: str,
        corruption: str,
        severity: int,
        transform: Optional[Callable] = None,
) -> WnidImageFolder:
    """One ImageNet-C cell as a folder dataset whose targets are 1000-way ImageNet indices (by wnid, so a subset of
    the classes on disk still lines up with the model's logits)."""
    if corruption not in CORRUPTIONS + EXTRA_CORRUPTIONS:
        raise ValueError(f'unknown corruption {corruption!r}; choose from {CORRUPTIONS + EXTRA_CORRUPTIONS}')
    if severity not in SEVERITIES:
        raise ValueError(f'severity must be one of {SEVERITIES}, got {severity!r}')
    folder = os.path.join(root, corruption, str(severity))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f'ImageNet-C folder {folder!r} does not exist; run validate_imagenet_c({root!r}) '
                                'to list everything missing')
    class_to_idx = {wnid: i for i, wnid in enumerate(imagenet_synsets())}
    return WnidImageFolder(folder, class_to_idx, transform=transform, allow_missing=True)


def evaluate_corruptions(
        model: nn.Module,
        make_dataset: Callable[[str, int], Dataset],
        corruptions: Sequence[str] = CORRUPTIONS,
        severities: Sequence[int] = SEVERITIES,
        reference: Union[Mapping[str, float], ErrorTable, None] = ALEXNET_ERRORS,
        batch_size: int = 64,
        num_workers: int = 0,
        device: Union[torch.device, str] = 'cpu',
        amp_dtype: Optional[torch.dtype] = None,
        progress: bool = True,
) -> dict:
    """Evaluate every (corruption, severity) cell and score the table with ``mean_corruption_error``.

    ``make_dataset(corruption, severity)`` returns the cell's dataset, e.g.
    ``lambda c, s: imagenet_c_dataset(root, c, s, transform)`` (call ``validate_imagenet_c`` first) or
    ``lambda c, s: cache.dataset(c, s, targets, transform)`` for generated corruptions (with ``reference=None``
    or another model's ``errors`` table, as AlexNet numbers only exist for ImageNet).
    Returns ``mean_corruption_error``'s keys plus ``'cells'`` (``[c][s]`` -> clean-metric dict: top1, top5, nll,
    ece) and ``'errors'`` (``[c][s]`` -> top-1 error fraction, reusable as another run's ``reference``).
    """
    cells: dict = {}
    errors: dict = {}
    with Progress(disable=not progress) as bar:
        task = bar.add_task('corruptions', total=len(corruptions) * len(severities))
        for c in corruptions:
            for s in severities:
                bar.update(task, description=f'{c} s{s}')
                loader = DataLoader(make_dataset(c, s), batch_size=batch_size, num_workers=num_workers)
                metrics = evaluate_loader(model, loader, device=device, amp_dtype=amp_dtype)
                cells.setdefault(c, {})[s] = metrics
                errors.setdefault(c, {})[s] = 1.0 - metrics['top1'] / 100.0
                bar.advance(task)
    summary = mean_corruption_error(errors, reference=reference, corruptions=corruptions, severities=severities)
    return {**summary, 'cells': cells, 'errors': errors}

"""Classification metrics from logits: top-1, top-5, negative log-likelihood and expected calibration error.

Accuracies are percentages (timm's convention), NLL is in nats per sample, ECE is a fraction in [0, 1]
(L1 over 15 equal-width confidence bins, torchmetrics' ``MulticlassCalibrationError``).
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassCalibrationError

from .imagenet_ar import slice_logits

__all__ = ['LogitAccumulator', 'evaluate_loader', 'evaluate_logits', 'predict']


class LogitAccumulator:
    """Streams batches of (logits, targets) into running top-1/top-5 counts, summed NLL and the ECE bins.

    Memory stays O(samples) scalars, not O(samples x classes), so a whole validation set can be fed batch by batch.
    """

    def __init__(self, n_bins: int = 15, topk: int = 5):
        self.n_bins = n_bins
        self.topk = topk
        self.num_classes: Optional[int] = None
        self.count = 0
        self.correct1 = 0
        self.correctk = 0
        self.nll_sum = 0.0
        self._ece: Optional[MulticlassCalibrationError] = None

    def update(self, logits: Tensor, targets: Tensor) -> None:
        """Add one batch: ``logits`` (B, C), ``targets`` (B,) integer class indices in [0, C)."""
        if logits.ndim != 2 or targets.ndim != 1 or logits.shape[0] != targets.shape[0]:
            raise ValueError(f'expected logits (B, C) and targets (B,), got {tuple(logits.shape)} and '
                             f'{tuple(targets.shape)}')
        num_classes = logits.shape[1]
        if self.num_classes is None:
            self.num_classes = num_classes
            self._ece = MulticlassCalibrationError(num_classes=num_classes, n_bins=self.n_bins, norm='l1')
        elif num_classes != self.num_classes:
            raise ValueError(f'batch has {num_classes} classes, earlier batches had {self.num_classes}')
        logits = logits.detach().float().cpu()
        targets = targets.detach().long().cpu()
        if targets.numel() and (targets.min() < 0 or targets.max() >= num_classes):
            raise ValueError(f'targets must lie in [0, {num_classes}), got range [{targets.min()}, {targets.max()}]; '
                             'for a class subset slice the logits first (class_indices=...)')
        k = min(self.topk, num_classes)
        top = logits.topk(k, dim=1).indices
        hits = top.eq(targets[:, None])
        self.correct1 += int(hits[:, 0].sum())
        self.correctk += int(hits.any(dim=1).sum())
        log_probs = F.log_softmax(logits, dim=1)
        self.nll_sum += float(-log_probs.gather(1, targets[:, None]).sum())
        self._ece.update(log_probs.exp(), targets)
        self.count += targets.numel()

    def compute(self) -> dict[str, float]:
        """``{'top1', 'top5', 'nll', 'ece', 'num_samples'}`` over everything fed so far."""
        if not self.count:
            raise ValueError('no samples were accumulated: is the dataset or loader empty?')
        return {
            'top1': 100.0 * self.correct1 / self.count,
            'top5': 100.0 * self.correctk / self.count,
            'nll': self.nll_sum / self.count,
            'ece': float(self._ece.compute()),
            'num_samples': self.count,
        }


def evaluate_logits(logits: Tensor, targets: Tensor, n_bins: int = 15) -> dict[str, float]:
    """Top-1 and top-5 accuracy (%; k clipped to the number of classes), NLL (nats) and ECE (fraction, 15 bins)."""
    acc = LogitAccumulator(n_bins=n_bins)
    acc.update(logits, targets)
    return acc.compute()


@torch.no_grad()
def predict(
        model: nn.Module,
        loader: Iterable,
        device: torch.device | str = 'cpu',
        class_indices: Optional[Tensor] = None,
        amp_dtype: Optional[torch.dtype] = None,
) -> Iterable[tuple[Tensor, Tensor]]:
    """Yield (logits, targets) per batch in eval mode; ``class_indices`` slices the logit columns (ImageNet-A/R)."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    try:
        for images, targets in loader:
            images = images.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = model(images)
            if class_indices is not None:
                logits = slice_logits(logits, class_indices)
            yield logits.float(), targets
    finally:
        model.train(was_training)


def evaluate_loader(
        model: nn.Module,
        loader: Iterable,
        device: torch.device | str = 'cpu',
        class_indices: Optional[Tensor] = None,
        amp_dtype: Optional[torch.dtype] = None,
        n_bins: int = 15,
) -> dict[str, float]:
    """Run ``model`` over a loader of (images, targets) and return ``evaluate_logits``' metrics for all of it."""
    acc = LogitAccumulator(n_bins=n_bins)
    for logits, targets in predict(model, loader, device, class_indices=class_indices, amp_dtype=amp_dtype):
        acc.update(logits, targets)
    return acc.compute()

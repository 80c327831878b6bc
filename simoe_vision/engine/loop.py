"""One training epoch, one evaluation pass and one routing probe; metrics are summed over processes."""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn as nn
from torch import Tensor
from torch.utils.data import DataLoader

from ..layers import clip_grad_norm_, expert_parallel_size, reduce_expert_gradients
from ..metrics import RoutingRecorder
from .display import Display
from .distributed import DistEnv, all_reduce_sum, all_reduce_totals

__all__ = ['NonFiniteLossError', 'autocast', 'divergence_hint', 'evaluate', 'forward_loss', 'record_probe',
           'train_one_epoch', 'unwrap']


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the message names the epoch and step."""


def divergence_hint(clip_grad: Optional[float]) -> str:
    """What to change when training diverged: the learning rate, and gradient clipping only if it is off."""
    if clip_grad is None:
        return 'lower --lr (and --warmup-lr), or clip gradients with --clip-grad 1.0'
    return f'lower --lr (and --warmup-lr; gradients were already clipped at {clip_grad:g})'


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if hasattr(model, 'module') else model


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` when ``amp == 'bf16'``, else nothing."""
    if amp == 'bf16':
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _empty_batch(images: Tensor, env: DistEnv, sharded: bool) -> bool:
    """Whether to skip this batch (every image unreadable). With sharded experts each forward is a collective, so
    the processes agree first: one empty batch skips the step everywhere."""
    empty = images.shape[0] == 0
    if sharded:
        empty = bool(all_reduce_sum(torch.tensor([float(empty)]), env).item() > 0)
    return empty


def forward_loss(model: nn.Module, criterion: nn.Module, images: Tensor, targets: Tensor) -> Tensor:
    """The task loss of one batch (the MoE aux losses reach the gradient through the layers themselves)."""
    return criterion(model(images), targets)


def train_one_epoch(
        model: nn.Module,
        loader: DataLoader,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        criterion: nn.Module,
        env: DistEnv,
        display: Display,
        *,
        epoch: int,
        amp: str = 'none',
        clip_grad: Optional[float] = None,
        mixup: Optional[Callable] = None,
        ema: Optional[nn.Module] = None,
        stop_requested: Callable[[], bool] = lambda: False,
) -> Dict[str, Any]:
    """Train one epoch (``epoch`` counts from 0) with per-step lr from ``scheduler.step_update``.

    Returns the mean train loss and aux loss, the routing totals (summed over processes), images, skipped corrupt
    images, and ``interrupted`` (a stop was requested on any process; the epoch ended early). Raises
    NonFiniteLossError, on every process at once, when any process's loss is not finite.
    """
    model.train()
    steps = len(loader)
    sums = torch.zeros(4, dtype=torch.float64)  # loss * n, aux * n, images, skipped
    core = unwrap(model)
    sharded = expert_parallel_size(core) > 1
    interrupted = False
    with RoutingRecorder(core, keep_top1=False) as recorder:
        for step, (images, targets, skipped) in enumerate(display.track(loader, steps, f'train {epoch + 1}')):
            global_step = epoch * steps + step
            scheduler.step_update(global_step)
            sums[3] += skipped
            empty = _empty_batch(images, env, sharded)
            loss = None
            if not empty:
                images = images.to(env.device, non_blocking=True)
                targets = targets.to(env.device, non_blocking=True)
                if mixup is not None:
                    images, targets = mixup(images, targets)
                with autocast(env.device, amp):
                    loss = forward_loss(model, criterion, images, targets)
            # one reduction per step keeps the processes in lockstep: [empty batch, non-finite loss, stop requested]
            flags = torch.tensor([float(empty), float(loss is not None and not torch.isfinite(loss).item()),
                                  float(stop_requested())])
            flags = all_reduce_sum(flags, env)
            if flags[1] > 0:
                value = loss.item() if loss is not None else 'on another process'
                raise NonFiniteLossError(f'non-finite loss ({value}) at epoch {epoch + 1}, step {step + 1} '
                                         f'(global step {global_step + 1}, lr {optimizer.param_groups[0]["lr"]:.2e}); '
                                         f'{divergence_hint(clip_grad)}')
            if flags[0] > 0:  # skip the step on every process
                if flags[2] > 0:
                    interrupted = True
                    break
                continue
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            reduce_expert_gradients(core)  # sharded experts: averaged over their replicas (DDP does the rest)
            if clip_grad is not None:
                clip_grad_norm_(core, clip_grad)
            optimizer.step()
            if ema is not None:
                ema.update(core, step=global_step)
            n = images.shape[0]
            aux = core.aux_loss()
            sums[:3] += torch.tensor([loss.item() * n, (aux.item() if aux is not None else 0.0) * n, n],
                                     dtype=torch.float64)
            display.postfix(f'loss {loss.item():.4f} lr {optimizer.param_groups[0]["lr"]:.2e}')
            if flags[2] > 0:
                interrupted = True
                break
    sums = all_reduce_sum(sums, env)
    images_seen = max(sums[2].item(), 1.0)
    return {'train_loss': sums[0].item() / images_seen, 'aux_loss': sums[1].item() / images_seen,
            'images': int(sums[2].item()), 'skipped': int(sums[3].item()),
            'routing': all_reduce_totals(recorder.totals(), env), 'interrupted': interrupted,
            'lr': optimizer.param_groups[0]['lr']}


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, env: DistEnv, display: Display, *, amp: str = 'none',
             description: str = 'eval', reduce: bool = True) -> Dict[str, float]:
    """Top-1/top-5 accuracy (%) and mean cross-entropy; sums are reduced over processes when ``reduce``."""
    model.eval()
    sharded = expert_parallel_size(unwrap(model)) > 1
    sums = torch.zeros(5, dtype=torch.float64)  # correct1, correct5, loss * n, n, skipped
    for images, targets, skipped in display.track(loader, len(loader), description):
        sums[4] += skipped
        if _empty_batch(images, env, sharded):
            continue
        images = images.to(env.device, non_blocking=True)
        targets = targets.to(env.device, non_blocking=True)
        with autocast(env.device, amp):
            logits = model(images)
        logits = logits.float()
        k = min(5, logits.shape[-1])
        topk = logits.topk(k, dim=-1).indices
        hits = topk == targets[:, None]
        loss = nn.functional.cross_entropy(logits, targets, reduction='sum')
        sums[:4] += torch.tensor([hits[:, 0].sum().item(), hits.any(dim=1).sum().item(), loss.item(),
                                  images.shape[0]], dtype=torch.float64)
    if reduce:
        sums = all_reduce_sum(sums, env)
    n = max(sums[3].item(), 1.0)
    return {'top1': 100.0 * sums[0].item() / n, 'top5': 100.0 * sums[1].item() / n, 'loss': sums[2].item() / n,
            'images': int(sums[3].item()), 'skipped': int(sums[4].item())}


@torch.no_grad()
def record_probe(model: nn.Module, loader: DataLoader, device: torch.device, amp: str = 'none') -> Dict[str, Tensor]:
    """Every probe image's top-1 expert per token at every MoE layer: {layer: (images, tokens)}."""
    model.eval()
    with RoutingRecorder(model) as recorder:
        for images, _, _ in loader:
            if images.shape[0] == 0:
                continue
            with autocast(device, amp):
                model(images.to(device, non_blocking=True))
    return recorder.top1()

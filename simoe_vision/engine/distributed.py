"""Process-group setup for ``torchrun`` (DDP: nccl on GPU, gloo on CPU) and sum-reductions of metrics."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict

import torch
import torch.distributed as dist

__all__ = ['DistEnv', 'all_reduce_sum', 'all_reduce_totals', 'cleanup_distributed', 'init_distributed']


@dataclass(frozen=True)
class DistEnv:
    """Where this process runs: its rank, the number of processes and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistEnv:
    """Join the process group that ``torchrun`` describes in the environment (WORLD_SIZE > 1), else run alone."""
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    rank = int(os.environ.get('RANK', '0'))
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    cuda = torch.cuda.is_available()
    device = torch.device('cuda', local_rank) if cuda else torch.device('cpu')
    if cuda:
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend='nccl' if cuda else 'gloo')
    return DistEnv(rank, world_size, local_rank, device)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum ``tensor`` over all processes (a no-op when running alone); returns a new tensor."""
    out = tensor.detach().clone()
    if env.distributed:
        device = env.device if env.device.type == 'cuda' else torch.device('cpu')
        moved = out.to(device)
        dist.all_reduce(moved)
        out = moved.to(tensor.device)
    return out


def all_reduce_totals(totals: Dict[str, Dict[str, torch.Tensor]], env: DistEnv) -> Dict[str, Dict[str, torch.Tensor]]:
    """Sum a ``RoutingRecorder.totals()`` over processes (every entry is a token-weighted sum or a count)."""
    return {layer: {key: all_reduce_sum(value, env) for key, value in sums.items()}
            for layer, sums in sorted(totals.items())}

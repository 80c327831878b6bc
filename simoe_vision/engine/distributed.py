"""Process-group setup for ``torchrun`` (DDP: nccl on GPU, gloo on CPU) and sum-reductions of metrics."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

__all__ = ['DistEnv', 'all_reduce_sum', 'all_reduce_totals', 'cleanup_distributed', 'init_distributed',
           'is_collective_failure', 'lost_ranks_message', 'unresponsive_ranks']

# how a collective reports a process that died (gloo's transport errors; NCCL's are torch.distributed.DistError)
_PEER_LOST = ('Connection reset by peer', 'Connection closed by peer', 'gloo/transport', 'NCCL')


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


def is_collective_failure(error: BaseException) -> bool:
    """True when ``error`` is a collective operation failing because another process is gone."""
    return isinstance(error, dist.DistError) or (isinstance(error, RuntimeError)
                                                 and any(s in str(error) for s in _PEER_LOST))


def unresponsive_ranks(env: DistEnv, wait_s: float = 2.0) -> Optional[List[int]]:
    """After a failed collective: the ranks that do not check in on the process group's store within ``wait_s``
    (every surviving process checks in), or None when the store itself is unreachable."""
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set(f'simoe_vision/alive/{env.rank}', '1')
        others = [r for r in range(env.world_size) if r != env.rank]
        deadline = time.monotonic() + wait_s
        while True:
            missing = [r for r in others if not store.check([f'simoe_vision/alive/{r}'])]
            if not missing or time.monotonic() > deadline:
                return missing
            time.sleep(0.1)
    except (RuntimeError, ValueError):  # no process group, or the store's host (rank 0 or torchrun) is gone
        return None


def lost_ranks_message(env: DistEnv) -> str:
    """Which process a failed collective lost, as part of one error line."""
    missing = unresponsive_ranks(env)
    if missing is None:
        return 'lost contact with the other processes and their store (rank 0 probably stopped)'
    if not missing:
        return 'a collective operation with the other processes failed, though all of them still respond'
    ranks = ('rank ' if len(missing) == 1 else 'ranks ') + ', '.join(map(str, missing))
    return f'{ranks} stopped responding during training (killed or crashed: see its output or torchrun\'s report)'

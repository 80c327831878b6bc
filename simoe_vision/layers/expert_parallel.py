"""Expert parallelism: every process of an expert-parallel group holds E / EP experts of each MoE layer, and the
routed tokens travel to their expert's process and back with an all-to-all.

Layout, for W = EP x DP processes: the expert-parallel groups are EP consecutive ranks, ``[g EP, (g + 1) EP)``
(under torchrun, the processes of one node: the all-to-all stays on the node's links); rank r holds the experts
``[(r % EP) E / EP, (r % EP + 1) E / EP)`` of every MoE layer. The DP ranks with the same ``r % EP`` hold the same
experts (replicas): expert gradients are averaged over them, every other parameter over all W ranks (DDP).

Routing, capacity and the combine stay on the process that holds the tokens: an image's tokens never leave their
process before routing (the graph routers see whole images) and capacity is decided there, per image or per local
batch, before the exchange. Only the expert MLPs run on the owner.
"""
from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn as nn
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from .experts import Experts

__all__ = ['ExpertParallelLayout', 'ShardedExperts', 'build_experts', 'clip_grad_norm_', 'exclude_from_ddp',
           'expert_parallel_layout', 'expert_parallel_size', 'gather_optimizer_state', 'gather_state_dict',
           'reduce_expert_gradients', 'shard_optimizer_state', 'sharded_experts']


@dataclass(frozen=True, eq=False)
class ExpertParallelLayout:
    """This process's place in the expert-parallel layout (see the module docstring)."""

    size: int  # EP: processes sharing one bank of experts
    rank: int  # position in its expert-parallel group (global rank % EP)
    world_size: int  # W
    group: Any  # the process group of this rank's expert-parallel group
    replicas: Any  # the process group of the ranks holding the same experts; None when DP = 1
    world: Any  # the default process group the layout was built in

    def __deepcopy__(self, memo: Dict[int, Any]) -> ExpertParallelLayout:
        return self  # process groups are shared, never copied (ModelEmaV3 deep-copies the model)

    def local_experts(self, num_experts: int) -> slice:
        """The experts of a bank of ``num_experts`` that this process holds."""
        per = num_experts // self.size
        return slice(self.rank * per, (self.rank + 1) * per)

    def gather_to_first(self, local: Tensor) -> Optional[Tensor]:
        """The whole bank's rows of a per-expert tensor (this process's slice along dim 0) on global rank 0; None
        elsewhere. Collective over the first expert-parallel group; the other groups return None at once."""
        global_rank = dist.get_rank()
        if global_rank >= self.size:
            return None
        local = local.detach().contiguous()
        parts = [torch.empty_like(local) for _ in range(self.size)] if global_rank == 0 else None
        dist.gather(local, parts, dst=0, group=self.group)
        return torch.cat(parts) if parts is not None else None


_LAYOUTS: Dict[int, ExpertParallelLayout] = {}


def expert_parallel_layout(size: int) -> ExpertParallelLayout:
    """The layout for EP = ``size`` in the current process group, its process groups made on first use (a collective:
    every process builds the model together)."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(f'expert_parallel_size={size} needs torch.distributed initialised (torchrun) with a world '
                         f'size divisible by {size}; build the model with expert_parallel_size=1 on one process')
    world_size = dist.get_world_size()
    if world_size % size:
        raise ValueError(f'expert_parallel_size={size} must divide the world size ({world_size} processes)')
    cached = _LAYOUTS.get(size)
    if cached is not None and cached.world is dist.group.WORLD:
        return cached
    rank = dist.get_rank()
    groups = [dist.new_group(list(range(g * size, (g + 1) * size))) for g in range(world_size // size)]
    replicas = None
    if world_size > size:
        replica_groups = [dist.new_group(list(range(j, world_size, size))) for j in range(size)]
        replicas = replica_groups[rank % size]
    layout = ExpertParallelLayout(size, rank % size, world_size, groups[rank // size], replicas, dist.group.WORLD)
    _LAYOUTS[size] = layout
    return layout


def _all_to_all(rows: Tensor, send: List[int], receive: List[int], group: Any) -> Tensor:
    """Autograd-aware variable-size all-to-all: ``send[j]`` rows to group member j, ``receive[i]`` from member i."""
    out = rows.new_empty((sum(receive), *rows.shape[1:]))
    with warnings.catch_warnings():  # its deprecation notice (a FutureWarning per call site) is not for the user
        warnings.simplefilter('ignore', FutureWarning)
        return dist_fn.all_to_all_single(out, rows.contiguous(), receive, send, group=group)


def _expert_major_order(received: Tensor) -> Tensor:
    """The permutation that turns rows received source by source (each source's rows sorted by expert; ``received``
    (sources, local experts) counts them) into rows sorted by expert, source by source within an expert."""
    sources, experts = received.shape
    key = torch.arange(sources, device=received.device)[:, None] + sources * torch.arange(
        experts, device=received.device)[None, :]
    return key.flatten().repeat_interleave(received.flatten()).argsort(stable=True)


class ShardedExperts(Experts):
    """The experts ``layout.local_experts(num_experts)`` of a bank of ``num_experts``, on one process of an
    expert-parallel group. A drop-in for :class:`Experts` whose entry points take the whole bank's rows.

    Parameters keep :class:`Experts`' names with E / EP rows: :func:`gather_state_dict` concatenates the group's
    slices along dim 0 into the single-process state dict, and loading a single-process (whole-bank) state dict keeps
    this process's rows. The bank is drawn whole and then sliced, so the weights (and every later random draw of
    model construction) equal the single-process model's for the same seed.
    """

    def __init__(self, layout: ExpertParallelLayout, num_experts: int, *args: Any, **kwargs: Any) -> None:
        if num_experts % layout.size:
            raise ValueError(f'num_experts={num_experts} is not divisible by expert_parallel_size={layout.size}')
        super().__init__(num_experts, *args, **kwargs)
        self.layout = layout
        self.total_experts = num_experts
        self.local = layout.local_experts(num_experts)
        for name, param in list(self.named_parameters(recurse=False)):
            setattr(self, name, nn.Parameter(param.detach()[self.local].clone()))
        self.num_experts = self.local.stop - self.local.start
        self.register_load_state_dict_pre_hook(ShardedExperts._keep_local_rows)

    def extra_repr(self) -> str:
        return (f'{super().extra_repr()}, experts {self.local.start}..{self.local.stop - 1} of {self.total_experts} '
                f'(expert-parallel rank {self.layout.rank} of {self.layout.size})')

    def sharded_parameters(self) -> Iterator[nn.Parameter]:
        """The per-expert tensors (dim 0: this process's experts); a shared norm layer is not among them."""
        return self.parameters(recurse=False)

    def _keep_local_rows(self, state_dict: Dict[str, Tensor], prefix: str, *args: Any) -> None:
        for name, _ in self.named_parameters(recurse=False):
            value = state_dict.get(prefix + name)
            if value is not None and value.shape[0] == self.total_experts:
                state_dict[prefix + name] = value[self.local]

    def forward(self, x: Tensor) -> Tensor:
        """x (E, M, in) buffers of the whole bank -> (E, M, out), each buffer run by its expert's process."""
        experts, slots, _ = x.shape
        return self.forward_grouped(x.reshape(experts * slots, -1), [slots] * experts).view(experts, slots, -1)

    def forward_grouped(self, x: Tensor, counts: Sequence[int]) -> Tensor:
        """x (M, in) sorted by expert over the whole bank (``counts``: E entries) -> (M, out).

        The rows go to their experts' processes (counts first, then the rows), run there sorted by expert, and come
        back in their original order; gradients take the same way back.
        """
        if len(counts) != self.total_experts or sum(counts) != x.shape[0]:
            raise ValueError(f'counts must give the rows of each of the {self.total_experts} experts and sum to '
                             f'{x.shape[0]}; got {list(counts)}')
        group = self.layout.group
        counts_t = torch.tensor(list(counts), dtype=torch.long, device=x.device)
        received = torch.empty_like(counts_t)
        dist.all_to_all_single(received, counts_t, group=group)  # equal splits: E / EP counts per process
        received = received.view(self.layout.size, self.num_experts)
        send, receive = counts_t.view(self.layout.size, -1).sum(1).tolist(), received.sum(1).tolist()
        rows = _all_to_all(x, send, receive, group)
        order = _expert_major_order(received)
        out = super().forward_grouped(rows[order], received.sum(0).tolist())
        return _all_to_all(out[order.argsort()], receive, send, group)


def build_experts(expert_parallel_size: int, num_experts: int, *args: Any, **kwargs: Any) -> Experts:
    """:class:`Experts` (``expert_parallel_size`` 1) or this process's :class:`ShardedExperts` of the bank."""
    if expert_parallel_size == 1:
        return Experts(num_experts, *args, **kwargs)
    return ShardedExperts(expert_parallel_layout(expert_parallel_size), num_experts, *args, **kwargs)


def sharded_experts(model: nn.Module) -> List[Tuple[str, ShardedExperts]]:
    """Every :class:`ShardedExperts` of ``model`` as (qualified name, module)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, ShardedExperts)]


def expert_parallel_size(model: nn.Module) -> int:
    """EP of ``model``'s experts (1 when every process holds all of them)."""
    banks = sharded_experts(model)
    return banks[0][1].layout.size if banks else 1


def _sharded_keys(model: nn.Module) -> List[Tuple[str, ShardedExperts]]:
    """(state-dict key, bank) of every per-expert tensor of ``model``."""
    return [(f'{name}.{p}' if name else p, bank) for name, bank in sharded_experts(model)
            for p, _ in bank.named_parameters(recurse=False)]


def exclude_from_ddp(model: nn.Module) -> None:
    """Keep DistributedDataParallel (wrapped around ``model`` after this call) off the per-expert tensors:
    :func:`reduce_expert_gradients` averages them over their replicas instead."""
    names = [key for key, _ in _sharded_keys(model)]
    if names:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)


def reduce_expert_gradients(model: nn.Module) -> None:
    """Average the per-expert gradients the way DDP averages the rest: summed over the replicas of the experts, then
    divided by W (each process's expert gradient already sums its expert-parallel group's tokens). Call after
    ``backward`` and before clipping; a no-op without sharded experts."""
    banks = [bank for _, bank in sharded_experts(model)]
    if not banks:
        return
    params = [p for bank in banks for p in bank.sharded_parameters()]
    for p in params:
        if p.grad is None:  # every process must reduce the same tensors
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    layout = banks[0].layout
    if layout.replicas is not None:
        dist.all_reduce(flat, group=layout.replicas)
    flat /= layout.world_size
    for p, g in zip(params, flat.split([p.numel() for p in params]), strict=True):
        p.grad.copy_(g.view_as(p.grad))


def clip_grad_norm_(model: nn.Module, max_norm: float) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over all of ``model``'s parameters, the experts on the other processes of
    its expert-parallel group included; returns the total norm."""
    banks = [bank for _, bank in sharded_experts(model)]
    if not banks:
        return nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    sharded = {id(p) for bank in banks for p in bank.sharded_parameters()}
    params = [p for p in model.parameters() if p.grad is not None]
    dense = nn.utils.get_total_norm([p.grad for p in params if id(p) not in sharded])
    experts = nn.utils.get_total_norm([p.grad for p in params if id(p) in sharded]).square()
    dist.all_reduce(experts, group=banks[0].layout.group)
    total = (dense.square() + experts).sqrt()
    nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


def gather_state_dict(model: nn.Module) -> Optional[Dict[str, Tensor]]:
    """``model``'s single-process state dict: with sharded experts, gathered on global rank 0 (a collective; the
    other processes get None); otherwise ``model.state_dict()`` on every process."""
    state = model.state_dict()
    keys = _sharded_keys(model)
    for key, bank in keys:
        state[key] = bank.layout.gather_to_first(state[key])
    return None if keys and dist.get_rank() != 0 else state


def _sharded_state_indices(optimizer: torch.optim.Optimizer, model: nn.Module) -> Dict[int, ShardedExperts]:
    """{index of a per-expert tensor in ``optimizer.state_dict()``: its bank}."""
    owner = {id(p): bank for _, bank in sharded_experts(model) for p in bank.sharded_parameters()}
    params = itertools.chain.from_iterable(group['params'] for group in optimizer.param_groups)
    return {index: owner[id(p)] for index, p in enumerate(params) if id(p) in owner}


def _is_per_expert(value: Any, rows: int) -> bool:
    return isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == rows


def gather_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module) -> Optional[Dict[str, Any]]:
    """``optimizer.state_dict()`` as one process holding every expert would have it (a per-expert state tensor,
    e.g. AdamW's moments, gathered along dim 0): on global rank 0 with sharded experts (None on the others), on
    every process otherwise. A collective like :func:`gather_state_dict`."""
    state = optimizer.state_dict()
    indices = _sharded_state_indices(optimizer, model)
    if not indices:
        return state
    per_param = dict(state['state'])
    for index, bank in sorted(indices.items()):
        entry = per_param.get(index, {})
        per_param[index] = {key: bank.layout.gather_to_first(value) if _is_per_expert(value, bank.num_experts)
                            else value for key, value in entry.items()}
    return {**state, 'state': per_param} if dist.get_rank() == 0 else None


def shard_optimizer_state(state: Dict[str, Any], optimizer: torch.optim.Optimizer,
                          model: nn.Module) -> Dict[str, Any]:
    """A single-process optimizer state (:func:`gather_optimizer_state`) cut to this process's experts, for
    ``optimizer.load_state_dict``; unchanged without sharded experts."""
    indices = _sharded_state_indices(optimizer, model)
    if not indices:
        return state
    per_param = dict(state['state'])
    for index, bank in indices.items():
        per_param[index] = {key: value[bank.local] if _is_per_expert(value, bank.total_experts) else value
                            for key, value in per_param.get(index, {}).items()}
    return {**state, 'state': per_param}

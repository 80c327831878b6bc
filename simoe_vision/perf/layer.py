"""The MoE-layer benchmark: our :class:`~simoe_vision.layers.MoeMlp` against timm's dense ``Mlp`` (the compute
floor: a top-k layer should cost about k times it) and a naive per-expert loop, at the performance issue's shapes,
in fp32, under bf16 autocast and with bf16 weights; ``peers`` adds the installed peer layers (:mod:`.peers`).

A train step is forward + backward of the layer alone (``out.backward(grad)``; the aux loss rides it for ours).
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Dict, Iterator, List, Sequence, Tuple

import torch
import torch.nn as nn
from timm.layers import Mlp
from torch import Tensor

from ..layers import MoeMlp
from ..routers import create_router
from .peers import PEER_NAMES, PeerUnavailable, build_peer
from .timing import count_flops, interleaved_rounds, medians

__all__ = ['LAYER_SHAPES', 'PRECISIONS', 'LayerShape', 'NaiveLoopMoe', 'run_layer_suite']

PRECISIONS = ('fp32', 'bf16', 'bf16w')  # fp32; bf16 autocast over fp32 weights; bf16 weights and inputs


@dataclass(frozen=True)
class LayerShape:
    batch: int
    tokens: int
    dim: int
    hidden: int
    experts: int

    def __str__(self) -> str:
        return f'{self.batch}x{self.tokens}x{self.dim}, h {self.hidden}, E {self.experts}'


# The performance issue's shapes: ViT-S/16 at 197 tokens, the 65-token nano, and 32 experts.
LAYER_SHAPES = (LayerShape(32, 197, 384, 1536, 8), LayerShape(128, 65, 192, 768, 8), LayerShape(16, 197, 384, 1536, 32))


class NaiveLoopMoe(nn.Module):
    """What a user writes first: our softmax router, then for each expert a timm ``Mlp`` on the tokens that chose
    it (``nonzero`` per expert, no capacity: every top-k pair), weighted and added back."""

    def __init__(self, dim: int, hidden: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.router = create_router('softmax', dim, num_experts, top_k=top_k)
        self.experts = nn.ModuleList(Mlp(dim, hidden) for _ in range(num_experts))

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])
        routing = self.router(x)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token, choice = (routing.indices == e).nonzero(as_tuple=True)
            weight = routing.weights[token, choice].unsqueeze(-1).to(flat.dtype)
            out = out.index_add(0, token, expert(flat[token]) * weight)
        return out.reshape(x.shape)


def _variants(shape: LayerShape, top_k: int, capacity_factor: float, peers: Sequence[str]
              ) -> Iterator[Tuple[str, Callable[[], nn.Module]]]:
    d, h, e = shape.dim, shape.hidden, shape.experts
    yield 'dense_mlp', lambda: Mlp(d, h)
    yield 'ours', lambda: MoeMlp(d, h, num_experts=e, top_k=top_k, capacity_factor=capacity_factor)
    yield 'ours_dropless', lambda: MoeMlp(d, h, num_experts=e, top_k=top_k, capacity_factor='dropless')
    yield 'naive_loop', lambda: NaiveLoopMoe(d, h, e, top_k)
    for peer in peers:
        for mode, cf in (('', capacity_factor), ('_dropless', None)):
            yield f'{peer}{mode}', lambda peer=peer, cf=cf: build_peer(peer, d, h, e, top_k, cf)


def _train_step(layer: nn.Module, shape: LayerShape, precision: str) -> Callable[[], None]:
    g = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if precision == 'bf16w' else torch.float32
    x = torch.randn(shape.batch, shape.tokens, shape.dim, generator=g).to(dtype).requires_grad_()
    grad = torch.randn(shape.batch, shape.tokens, shape.dim, generator=g).to(dtype)
    layer = (copy.deepcopy(layer).to(dtype) if dtype != torch.float32 else layer).train()  # keep fp32 master
    autocast = (partial(torch.autocast, 'cpu', dtype=torch.bfloat16) if precision == 'bf16' else contextlib.nullcontext)

    def step() -> None:
        layer.zero_grad(set_to_none=True)
        with autocast():
            out = layer(x)
        out.backward(grad.to(out.dtype))

    return step


def run_layer_suite(shapes: Sequence[LayerShape], precisions: Sequence[str], rounds: int, warmup: int,
                    top_k: int = 2, capacity_factor: float = 1.25, peers: Sequence[str] = (),
                    log: Callable[[str], None] = print) -> List[Dict[str, Any]]:
    """One row per shape x precision x variant: step time (median; ``round_ms``: every round's), FLOPs (fp32 train
    step), time and FLOPs vs dense.

    Variants of one shape and precision run interleaved. A peer that is not installed, or does not do a mode, is
    logged once and left out (its row says why).
    """
    rows: List[Dict[str, Any]] = []
    for shape in shapes:
        builders, skipped = {}, {}
        for name, build in _variants(shape, top_k, capacity_factor, [p for p in peers if p in PEER_NAMES]):
            torch.manual_seed(0)
            try:
                builders[name] = build()
            except (PeerUnavailable, ValueError) as exc:
                skipped[name] = str(exc).splitlines()[0]
                log(f'layer suite, {shape}: {name} left out: {skipped[name]}')
        flops = {name: count_flops(_train_step(layer, shape, 'fp32')) for name, layer in builders.items()}
        for precision in precisions:
            steps = {name: _train_step(layer, shape, precision) for name, layer in builders.items()}
            times = interleaved_rounds(steps, rounds, warmup)
            seconds = medians(times)
            for name in builders:
                rows.append(dict(suite='layer', variant=name, shape=str(shape), precision=precision,
                                 step_ms=seconds[name] * 1e3, round_ms=[t * 1e3 for t in times[name]],
                                 gflops=flops[name] / 1e9,
                                 flops_vs_dense=flops[name] / flops['dense_mlp'],
                                 time_vs_dense=seconds[name] / seconds['dense_mlp'],
                                 time_vs_ours=seconds[name] / seconds['ours']))
            rows += [dict(suite='layer', variant=name, shape=str(shape), precision=precision, note=why)
                     for name, why in skipped.items()]
    return rows

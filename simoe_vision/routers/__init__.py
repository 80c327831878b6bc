"""Routers for sparse MoE layers: softmax (V-MoE), similarity-aware and attention-aware (graph of tokens)."""
from __future__ import annotations

import inspect
from typing import Dict, Type

from .graph import TokenGraph, TokenLayout, similarity_graph
from .losses import cv_squared, importance_loss, load_loss, switch_balance_loss, z_loss
from .router import AttentionRouter, GraphRouter, Router, RoutingOutput, SimilarityRouter, SoftmaxRouter, select_top_k

ROUTERS: Dict[str, Type[Router]] = {
    'softmax': SoftmaxRouter,
    'similarity': SimilarityRouter,
    'attention': AttentionRouter,
}


def router_kwarg_names(name: str) -> list[str]:
    """The keyword arguments router ``name`` accepts (besides dim and num_experts)."""
    names: list[str] = []
    for cls in ROUTERS[name].__mro__:
        if issubclass(cls, Router):
            for p in inspect.signature(cls.__init__).parameters.values():
                if p.name not in ('self', 'dim', 'num_experts', 'kwargs') and p.name not in names:
                    names.append(p.name)
    return names


def create_router(name: str, dim: int, num_experts: int, **kwargs) -> Router:
    """Build router ``name`` ('softmax' | 'similarity' | 'attention'); unknown names or keywords raise ValueError."""
    if name not in ROUTERS:
        raise ValueError(f'unknown router {name!r}; valid routers: {", ".join(ROUTERS)}')
    valid = router_kwarg_names(name)
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(f'router {name!r} got unknown keyword(s) {", ".join(unknown)}; valid: {", ".join(valid)}')
    return ROUTERS[name](dim, num_experts, **kwargs)


__all__ = ['ROUTERS', 'create_router', 'router_kwarg_names', 'Router', 'SoftmaxRouter', 'GraphRouter',
           'SimilarityRouter', 'AttentionRouter', 'RoutingOutput', 'TokenGraph', 'TokenLayout', 'select_top_k',
           'similarity_graph', 'cv_squared', 'importance_loss', 'load_loss', 'switch_balance_loss', 'z_loss']

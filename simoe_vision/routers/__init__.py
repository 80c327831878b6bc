"""Routers for sparse MoE layers: softmax (V-MoE), similarity-aware and attention-aware (graph of tokens).

Routers are registered by name (:func:`register_router`); :data:`ROUTERS` maps names to classes.
"""
from __future__ import annotations

from .graph import TokenGraph, TokenLayout, similarity_graph
from .losses import cv_squared, expert_counts, importance_loss, load_loss, switch_balance_loss, z_loss
from .registry import ROUTERS, check_router_name, create_router, register_router, router_graph, router_kwarg_names
from .router import (
    GRAPH_SOURCES,
    AttentionRouter,
    GraphRouter,
    Router,
    RoutingOutput,
    SimilarityRouter,
    SoftmaxRouter,
    select_top_k,
)

register_router('softmax')(SoftmaxRouter)
register_router('similarity')(SimilarityRouter)
register_router('attention')(AttentionRouter)

__all__ = ['ROUTERS', 'GRAPH_SOURCES', 'register_router', 'create_router', 'check_router_name', 'router_graph',
           'router_kwarg_names', 'Router', 'SoftmaxRouter', 'GraphRouter', 'SimilarityRouter', 'AttentionRouter',
           'RoutingOutput', 'TokenGraph', 'TokenLayout', 'select_top_k', 'similarity_graph', 'expert_counts',
           'cv_squared', 'importance_loss', 'load_loss', 'switch_balance_loss', 'z_loss']

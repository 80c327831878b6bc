"""Routing diagnostics as pure functions of the gate G and the routing distribution P (both (T, E), clean).

They say what the graph does to each token's choice: whether P is sharper or flatter than the token's own gate
(entropy; the graph-routing papers' theorem says propagation lowers it), how decided P is (top-1 margin), and how
often the graph overrules the token (top-1 under P differs from top-1 under G).
"""
from __future__ import annotations

from typing import Dict

from torch import Tensor

__all__ = ['DIAGNOSTICS', 'entropy', 'top1_margin', 'top1_flip_share', 'routing_diagnostics']

# The per-token means a router reports: names in the router stats, the recorder and the metrics rows.
DIAGNOSTICS = ('gate_entropy', 'entropy', 'margin', 'flip')


def entropy(probs: Tensor) -> Tensor:
    """Mean over tokens of the entropy (nats) of each row of ``probs`` (T, E); ``0 log 0 = 0``."""
    return -(probs * probs.clamp_min(1e-12).log()).sum(dim=-1).mean()


def top1_margin(probs: Tensor) -> Tensor:
    """Mean over tokens of ``p1 - p2``, the gap between the two largest probabilities of a row (E >= 2)."""
    top2 = probs.topk(2, dim=-1).values
    return (top2[:, 0] - top2[:, 1]).mean()


def top1_flip_share(gates: Tensor, probs: Tensor) -> Tensor:
    """Share of tokens whose top-1 expert under ``probs`` differs from that under ``gates``."""
    return (gates.argmax(dim=-1) != probs.argmax(dim=-1)).float().mean()


def routing_diagnostics(gates: Tensor, probs: Tensor) -> Dict[str, Tensor]:
    """{gate_entropy: H(G), entropy: H(P), margin: p1 - p2 of P, flip: share top1(P) != top1(G)}, scalars.

    With E = 1 the margin is 1 (a single expert is fully decided).
    """
    margin = top1_margin(probs) if probs.shape[-1] > 1 else probs.new_ones(())
    return {'gate_entropy': entropy(gates), 'entropy': entropy(probs), 'margin': margin,
            'flip': top1_flip_share(gates, probs)}

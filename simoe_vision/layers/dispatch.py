"""Capacity-limited assignment of routed tokens to expert buffer slots (pure functions)."""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ['expert_capacity', 'assign_slots', 'buffer_rows', 'row_sources']


def expert_capacity(group_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Per-expert slots for a group of T tokens: ``ceil(k * T * capacity_factor / E)`` (at least 1)."""
    if capacity_factor <= 0:
        raise ValueError(f'capacity_factor must be > 0, got {capacity_factor!r}')
    return max(1, math.ceil(top_k * group_tokens * capacity_factor / num_experts))


def assign_slots(
        indices: Tensor,
        num_experts: int,
        capacity: int | None,
        priority: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Slot of every (token, choice) in its expert's buffer, per group, and whether it fits.

    ``indices`` (G, T, k) are the chosen experts. Every token's first choice claims a slot before any second choice
    (V-MoE's order); within one choice rank tokens go in sequence order or, with ``priority`` (G, T) (Batch Prioritized
    Routing), in descending priority. A (token, choice) is kept when its slot is below ``capacity`` (``None``:
    dropless, all kept). Returns ``(positions, keep)``, both (G, T, k).
    """
    groups, tokens, k = indices.shape
    order = None
    if priority is not None:
        order = priority.argsort(dim=1, descending=True, stable=True).unsqueeze(-1).expand(-1, -1, k)
        indices = indices.gather(1, order)
    # one-hot by comparison: F.one_hot would first scan the indices for their min and max (a validation pass)
    flat = indices.transpose(1, 2).reshape(groups, k * tokens, 1)
    one_hot = (flat == torch.arange(num_experts, device=indices.device)).to(torch.int32)
    positions = ((one_hot.cumsum(dim=1) - 1) * one_hot).sum(dim=-1, dtype=torch.long)
    positions = positions.reshape(groups, k, tokens).transpose(1, 2)
    if order is not None:
        positions = torch.empty_like(positions).scatter_(1, order, positions)
    keep = torch.ones_like(positions, dtype=torch.bool) if capacity is None else positions < capacity
    return positions, keep


def buffer_rows(
        indices: Tensor,
        num_experts: int,
        capacity: int,
        priority: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Row of every (token, choice) in its expert's buffer of G * capacity rows, and whether it fits.

    Group g's tokens take rows ``[g C, (g + 1) C)``, in :func:`assign_slots`'s order (so the same pairs are kept as by
    the sorted dispatch). Rows of dropped pairs are meaningless: mask them with ``keep``. Returns ``(rows, keep)``,
    both (G, T, k).
    """
    positions, keep = assign_slots(indices, num_experts, capacity, priority)
    group = torch.arange(indices.shape[0], device=indices.device).view(-1, 1, 1)
    return group * capacity + positions, keep


def row_sources(experts: Tensor, rows: Tensor, keep: Tensor, num_experts: int, num_rows: int) -> Tensor:
    """The inverse of :func:`buffer_rows`: (E, num_rows), for every buffer row the row of the tokens with a zero row
    put first, ``[0; x]``, that fills it: ``1 + t`` for token t, 0 for an empty row. ``experts`` (the chosen experts),
    ``rows`` and ``keep`` are (T, k); the buffers are then one gather, of static shape.

    Each dropped pair writes to a spare column of its own, so no two writes share an index (scatter with duplicate
    indices has no defined result, in ONNX either).
    """
    tokens, k = rows.shape
    token = torch.arange(1, tokens + 1, device=rows.device).unsqueeze(1).expand(-1, k)
    spare = num_rows + torch.arange(tokens * k, device=rows.device).view(tokens, k)
    sources = rows.new_zeros(num_experts, num_rows + tokens * k)
    return sources.index_put((experts, torch.where(keep, rows, spare)), token)[:, :num_rows]

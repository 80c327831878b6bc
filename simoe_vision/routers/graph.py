"""Token graphs and graph propagation: the step that turns per-token gates into graph-aware routing.

A token graph ``A`` is row-stochastic over the tokens of one group (an image, or a window of one). It is held either
densely (``probs``) or implicitly as ``softmax(q k^T * scale + bias)`` over heads (``q``/``k``). Propagating values
``V`` (tokens x E) through it means ``mean_heads(A_h V)``; from q/k this is exactly
``scaled_dot_product_attention(q, k, V)`` averaged over heads, so the N x N matrix is never materialised.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..tracing import is_exporting

__all__ = ['TokenGraph', 'TokenLayout', 'similarity_graph', 'DENSE_GRAPH_MAX_ENTRIES']

# Up to this many graph entries (B' * H * N'^2: 32 MiB in fp32) fused propagation runs the explicit matmul instead:
# the flash kernel needs v padded to the q/k head dim, so its A @ V costs N^2 d instead of N^2 E. Measured, router
# propagation forward + backward, 1 CPU thread, d = 192, E = 8: B=32, N=197: 72 ms flash vs 59 ms explicit;
# B=5, N=785: 155 vs 131 ms; B=1, N=3137 (9.8M entries): 372 vs 468 ms, and the explicit path needs ~0.4 GiB more.
DENSE_GRAPH_MAX_ENTRIES = 1 << 23


@dataclass(frozen=True)
class TokenLayout:
    """How the tokens the MLP sees, (B, N, C), map onto the groups a graph is defined over, (B', N', C).

    Swin's (shifted) windows are the main use: ``partition`` rolls and splits the map into windows, ``merge`` undoes it.
    The identity layout (both ``None``) means one graph per image over all its tokens. ``mask`` (additive,
    broadcastable to (B', 1, N', N')) removes edges inside a group, e.g. Swin's shift mask between wrapped-around
    regions; graphs built from the tokens (similarity) apply it.
    """

    partition: Callable[[Tensor], Tensor] | None = None
    merge: Callable[[Tensor], Tensor] | None = None
    mask: Tensor | None = None

    def to_groups(self, x: Tensor) -> Tensor:
        return x if self.partition is None else self.partition(x)

    def from_groups(self, x: Tensor) -> Tensor:
        return x if self.merge is None else self.merge(x)


@dataclass(frozen=True)
class TokenGraph:
    """A row-stochastic token graph, dense or implicit, in the coordinates of ``layout``.

    Dense: ``probs`` of shape (B', H, N', N') or (B', N', N'). Implicit: ``q``/``k`` of shape (B', H, N', D) with
    ``scale`` and an optional additive ``bias`` broadcastable to (B', H, N', N') (relative-position bias, shift mask).
    """

    probs: Tensor | None = None
    q: Tensor | None = None
    k: Tensor | None = None
    scale: float = 1.0
    bias: Tensor | None = None
    layout: TokenLayout = TokenLayout()

    def __post_init__(self) -> None:
        if (self.probs is None) == (self.q is None or self.k is None):
            raise ValueError('TokenGraph needs either probs, or both q and k (not both forms).')
        if self.probs is not None and self.probs.dim() not in (3, 4):
            raise ValueError(
                f'graph probs must be (B, H, N, N) or (B, N, N); got shape {tuple(self.probs.shape)}')
        if self.q is not None and (self.q.dim() != 4 or self.k.dim() != 4):
            raise ValueError(
                f'graph q/k must be (B, H, N, D); got {tuple(self.q.shape)} and {tuple(self.k.shape)}')

    @property
    def num_nodes(self) -> int:
        return (self.probs if self.probs is not None else self.q).shape[-2]

    def detach(self) -> TokenGraph:
        def d(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach()

        return TokenGraph(d(self.probs), d(self.q), d(self.k), self.scale, d(self.bias), self.layout)

    def with_temperature(self, temperature: float) -> TokenGraph:
        """The graph with its logits divided by ``temperature`` (< 1 sharpens, > 1 flattens, 1 is this graph).

        Implicit: ``softmax((q k^T scale + bias) / T)``, i.e. scale and bias divided by T. Dense: each head's rows
        become ``softmax(log A / T)``, i.e. ``A^(1/T)`` renormalised (the same graph when A came from those logits).
        """
        if not temperature > 0:
            raise ValueError(f'graph temperature must be > 0, got {temperature!r}')
        if temperature == 1.0:
            return self
        if self.probs is not None:
            probs = (self.probs.float().clamp_min(torch.finfo(torch.float32).tiny).log() / temperature).softmax(-1)
            return TokenGraph(probs=probs, layout=self.layout)
        bias = None if self.bias is None else self.bias / temperature
        return TokenGraph(q=self.q, k=self.k, scale=self.scale / temperature, bias=bias, layout=self.layout)

    def dense(self) -> Tensor:
        """Head-averaged adjacency, (B', N', N'), fp32. Materialises N x N: for tests and small graphs."""
        if self.probs is not None:
            p = self.probs.float()
        else:
            logits = torch.einsum('bhnd,bhmd->bhnm', self.q.float(), self.k.float()) * self.scale
            if self.bias is not None:
                logits = logits + self.bias.float()
            p = logits.softmax(dim=-1)
        return p.mean(dim=1) if p.dim() == 4 else p

    def propagate(self, values: Tensor, fused: bool = True) -> Tensor:
        """``A V`` for values (B, N, E) in the MLP's token order; returns the same shape, fp32.

        ``fused`` uses scaled_dot_product_attention on q/k (O(N E) memory) once the graph is large (more than
        ``DENSE_GRAPH_MAX_ENTRIES`` entries B' H N'^2); smaller graphs, and dense ones, use an explicit matmul. So do
        exported graphs: the size test would guard their symbolic batch size (and a trace would freeze it).
        """
        v = self.layout.to_groups(values.float())
        if v.shape[-2] != self.num_nodes:
            raise ValueError(
                f'graph has {self.num_nodes} nodes per group but the tokens give groups of {v.shape[-2]}: '
                'pass the graph of this block, in the layout its MLP sees')
        small = (self.probs is not None or is_exporting()
                 or self.q.shape[:-1].numel() * self.num_nodes <= DENSE_GRAPH_MAX_ENTRIES)
        if small or not fused:
            out = torch.bmm(self.dense(), v)
        else:
            out = self._fused_propagate(v)
        return self.layout.from_groups(out)

    def _fused_propagate(self, v: Tensor) -> Tensor:
        """``mean_h softmax(q_h k_h^T scale + bias) v`` with scaled_dot_product_attention, never forming N x N.

        The flash kernels (CPU and CUDA) need one head dim for q, k and v, else SDPA falls back to its math path,
        which materialises the N x N probabilities (measured on CPU: ~3x B N^2 floats at N = 3137). So q/k and v are
        zero-padded to a common width: zero columns change neither ``q k^T`` nor the first E output columns.
        """
        q, k = self.q.float(), self.k.float()
        values = v.shape[-1]
        width = max(q.shape[-1], values)
        pad = (0, width - q.shape[-1])
        q, k = (F.pad(q, pad), F.pad(k, pad)) if self.k is not self.q else (F.pad(q, pad),) * 2
        v = F.pad(v, (0, width - values))
        bias = None if self.bias is None else self.bias.float()
        out = F.scaled_dot_product_attention(
            q, k, v.unsqueeze(1).expand(-1, q.shape[1], -1, -1), attn_mask=bias, scale=self.scale)
        return out[..., :values].mean(dim=1)


def similarity_graph(
        x: Tensor,
        tau: Tensor | float,
        kind: str = 'cosine',
        layout: TokenLayout = TokenLayout(),
) -> TokenGraph:
    """Implicit similarity graph ``S = row_softmax(sim(x_i, x_j) / tau)`` (self-loop included) over tokens x (B, N, d),
    within the groups of ``layout`` and without the edges its ``mask`` removes.

    ``kind='cosine'`` uses cosine similarity; ``kind='dot'`` the scaled dot product ``x_i . x_j / sqrt(d)``.
    """
    g = layout.to_groups(x.float())
    if kind == 'cosine':
        g = F.normalize(g, dim=-1)
        scale = 1.0
    elif kind == 'dot':
        scale = g.shape[-1] ** -0.5
    else:
        raise ValueError(f"unknown similarity kind {kind!r}; valid: 'cosine', 'dot'")
    g = g.unsqueeze(1)
    if isinstance(tau, Tensor):
        # A learnable temperature cannot be a python float scale: fold it into q so it gets a gradient.
        return TokenGraph(q=g * (scale / tau), k=g, scale=1.0, bias=layout.mask, layout=layout)
    return TokenGraph(q=g, k=g, scale=scale / tau, bias=layout.mask, layout=layout)

"""timm's ViT attention that also returns its token graph, for attention-aware routing in the same block."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.layers.attention import maybe_add_mask, resolve_self_attn_mask
from torch import Tensor

from ..routers import TokenGraph, TokenLayout

__all__ = ['GraphAttention']


class GraphAttention(Attention):
    """timm ``Attention`` (same parameters and module names, same output) whose :meth:`forward_graph` also returns
    the attention graph as an implicit :class:`TokenGraph` (q/k/scale/mask), so the output stays on the fused
    kernel and the N x N probabilities are never materialised. ``forward`` is timm's: a drop-in ``attn_layer``."""

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        return self.forward_graph(x, attn_mask, is_causal)[0]

    def forward_graph(
            self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tuple[Tensor, TokenGraph]:
        """x (B, N, C) -> (attention output (B, N, C), the graph ``softmax(q k^T scale + mask)`` over heads)."""
        if is_causal:
            raise ValueError('GraphAttention (MoE blocks) does not support causal attention')
        batch, tokens, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.fused_attn:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                                 dropout_p=self.attn_drop.p if self.training else 0.)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            attn = maybe_add_mask(attn, resolve_self_attn_mask(tokens, attn, attn_mask, False))
            out = self.attn_drop(attn.softmax(dim=-1)) @ v
        out = self.norm(out.transpose(1, 2).reshape(batch, tokens, self.attn_dim))
        if gate is not None:
            out = out * gate
        out = self.proj_drop(self.proj(out))
        # layout given, not defaulted: torch.compile(fullgraph=True) cannot wrap a dataclass's shared default instance
        return out, TokenGraph(q=q, k=k, scale=self.scale, bias=_additive_mask(attn_mask, q), layout=TokenLayout())


def _additive_mask(attn_mask: Optional[Tensor], ref: Tensor) -> Optional[Tensor]:
    """The attention mask as the additive bias the graph adds to its logits (boolean masks: False = -inf)."""
    if attn_mask is None or attn_mask.dtype != torch.bool:
        return attn_mask
    return torch.zeros_like(attn_mask, dtype=ref.dtype).masked_fill(~attn_mask, float('-inf'))

"""Swin-MoE: timm's Swin Transformer with sparse MoE MLPs and graph-of-tokens routing.

The MoE blocks (by default every other block of the last two stages, Swin-MoE's layout) replace the dense MLP with
:class:`~simoe_vision.layers.MoeMlp`. For attention-aware routing the block hands its own window attention to the
router as an implicit graph (q/k, relative-position bias, shift mask): block-diagonal over the (shifted) windows and
mapped back to the raster token order the MLP sees by a :class:`~simoe_vision.routers.TokenLayout`. The block's
attention output still runs on the fused SDPA kernel; the attention probabilities are never materialised.

Everything outside the MoE MLPs keeps timm's module names, so dense timm Swin checkpoints upcycle
(:func:`~simoe_vision.models._moe.upcycle_state_dict`) and our checkpoints load through ``timm.create_model``.
"""
from __future__ import annotations

import inspect
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._manipulate import named_apply
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock, window_partition, window_reverse
from timm.models.swin_transformer import checkpoint_filter_fn as swin_checkpoint_filter_fn
from timm.models.vision_transformer import get_init_weights_vit
from torch import Tensor

from ..layers import MoeConfig, MoeMlp
from ..routers import TokenGraph, TokenLayout, router_graph
from ._moe import Layout, MoeModelMixin, init_experts, parse_moe_layout, upcycle_state_dict

__all__ = ['SwinMoE', 'SwinMoeBlock', 'swin_moe_layout', 'SIMILARITY_SCOPES']

SIMILARITY_SCOPES = ('global', 'window')
_LAYOUT_NAMES = ('swin_moe', 'every2', 'last2')


def swin_moe_layout(layout: Layout, depths: Sequence[int]) -> List[int]:
    """Global indices (counted over all stages, in forward order) of the blocks that get a MoE MLP.

    ``'swin_moe'``: the odd blocks within each of the last two stages (Swin-MoE's layout: stages 3 and 4 of a
    4-stage model). ``'every2'``, ``'last2'`` or a list of global indices: as :func:`parse_moe_layout` over all blocks.
    """
    total = sum(depths)
    valid = (f"'swin_moe' (odd blocks of the last two stages), 'every2', 'last2', or a list of global block "
             f'indices in [0, {total - 1}]')
    if isinstance(layout, str):
        if layout not in _LAYOUT_NAMES:
            raise ValueError(f'unknown moe_layout {layout!r}; valid: {valid}')
        if layout == 'swin_moe':
            stages = [(sum(depths[:i]), depths[i]) for i in range(len(depths))][-2:]  # (first global index, depth)
            indices = [start + j for start, depth in stages for j in range(1, depth, 2)]
        else:
            indices = parse_moe_layout(layout, total)
    elif isinstance(layout, Sequence) and all(isinstance(i, int) and not isinstance(i, bool) for i in layout):
        indices = parse_moe_layout(layout, total)
    else:
        raise ValueError(f'moe_layout must be {valid}; got {layout!r}')
    if not indices:
        raise ValueError(f'moe_layout {layout!r} selects no block of a model with depths {tuple(depths)}; '
                         'pick at least one block (a dense model is timm\'s swin_*)')
    return indices


def _dense_block_kwargs(block: SwinTransformerBlock, norm_layer: Type[nn.Module]) -> Dict[str, Any]:
    """The constructor arguments of a built timm Swin block (norm_layer is not recoverable from the module)."""
    attn = block.attn
    return dict(
        dim=block.dim,
        input_resolution=block.input_resolution,
        num_heads=attn.num_heads,
        head_dim=attn.qkv.out_features // (3 * attn.num_heads),
        window_size=block.window_size,
        shift_size=block.target_shift_size,
        always_partition=block.always_partition,
        dynamic_mask=block.dynamic_mask,
        mlp_ratio=block.mlp_ratio,
        qkv_bias=attn.qkv.bias is not None,
        proj_drop=attn.proj_drop.p,
        attn_drop=attn.attn_drop.p,
        drop_path=block.drop_path1.drop_prob if isinstance(block.drop_path1, DropPath) else 0.,
        act_layer=type(block.mlp.act),
        norm_layer=norm_layer,
        device=block.norm1.weight.device,
        dtype=block.norm1.weight.dtype,
    )


class SwinMoeBlock(SwinTransformerBlock):
    """A timm Swin block whose MLP is ``mlp_layer`` (a :class:`MoeMlp` constructor) and which passes the router the
    token graph it needs: its window attention (``routing_graph='attention'``), its windows only
    (``'window'``: windowed similarity) or nothing (``''``). Module names are timm's.
    """

    def __init__(self, *args, mlp_layer: Callable[..., nn.Module], routing_graph: str = '', **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if routing_graph not in ('', 'attention', 'window'):
            raise ValueError(f"routing_graph must be '', 'attention' or 'window', got {routing_graph!r}")
        dense = self.mlp
        self.mlp = mlp_layer(
            in_features=self.dim,
            hidden_features=dense.fc1.out_features,
            act_layer=type(dense.act),
            drop=dense.drop1.p,
            device=self.norm1.weight.device,
            dtype=self.norm1.weight.dtype,
        )
        self.routing_graph = routing_graph
        self.check_window_tiling(self.input_resolution)

    def _padding(self, size: Tuple[int, int]) -> Tuple[int, int]:
        return tuple((w - s % w) % w for s, w in zip(size, self.window_size, strict=True))

    def check_window_tiling(self, size: Tuple[int, int]) -> None:
        """A routing graph over windows needs whole windows: reject feature maps timm would pad."""
        if self.routing_graph and any(self._padding(size)):
            raise ValueError(
                f'feature map {size[0]}x{size[1]} is not a multiple of the window '
                f'{self.window_size[0]}x{self.window_size[1]}: a MoE block routing over windows '
                f'({self.routing_graph!r} graph) needs whole windows, and timm would pad them. Choose img_size / '
                "window_size so that each MoE stage's map is a multiple of its window, or use router='softmax' "
                "or similarity_scope='global'.")

    def to_windows(self, x: Tensor, size: Tuple[int, int]) -> Tensor:
        """(B, H*W, C) in raster order -> (B*nW, Wt, C): cyclic shift by -shift, pad to whole windows, partition."""
        batch, _, channels = x.shape
        x = x.reshape(batch, *size, channels)
        if any(self.shift_size):
            x = torch.roll(x, shifts=(-self.shift_size[0], -self.shift_size[1]), dims=(1, 2))
        pad_h, pad_w = self._padding(size)
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        return window_partition(x, self.window_size).reshape(-1, self.window_area, channels)

    def from_windows(self, windows: Tensor, size: Tuple[int, int]) -> Tensor:
        """Inverse of :meth:`to_windows`: (B*nW, Wt, C) -> (B, H*W, C) in raster order (padding dropped)."""
        height, width = size
        pad_h, pad_w = self._padding(size)
        channels = windows.shape[-1]
        windows = windows.reshape(-1, *self.window_size, channels)
        x = window_reverse(windows, self.window_size, height + pad_h, width + pad_w)[:, :height, :width]
        if any(self.shift_size):
            x = torch.roll(x, shifts=self.shift_size, dims=(1, 2))
        return x.reshape(x.shape[0], height * width, channels)

    def shift_mask(self, size: Tuple[int, int], batch: int, ref: Tensor) -> Optional[Tensor]:
        """Shifted blocks: the additive mask (B*nW, 1, Wt, Wt) that keeps wrapped-around regions apart; else None."""
        mask = self.attn_mask
        if self.dynamic_mask:
            padded = [s + p for s, p in zip(size, self._padding(size), strict=True)]
            mask = self.get_attn_mask(ref.new_empty(1, *padded, 1))
        if mask is None:
            return None
        num_windows, tokens = mask.shape[0], self.window_area
        return mask.view(1, num_windows, 1, tokens, tokens).expand(batch, -1, -1, -1, -1).reshape(-1, 1, tokens, tokens)

    def attention_bias(self, size: Tuple[int, int], batch: int, ref: Tensor) -> Tensor:
        """Relative-position bias plus (shifted blocks) the shift mask, (B*nW or 1, heads, Wt, Wt), as timm adds it."""
        bias = self.attn._get_rel_pos_bias()
        mask = self.shift_mask(size, batch, ref)
        return bias if mask is None else bias + mask

    def window_attention(self, x: Tensor, size: Tuple[int, int]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """timm's (S)W-MSA on x (B, H*W, C) with the fused kernel; returns (out (B, H*W, C), q, k, bias), q/k of
        shape (B*nW, heads, Wt, head_dim) for the routing graph."""
        attn = self.attn
        windows = self.to_windows(x, size)
        num, tokens, _ = windows.shape
        q, k, v = attn.qkv(windows).reshape(num, tokens, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.attention_bias(size, x.shape[0], x)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=attn.attn_drop.p if self.training else 0., scale=attn.scale)
        out = attn.proj_drop(attn.proj(out.transpose(1, 2).reshape(num, tokens, -1)))
        return self.from_windows(out, size), q, k, bias

    def forward(self, x: Tensor) -> Tensor:
        """x (B, H, W, C) -> (B, H, W, C)."""
        batch, height, width, channels = x.shape
        size = (height, width)
        self.check_window_tiling(size)
        out, q, k, bias = self.window_attention(self.norm1(x).reshape(batch, -1, channels), size)
        x = x.reshape(batch, -1, channels) + self.drop_path1(out)
        graph = layout = None
        if self.routing_graph:
            layout = TokenLayout(partial(self.to_windows, size=size), partial(self.from_windows, size=size),
                                 mask=self.shift_mask(size, batch, x))
        if self.routing_graph == 'attention':
            graph = TokenGraph(q=q, k=k, scale=self.attn.scale, bias=bias, layout=layout)
        x = x + self.drop_path2(self.mlp(self.norm2(x), graph=graph, layout=layout))
        return x.reshape(batch, height, width, channels)


class SwinMoE(MoeModelMixin, SwinTransformer):
    """timm's ``SwinTransformer`` with MoE MLPs in the blocks of ``moe_layout``.

    Args (besides timm's Swin kwargs):
        the MoE settings (:class:`~simoe_vision.layers.MoeConfig`'s fields: router, router_kwargs, num_experts,
            top_k, capacity_factor, ...).
        moe_layout: 'swin_moe' (default: odd blocks of the last two stages), 'every2', 'last2', or a list of
            global block indices counted over all stages.
        similarity_scope: the graph of a router that builds it from the tokens (similarity): 'global' (all tokens
            of an image, default) or 'window' (each (shifted) attention window of the block).
        expert_init: 'trunc_normal' (timm's, default) or 'fan_in' (N(0, 1 / fan_in)).
    """

    def __init__(self, *, moe_layout: Layout = 'swin_moe', similarity_scope: str = 'global',
                 expert_init: str = 'trunc_normal', **kwargs) -> None:
        if similarity_scope not in SIMILARITY_SCOPES:
            raise ValueError(f'similarity_scope must be one of {", ".join(SIMILARITY_SCOPES)}, '
                             f'got {similarity_scope!r}')
        moe_config, kwargs = MoeConfig.split(kwargs)
        depths = kwargs.get('depths', inspect.signature(SwinTransformer.__init__).parameters['depths'].default)
        moe_blocks = swin_moe_layout(moe_layout, depths)
        super().__init__(**kwargs)
        self.moe_config = moe_config
        self.moe_layout = moe_blocks
        self.similarity_scope = similarity_scope
        graph = router_graph(moe_config.router)
        if graph == 'attention':
            routing_graph = 'attention'
        elif graph == 'tokens' and similarity_scope == 'window':
            routing_graph = 'window'
        else:
            routing_graph = ''
        blocks = [(stage, j) for stage in self.layers for j in range(len(stage.blocks))]
        init_fn = get_init_weights_vit(self.weight_init_mode, needs_reset=False)
        for index in moe_blocks:
            stage, j = blocks[index]
            block = SwinMoeBlock(
                **_dense_block_kwargs(stage.blocks[j], kwargs.get('norm_layer', nn.LayerNorm)),
                mlp_layer=partial(MoeMlp, moe=moe_config),
                routing_graph=routing_graph,
            )
            named_apply(init_fn, block)  # timm's init for the new block's dense layers, as SwinTransformer does
            stage.blocks[j] = block
        init_experts(self, expert_init)


def checkpoint_filter_fn(state_dict: Dict[str, Tensor], model: SwinMoE) -> Dict[str, Tensor]:
    """timm's Swin filter (unwrapping, old layouts, resized relative-position tables); a dense Swin checkpoint,
    recognised by a dense MLP where the model has a MoE one, is upcycled (each MLP copied into every expert)."""
    state_dict = swin_checkpoint_filter_fn(state_dict, model)
    if any(f'{name}.fc1.weight' in state_dict for name, _ in model.moe_layers()):
        return upcycle_state_dict(state_dict, model)
    return state_dict


def _create_swin_moe(variant: str, pretrained: bool = False, **kwargs) -> SwinMoE:
    out_indices = kwargs.pop('out_indices', tuple(range(len(kwargs.get('depths', (1, 1, 3, 1))))))
    return build_model_with_cfg(
        SwinMoE, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True, out_indices=out_indices),
        **kwargs)


def _cfg(**kwargs) -> Dict[str, Any]:
    """No weights are published: load your own with ``pretrained_cfg_overlay=dict(file=...)`` or ``checkpoint_path``."""
    return {
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': .9, 'interpolation': 'bicubic', 'fixed_input_size': True,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.proj', 'classifier': 'head.fc', 'license': 'apache-2.0', **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'swin_moe_tiny_patch4_window7_224': _cfg(),
    'swin_moe_small_patch4_window7_224': _cfg(),
    'swin_moe_nano_patch2_window4_32': _cfg(
        num_classes=10, input_size=(3, 32, 32), pool_size=(2, 2), crop_pct=1.0),
    'swin_moe_test': _cfg(num_classes=10, input_size=(3, 32, 32), pool_size=(4, 4), crop_pct=1.0),
})


@register_model
def swin_moe_tiny_patch4_window7_224(pretrained: bool = False, **kwargs) -> SwinMoE:
    """Swin-T dims (96, depths 2-2-6-2) with MoE MLPs; 224 px."""
    model_args = dict(patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
    return _create_swin_moe('swin_moe_tiny_patch4_window7_224', pretrained, **dict(model_args, **kwargs))


@register_model
def swin_moe_small_patch4_window7_224(pretrained: bool = False, **kwargs) -> SwinMoE:
    """Swin-S dims (96, depths 2-2-18-2) with MoE MLPs; 224 px."""
    model_args = dict(patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))
    return _create_swin_moe('swin_moe_small_patch4_window7_224', pretrained, **dict(model_args, **kwargs))


@register_model
def swin_moe_nano_patch2_window4_32(pretrained: bool = False, **kwargs) -> SwinMoE:
    """For 28-32 px inputs (CIFAR, Fashion-MNIST with ``in_chans=1``): 2 px patches, stage maps 16-8-4-2."""
    model_args = dict(img_size=32, patch_size=2, window_size=4, embed_dim=32, depths=(2, 2, 4, 2),
                      num_heads=(2, 4, 8, 16), num_classes=10)
    return _create_swin_moe('swin_moe_nano_patch2_window4_32', pretrained, **dict(model_args, **kwargs))


@register_model
def swin_moe_test(pretrained: bool = False, **kwargs) -> SwinMoE:
    """A few thousand parameters for CI: 32 px, two stages (8x8 and 4x4 maps, 2x2 windows, shifted MoE blocks)."""
    model_args = dict(img_size=32, patch_size=4, window_size=2, embed_dim=8, depths=(2, 2), num_heads=(1, 2),
                      mlp_ratio=2., num_experts=4, num_classes=10)
    return _create_swin_moe('swin_moe_test', pretrained, **dict(model_args, **kwargs))

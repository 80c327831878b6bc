"""V-MoE: timm's VisionTransformer with the MLP of selected blocks replaced by a sparse MoE MLP.

Router and MoE settings are model kwargs (:class:`~simoe_vision.layers.MoeConfig`'s fields: ``router=``,
``num_experts=``, ``top_k=``, ``capacity_factor=``, ... plus ``moe_layout=``). A MoE block's attention is a
:class:`~simoe_vision.layers.GraphAttention`: timm's attention (same weights, fused kernel) that returns its q/k as
a token graph, which the block passes down to a router that reads the attention graph.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable, Dict, Optional, Set

import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD
from timm.layers import Attention, HybridEmbed, to_2tuple
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import Block, VisionTransformer, checkpoint_filter_fn
from timm.models.vision_transformer_hybrid import ConvStem
from torch import Tensor

from ..layers import GraphAttention, MoeConfig, MoeMlp
from ..routers import router_graph
from ._moe import Layout, MoeModelMixin, init_experts, parse_moe_layout

__all__ = ['VisionMoE', 'MoeBlock']


class MoeBlock(Block):
    """timm ViT ``Block`` whose MLP is a ``MoeMlp``; with an attention-graph router its attention's graph goes
    straight to the MLP in ``forward`` (nothing is stored between the two)."""

    def __init__(self, *args, moe: MoeConfig, attn_layer: Any = Attention, **kwargs) -> None:
        routes_on_attention = router_graph(moe.router) == 'attention'
        if attn_layer is Attention:
            attn_layer = GraphAttention
        elif routes_on_attention and not hasattr(attn_layer, 'forward_graph'):
            raise ValueError(f'router {moe.router!r} reads the attention graph: it needs an attention layer with '
                             f'forward_graph() (simoe_vision.layers.GraphAttention), got {attn_layer!r}')
        kwargs['mlp_layer'] = partial(MoeMlp, moe=moe)  # replaces timm's Mlp (VisionTransformer passes its own)
        super().__init__(*args, attn_layer=attn_layer, **kwargs)
        self.routes_on_attention = routes_on_attention

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        if is_causal:
            raise ValueError('MoE blocks do not support causal attention')
        graph = None
        if self.routes_on_attention:
            out, graph = self.attn.forward_graph(self.norm1(x), attn_mask=attn_mask)
        else:
            out = self.attn(self.norm1(x), attn_mask=attn_mask)
        x = x + self.drop_path1(self.ls1(out))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x), graph)))


def _block_factory(moe_blocks: Set[int], moe: MoeConfig) -> Callable[..., nn.Module]:
    """timm ``block_fn``: a MoE block at the chosen depths, timm's dense Block elsewhere."""
    def make_block(*, depth: int, **kwargs) -> nn.Module:
        if depth in moe_blocks:
            return MoeBlock(moe=moe, depth=depth, **kwargs)
        return Block(depth=depth, **kwargs)
    return make_block


def conv_stem_embed(*, img_size: Any, patch_size: Any, in_chans: int, embed_dim: int, bias: bool = True,
                    **kwargs: Any) -> HybridEmbed:
    """A convolutional stem in place of the patch projection ("Early Convolutions Help Transformers See Better",
    Xiao et al. 2021): ceil(log2 patch) 3x3 stride-2 convs (BatchNorm + ReLU between, widths doubling up to
    ``embed_dim``), so the token grid is ceil(img / 2^n): 28 px at patch 7 -> 4 x 4 tokens as a 7 px patch grid, patch
    4 -> 7 x 7. timm's ``ConvStem`` in timm's ``HybridEmbed``."""
    depth = max(1, math.ceil(math.log2(max(to_2tuple(patch_size)))))
    backbone = ConvStem(in_chans, depth=depth, channels=embed_dim, stride=(2,) * depth,
                        device=kwargs.get('device'), dtype=kwargs.get('dtype'))
    return HybridEmbed(backbone, img_size=img_size, patch_size=1, in_chans=in_chans, embed_dim=embed_dim, proj=False,
                       **kwargs)


STEMS = {'patch': None, 'conv': conv_stem_embed}


class VisionMoE(MoeModelMixin, VisionTransformer):
    """V-MoE (Riquelme et al. 2021) on timm's ViT, with any registered router.

    Args (besides timm VisionTransformer's): the MoE settings (:class:`~simoe_vision.layers.MoeConfig`'s fields)
    and ``moe_layout``: 'every2' (blocks 1, 3, 5, ...; V-MoE's default), 'last2', or a list of block indices;
    ``expert_init``: 'trunc_normal' (timm's, default) or 'fan_in' (N(0, 1 / fan_in)); ``stem``: 'patch' (timm's
    patch projection, default) or 'conv' (:func:`conv_stem_embed`); ``fused_attn``: False runs every block's
    attention as explicit matmuls (timm's unfused path) instead of ``scaled_dot_product_attention``, whose CPU flash
    kernel is slow at few tokens (16 tokens, batch 128, 3 heads of 32, forward + backward, 2 threads: 0.85 vs 3-4 ms
    a layer); True (default) keeps timm's choice.
    """

    def __init__(self, *, moe_layout: Layout = 'every2', expert_init: str = 'trunc_normal', stem: str = 'patch',
                 fused_attn: bool = True, **kwargs) -> None:
        if 'block_fn' in kwargs:
            raise ValueError('VisionMoE builds its own blocks; block_fn cannot be given')
        if stem not in STEMS:
            raise ValueError(f'unknown stem {stem!r}; valid: {", ".join(STEMS)}')
        if STEMS[stem] is not None:
            if 'embed_layer' in kwargs:
                raise ValueError(f'stem={stem!r} is an embed layer: give stem or embed_layer, not both')
            kwargs['embed_layer'] = STEMS[stem]
        moe, kwargs = MoeConfig.split(kwargs)
        moe_blocks = parse_moe_layout(moe_layout, kwargs.get('depth', 12))
        super().__init__(block_fn=_block_factory(set(moe_blocks), moe), **kwargs)
        self.moe_config = moe
        self.moe_block_indices = moe_blocks
        init_experts(self, expert_init)
        if not fused_attn:
            for block in self.blocks:
                block.attn.fused_attn = False


def _create_vmoe(variant: str, pretrained: bool = False, **kwargs) -> VisionMoE:
    out_indices = kwargs.pop('out_indices', 3)
    return build_model_with_cfg(
        VisionMoE, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **kwargs,
    )


def _cfg(**kwargs) -> Dict[str, Any]:
    """No public V-MoE PyTorch weights exist: cfgs carry preprocessing only; load yours with
    ``pretrained=True, pretrained_cfg_overlay=dict(file=PATH)`` or ``checkpoint_path=PATH``."""
    return {
        'url': '', 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': None,
        'crop_pct': 0.9, 'interpolation': 'bicubic', 'fixed_input_size': True,
        'mean': IMAGENET_INCEPTION_MEAN, 'std': IMAGENET_INCEPTION_STD,
        'first_conv': 'patch_embed.proj', 'classifier': 'head', 'license': 'apache-2.0',
        **kwargs,
    }


def _small_image_cfg(**kwargs) -> Dict[str, Any]:
    return _cfg(**dict(dict(input_size=(3, 32, 32), crop_pct=1.0, mean=IMAGENET_DEFAULT_MEAN,
                            std=IMAGENET_DEFAULT_STD, num_classes=10), **kwargs))


default_cfgs = generate_default_cfgs({
    'vmoe_tiny_patch16_224': _cfg(),
    'vmoe_small_patch16_224': _cfg(),
    'vmoe_small_patch32_224': _cfg(),
    'vmoe_base_patch16_224': _cfg(),
    'vmoe_paper_s32_224': _cfg(),
    'vmoe_nano_patch4_32': _small_image_cfg(),
    'vmoe_micro_patch4_32': _small_image_cfg(),
    'vmoe_test': _small_image_cfg(),
})


def _entry(variant: str, pretrained: bool, defaults: Dict[str, Any], kwargs: Dict[str, Any]) -> VisionMoE:
    return _create_vmoe(variant, pretrained=pretrained, **dict(defaults, **kwargs))


@register_model
def vmoe_tiny_patch16_224(pretrained: bool = False, **kwargs) -> VisionMoE:
    """V-MoE Ti/16: ViT-Ti dims (192 wide, 12 blocks, 3 heads), MoE in every other block."""
    return _entry('vmoe_tiny_patch16_224', pretrained,
                  dict(patch_size=16, embed_dim=192, depth=12, num_heads=3), kwargs)


@register_model
def vmoe_small_patch16_224(pretrained: bool = False, **kwargs) -> VisionMoE:
    """V-MoE S/16: ViT-S dims (384 wide, 12 blocks, 6 heads), MoE in every other block."""
    return _entry('vmoe_small_patch16_224', pretrained,
                  dict(patch_size=16, embed_dim=384, depth=12, num_heads=6), kwargs)


@register_model
def vmoe_small_patch32_224(pretrained: bool = False, **kwargs) -> VisionMoE:
    """V-MoE S/32 with timm's ViT-S dims."""
    return _entry('vmoe_small_patch32_224', pretrained,
                  dict(patch_size=32, embed_dim=384, depth=12, num_heads=6), kwargs)


@register_model
def vmoe_base_patch16_224(pretrained: bool = False, **kwargs) -> VisionMoE:
    """V-MoE B/16: ViT-B dims (768 wide, 12 blocks, 12 heads), MoE in every other block."""
    return _entry('vmoe_base_patch16_224', pretrained,
                  dict(patch_size=16, embed_dim=768, depth=12, num_heads=12), kwargs)


@register_model
def vmoe_paper_s32_224(pretrained: bool = False, **kwargs) -> VisionMoE:
    """google-research/vmoe's own S/32: 8 blocks, 512 wide, MLP 2048, 8 heads, MoE in the last two odd blocks."""
    return _entry('vmoe_paper_s32_224', pretrained,
                  dict(patch_size=32, embed_dim=512, depth=8, num_heads=8, mlp_ratio=4.0, moe_layout='last2'), kwargs)


@register_model
def vmoe_nano_patch4_32(pretrained: bool = False, **kwargs) -> VisionMoE:
    """Small-image V-MoE for 28-32 px inputs (Fashion-MNIST, CIFAR): 65 tokens, 96 wide, 6 blocks, 3 heads."""
    return _entry('vmoe_nano_patch4_32', pretrained,
                  dict(img_size=32, patch_size=4, embed_dim=96, depth=6, num_heads=3, mlp_ratio=2.0), kwargs)


@register_model
def vmoe_micro_patch4_32(pretrained: bool = False, **kwargs) -> VisionMoE:
    """Small-image V-MoE for 28-32 px inputs: 65 tokens, ViT-Ti width (192), 6 blocks, 3 heads."""
    return _entry('vmoe_micro_patch4_32', pretrained,
                  dict(img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3), kwargs)


@register_model
def vmoe_test(pretrained: bool = False, **kwargs) -> VisionMoE:
    """Tiny V-MoE for CI: 32 px, patch 8 (17 tokens), 32 wide, 2 blocks, 4 experts."""
    return _entry('vmoe_test', pretrained,
                  dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
                       num_experts=4), kwargs)

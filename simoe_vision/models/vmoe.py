"""V-MoE: timm's VisionTransformer with the MLP of selected blocks replaced by a sparse MoE MLP.

Router and MoE settings are model kwargs (``router=``, ``num_experts=``, ``top_k=``, ``moe_layout=``, ...). With
``router='attention'`` each MoE block routes over its own attention graph: the block's q/k are captured (the block
output stays on timm's fused attention kernel) and propagated with scaled_dot_product_attention.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Set

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import Block, VisionTransformer, checkpoint_filter_fn
from torch import Tensor

from ..routers import TokenGraph
from ._moe import Layout, MoeConfig, MoeModelMixin, parse_moe_layout

__all__ = ['VisionMoE', 'MoeBlock']


class MoeBlock(Block):
    """timm ViT ``Block`` whose MLP is a ``MoeMlp``; hands the attention graph to attention-aware routers."""

    def __init__(self, *args, moe: MoeConfig, **kwargs) -> None:
        kwargs['mlp_layer'] = moe.mlp_layer()
        super().__init__(*args, **kwargs)
        self._qk: Dict[str, Tensor] = {}
        if moe.needs_attention_graph:
            if not (hasattr(self.attn, 'q_norm') and hasattr(self.attn, 'k_norm') and hasattr(self.attn, 'scale')):
                raise ValueError(f'router="attention" needs an attention layer with q_norm/k_norm/scale (timm '
                                 f'Attention); got {type(self.attn).__name__}')
            # q and k leave q_norm / k_norm as (B, H, N, D): capture them there, leaving timm's forward untouched.
            self.attn.q_norm.register_forward_hook(self._capture('q'))
            self.attn.k_norm.register_forward_hook(self._capture('k'))

    def _capture(self, key: str) -> Callable:
        def hook(module: nn.Module, args: Any, output: Tensor) -> None:
            self._qk[key] = output
        return hook

    def _take_graph(self, attn_mask: Optional[Tensor]) -> Optional[TokenGraph]:
        if not self._qk:
            return None
        q, k = self._qk.pop('q'), self._qk.pop('k')
        bias = attn_mask
        if bias is not None and bias.dtype == torch.bool:
            bias = torch.zeros_like(bias, dtype=q.dtype).masked_fill(~bias, float('-inf'))
        return TokenGraph(q=q, k=k, scale=self.attn.scale, bias=bias)

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        if is_causal:
            raise ValueError('MoE blocks do not support causal attention')
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask)))
        graph = self._take_graph(attn_mask)
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x), graph)))
        return x


def _block_factory(moe_blocks: Set[int], moe: MoeConfig) -> Callable[..., nn.Module]:
    """timm ``block_fn``: a MoE block at the chosen depths, timm's dense Block elsewhere."""
    def make_block(*, depth: int, **kwargs) -> nn.Module:
        if depth in moe_blocks:
            return MoeBlock(moe=moe, depth=depth, **kwargs)
        return Block(depth=depth, **kwargs)
    return make_block


class VisionMoE(MoeModelMixin, VisionTransformer):
    """V-MoE (Riquelme et al. 2021) on timm's ViT, with softmax, similarity- or attention-aware routing.

    Args (besides timm VisionTransformer's): ``num_experts``, ``top_k``, ``router``, ``router_kwargs``,
    ``capacity_factor``, ``eval_capacity_factor``, ``capacity_group``, ``batch_prioritized`` (see ``MoeMlp``) and
    ``moe_layout``: 'every2' (blocks 1, 3, 5, ...; V-MoE's default), 'last2', or a list of block indices.
    """

    def __init__(
            self,
            *,
            num_experts: int = 8,
            top_k: int = 2,
            router: str = 'softmax',
            router_kwargs: Optional[Dict[str, Any]] = None,
            capacity_factor: Optional[float] = 1.25,
            eval_capacity_factor: Optional[float] = 2.0,
            capacity_group: str = 'image',
            batch_prioritized: bool = False,
            moe_layout: Layout = 'every2',
            **kwargs,
    ) -> None:
        if 'block_fn' in kwargs:
            raise ValueError('VisionMoE builds its own blocks; block_fn cannot be given')
        moe = MoeConfig(num_experts, top_k, router, router_kwargs or {}, capacity_factor, eval_capacity_factor,
                        capacity_group, batch_prioritized)
        moe_blocks = parse_moe_layout(moe_layout, kwargs.get('depth', 12))
        super().__init__(block_fn=_block_factory(set(moe_blocks), moe), **kwargs)
        self.moe_config = moe
        self.moe_block_indices = moe_blocks


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

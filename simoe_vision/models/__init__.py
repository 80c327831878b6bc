"""simoe_vision models, registered with timm on import: V-MoE (``vmoe_*``) and Swin-MoE (``swin_moe_*``)."""
from ..layers import MoeConfig
from ._moe import MoeModelMixin, count_params, moe_layers, parse_moe_layout, upcycle_state_dict
from .swin_moe import SwinMoE, SwinMoeBlock
from .vmoe import MoeBlock, VisionMoE

__all__ = ['MoeConfig', 'MoeModelMixin', 'count_params', 'moe_layers', 'parse_moe_layout', 'upcycle_state_dict',
           'MoeBlock', 'VisionMoE', 'SwinMoE', 'SwinMoeBlock']

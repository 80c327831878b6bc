"""simoe_vision: sparse Mixture-of-Experts vision transformers with graph-of-tokens routing, for timm."""
import os

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('NO_ALBUMENTATIONS_UPDATE', '1')

from . import models  # noqa: E402,F401  (registers the models with timm)
from .layers import MoeMlp  # noqa: E402
from .models import count_params, moe_layers, upcycle_state_dict  # noqa: E402
from .routers import ROUTERS, RoutingOutput, TokenGraph, TokenLayout, create_router  # noqa: E402

__version__ = '0.1.0'
__all__ = ['MoeMlp', 'count_params', 'moe_layers', 'upcycle_state_dict', 'ROUTERS', 'RoutingOutput', 'TokenGraph',
           'TokenLayout', 'create_router', '__version__']

"""A run config -> the timm model it names: the one translation train.py and evaluate.py share."""
from __future__ import annotations

from typing import Any, Dict

import timm
import torch.nn as nn

from .config import ConfigError

__all__ = ['MODEL_SETTINGS', 'create_model_from_config', 'model_settings']

# Config keys that are model kwargs of the same name; None (not given) leaves the registered model's own default.
MODEL_SETTINGS = ('router', 'num_experts', 'top_k', 'img_size')


def create_model_from_config(config: Dict[str, Any], **fixed: Any) -> nn.Module:
    """``timm.create_model(config['model'], ...)`` with the settings the config gives, its ``router_kwargs``,
    ``drop_path`` and ``model_kwargs``, plus ``fixed`` (e.g. num_classes/in_chans read off the data or weights)."""
    kwargs: Dict[str, Any] = {k: config[k] for k in MODEL_SETTINGS if config.get(k) is not None}
    if config.get('router_kwargs'):
        kwargs['router_kwargs'] = config['router_kwargs']
    kwargs['drop_path_rate'] = config.get('drop_path', 0.0)
    kwargs.update(config.get('model_kwargs') or {})
    kwargs.update(fixed)
    try:
        return timm.create_model(config['model'], **kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"cannot build model {config['model']!r} from the config (router, num_experts, top_k, "
                          f'router_kwargs, model_kwargs): {e}') from None


def model_settings(model: nn.Module) -> Dict[str, Any]:
    """The MoE settings a built model actually uses, as config keys (so a saved config names them)."""
    moe = model.moe_config
    return {'router': moe.router, 'num_experts': moe.num_experts, 'top_k': moe.top_k}

"""Load a model to evaluate from a train.py run folder (its config.yaml + best checkpoint) or a bare weights file.

A run folder supplies the model name, router, experts and data settings from its ``config.yaml``; so does a
``.safetensors`` file written by train.py on its own (the run config is in its metadata: the three routers have the
same parameters, so the weights alone cannot tell them apart). Other weights files (``.pth``/``.pt`` state dicts,
safetensors from elsewhere) need them from the command line (``--model``, ``--router``, ``--model-kwargs``).
``num_classes`` and ``in_chans`` are read off the weights (classifier and first conv), so a 1-channel Fashion-MNIST
model and a 1000-class ImageNet model load with the same call. Weights that do not fit the
model fail with one :class:`CheckpointMismatchError` listing missing, unexpected and mis-shaped keys and the likely
cause, instead of torch's ``load_state_dict`` trace.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

import timm
import torch
import yaml
from safetensors.torch import load_file
from torch import Tensor, nn

from ..engine.checkpoint import (
    BEST,
    LAST,
    CheckpointError,
    committed_files,
    describe_load_failure,
    safe_load,
    saved_config,
)
from ..engine.config import OPTIONS, ConfigError, convert_value
from ..engine.data import data_config_for
from ..engine.model_factory import create_model_from_config, model_settings

__all__ = ['CheckpointMismatchError', 'LoadedModel', 'check_state_dict', 'load_model', 'read_weights']

# model_kwargs keys that are run-config keys of their own (so a weights file's settings read like a run's)
_CONFIG_KEYS = ('num_experts', 'top_k', 'router_kwargs', 'img_size', 'in_chans')


class CheckpointMismatchError(CheckpointError):
    """The weights do not fit the model built from the settings; the message lists the differences."""


@dataclass
class LoadedModel:
    """A model ready to evaluate, with the settings it was built from."""

    label: str
    model: nn.Module
    config: Dict[str, Any]
    data_config: Dict[str, Any]
    checkpoint: str
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def router(self) -> str:
        return self.config['router']


def read_weights(path: Path) -> Dict[str, Tensor]:
    """A state dict from ``.safetensors`` or a torch file (flat, or under 'state_dict' / 'model' / 'ema')."""
    try:
        if path.suffix == '.safetensors':
            return load_file(str(path))
        obj = safe_load(path)
    except Exception as e:  # noqa: BLE001 - any read failure means the file is unusable
        reason = e if path.suffix == '.safetensors' else describe_load_failure(e)
        raise CheckpointError(f'cannot read weights {path}: {reason}') from None
    if isinstance(obj, dict) and 'optimizer' in obj and 'epoch' in obj:  # a train.py training state
        beside = path.with_suffix('.safetensors')
        if beside.is_file():
            return read_weights(beside)
        raise CheckpointError(f'{path} is a training state without weights and {beside} is missing')
    for key in ('state_dict', 'model', 'ema'):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f'{path} holds no state dict of tensors')
    return {k.removeprefix('module.'): v for k, v in obj.items()}


_EXPERT_OR_ROUTER = re.compile(r'\.(experts|router)\.')
_ROUTER_GATE = re.compile(r'\.router\.gate\.weight$')  # (num_experts, dim)
_HEAD = re.compile(r'(?:head\.)?(?:head|fc)\.weight$')  # (num_classes, dim)
_BLOCK = re.compile(r'((?:blocks|layers)\.\d+\.(?:blocks\.\d+\.)?)')

Shapes = Dict[str, tuple[tuple[int, ...], tuple[int, ...]]]  # key -> (shape in the weights, shape in the model)


def _block(key: str) -> Optional[str]:
    match = _BLOCK.match(key)
    return match.group(1) if match else None


def _likely_causes(absent: list[str], shaped: Shapes, config: Dict[str, Any], present: set[str]) -> list[str]:
    """What most likely differs between the weights and the model: from the missing or unexpected keys
    (``absent``), the mis-shaped ones, and ``present`` (the blocks both have)."""
    causes = []
    in_blocks = [k for k in absent if _block(k) is not None]
    if any(_block(k) not in present or '.router.' not in k for k in in_blocks):  # whole blocks, or MLP vs MoE
        causes.append('a different depth or MoE layout (moe_layout)')
    elif in_blocks:  # only router parameters differ, in blocks both have
        causes.append(f"a different router or router_kwargs (the model was built with router={config['router']!r})")
    if any(not (_EXPERT_OR_ROUTER.search(k) or k.startswith(('head.', 'fc.'))) for k in shaped):
        causes.append(f"a different model size (embed_dim, mlp_ratio, patch or image size) than {config['model']!r}")
    if any(_ROUTER_GATE.search(k) and a[0] != b[0] for k, (a, b) in shaped.items()):
        causes.append(f"a different num_experts (the model was built with {config.get('num_experts')} experts)")
    if any(_HEAD.match(k) and a[0] != b[0] for k, (a, b) in shaped.items()):
        causes.append('a different number of classes')
    if (absent or shaped) and not causes:
        causes.append(f"a different model than {config['model']!r} or other model_kwargs")
    return causes


def _listing(title: str, items: list[str], limit: int = 8) -> str:
    more = f' (+{len(items) - limit} more)' if len(items) > limit else ''
    return f'  {title} ({len(items)}): {", ".join(items[:limit])}{more}'


def check_state_dict(model: nn.Module, weights: Dict[str, Tensor], config: Dict[str, Any], source: str) -> None:
    """Raise one :class:`CheckpointMismatchError` if ``weights`` do not match ``model``'s keys and shapes."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    shapes = {k: (tuple(weights[k].shape), tuple(v.shape)) for k, v in expected.items()
              if k in weights and weights[k].shape != v.shape}
    if not (missing or unexpected or shapes):
        return
    shaped = [f'{k} {a} vs model {b}' for k, (a, b) in shapes.items()]
    lines = [f"weights {source} do not fit {config['model']} (router={config['router']}, "
             f"num_experts={config.get('num_experts')}):"]
    for title, items in (('missing', missing), ('unexpected', unexpected), ('mis-shaped', shaped)):
        if items:
            lines.append(_listing(title, items))
    present = {_block(k) for k in expected if k in weights} - {None}
    causes = _likely_causes(missing + unexpected, shapes, config, present)
    lines.append(f'  likely cause: {"; or ".join(causes)}. Pass the run folder (its config.yaml has the settings), '
                 'or --model/--router/--model-kwargs that match.')
    raise CheckpointMismatchError('\n'.join(lines))


def _resolve_files(path: Path) -> tuple[Path, Optional[Path]]:
    """(weights file, run config or None) for a run folder, a checkpoint inside one, or a lone weights file."""
    if path.is_dir():
        for tag in (BEST, LAST):
            files = committed_files(path, tag)  # the committed pair, even if a killed save left it staged
            weights = files[0] if files is not None else path / f'{tag}.safetensors'
            if weights.is_file():
                return weights, (path / 'config.yaml' if (path / 'config.yaml').is_file() else None)
        raise CheckpointError(f'{path} holds no best.safetensors or last.safetensors; pass a train.py run folder '
                              'or a weights file')
    if not path.is_file():
        raise CheckpointError(f'checkpoint {path} does not exist; pass a train.py run folder or a weights file '
                              '(.safetensors, .pth)')
    config = path.parent / 'config.yaml'
    return path, config if config.is_file() else None


def _saved_run_config(weights_path: Path, config_path: Optional[Path]) -> Optional[Dict[str, Any]]:
    """The run's config: its config.yaml, else the one train.py stored in the safetensors metadata, else None."""
    if config_path is not None:
        return yaml.safe_load(config_path.read_text()) or {}
    return saved_config(weights_path) if weights_path.suffix == '.safetensors' else None


def _run_config(saved: Optional[Dict[str, Any]], overrides: Dict[str, Any]) -> Dict[str, Any]:
    """Defaults < the run's saved config < command-line model settings, through train.py's converters."""
    config = {key: option.default for key, option in OPTIONS.items()}
    if saved is not None:
        config.update({k: convert_value(k, v) for k, v in saved.items() if k in OPTIONS})
    else:
        config['model_kwargs'] = {}
    kwargs = dict(overrides.pop('model_kwargs', None) or {})
    for key in _CONFIG_KEYS:
        if key in kwargs:
            overrides[key] = kwargs.pop(key)
    for key, value in overrides.items():
        if value is not None:
            config[key] = convert_value(key, value)
    config['model_kwargs'] = {**config['model_kwargs'], **kwargs}
    return config


def _first_conv_and_classifier(name: str) -> tuple[str, str]:
    cfg = timm.models.get_pretrained_cfg(name)
    first = cfg.first_conv if isinstance(cfg.first_conv, str) else cfg.first_conv[0]
    classifier = cfg.classifier if isinstance(cfg.classifier, str) else cfg.classifier[0]
    return first, classifier


def _in_chans(name: str, weights: Dict[str, Tensor]) -> int | None:
    """Input channels of the weights: the pretrained cfg's first conv, or (a stem that replaces it, e.g.
    ``stem='conv'``) the first 4-D weight, the first conv in a state dict's module order; None without either."""
    first, _ = _first_conv_and_classifier(name)
    weight = weights.get(f'{first}.weight')
    if weight is None:
        weight = next((w for w in weights.values() if w.dim() == 4), None)
    return None if weight is None else int(weight.shape[1])


def _build(config: Dict[str, Any], weights: Dict[str, Tensor]) -> nn.Module:
    """The model of ``config`` with ``num_classes``/``in_chans`` taken from the weights."""
    _, classifier = _first_conv_and_classifier(config['model'])
    fixed: Dict[str, Any] = {}
    if f'{classifier}.weight' in weights:
        fixed['num_classes'] = weights[f'{classifier}.weight'].shape[0]
    in_chans = _in_chans(config['model'], weights)
    if in_chans is not None:
        fixed['in_chans'] = in_chans
    try:
        return create_model_from_config(config, **fixed)
    except RuntimeError as e:
        raise ConfigError(f"cannot build model {config['model']!r}: {e}") from None


def load_model(
        checkpoint: str | Path,
        model: Optional[str] = None,
        router: Optional[str] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
        data: Optional[str] = None,
        device: torch.device | str = 'cpu',
) -> LoadedModel:
    """Build and load the model of a run folder / checkpoint file; flags override the run config when given.

    Without a run config, ``model`` is required. The label is the run folder's name (or the file's stem).
    """
    path = Path(checkpoint).expanduser()
    weights_path, config_path = _resolve_files(path)
    saved = _saved_run_config(weights_path, config_path)
    if saved is None and model is None:
        raise ConfigError(f'{weights_path} has no config.yaml beside it and no train.py run config in its metadata: '
                          'pass --model (and --router/--model-kwargs for its MoE settings)')
    overrides = {'model': model, 'router': router, 'model_kwargs': model_kwargs, 'data': data}
    config = _run_config(saved, overrides)
    if not timm.is_model(config['model']):
        data_config_for(config)  # raises the ConfigError with close matches
    weights = read_weights(weights_path)
    net = _build(config, weights)
    config.update(model_settings(net))
    check_state_dict(net, weights, config, str(weights_path))
    net.load_state_dict(weights)
    net.to(device).eval()
    in_chans = _in_chans(config['model'], weights)
    if saved is None and data is None:  # a bare RGB weights file is an ImageNet-style model: its mean/std
        config['data'] = 'fashion_mnist' if in_chans == 1 else 'imagefolder'
    data_config = data_config_for({**config, 'in_chans': in_chans or config['in_chans']})
    label = config_path.parent.name if config_path is not None else weights_path.stem
    return LoadedModel(label=label, model=net, config=config, data_config=data_config, checkpoint=str(weights_path))

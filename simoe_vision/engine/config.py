"""Training configuration: one table of options drives argparse, YAML validation and the saved ``config.yaml``.

Precedence (timm's pattern): built-in defaults < the YAML file(s) < command-line flags. Every value, wherever it came
from, goes through the same converter, so a bad key or value fails before any work starts, with one message naming
the key (and, for an unknown key, the closest valid ones).
"""
from __future__ import annotations

import argparse
import difflib
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import yaml

from ..routers import ROUTERS
from .checkpoint import atomic_write_text

__all__ = ['ConfigError', 'OPTIONS', 'build_parser', 'load_yaml', 'parse_config', 'save_config']


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message names the key and what is accepted."""


# ---- converters: accept a string (command line) or an already-typed YAML value; raise ValueError on bad input ----

def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ('1', 'true', 'yes', 'on'):
        return True
    if text in ('0', 'false', 'no', 'off'):
        return False
    raise ValueError(f'expected true or false, got {value!r}')


def _int(value: Any) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(f'expected an integer, got {value!r}')
    try:
        return int(value)
    except ValueError:
        raise ValueError(f'expected an integer, got {value!r}') from None


def _float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f'expected a number, got {value!r}')
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f'expected a finite number, got {value!r}')
    return out


def _count_or_fraction(value: Any) -> int | float:
    """An item count (integer) or a fraction of the dataset (a number with a decimal point, in (0, 1))."""
    if isinstance(value, str):
        value = float(value) if any(c in value for c in '.eE') else int(value)
    return _float(value) if isinstance(value, float) else _int(value)


def _str(value: Any) -> str:
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise ValueError(f'expected a string, got {value!r}')
    return str(value)


def _scalar(text: str) -> Any:
    """A k=v value: JSON where it parses (numbers, true/false, null, lists), else the raw string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_kwargs(value: Any) -> Dict[str, Any]:
    """A dict from a mapping, a JSON object string, or comma-separated ``k=v`` pairs (values parsed as JSON)."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return dict(value)
    text = str(value).strip()
    if not text:
        return {}
    if text.startswith('{'):
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f'invalid JSON object {text!r}: {e.msg}') from None
        if not isinstance(parsed, dict):
            raise ValueError(f'expected a JSON object, got {text!r}')
        return parsed
    out = {}
    for pair in text.split(','):
        key, sep, val = pair.partition('=')
        if not sep or not key.strip():
            raise ValueError(f"expected a JSON object or comma-separated key=value pairs, got {text!r}")
        out[key.strip()] = _scalar(val.strip())
    return out


def _model_kwargs(value: Any) -> Dict[str, Any]:
    """Model kwargs; None values are refused: timm.create_model drops them, so they would silently do nothing."""
    kwargs = parse_kwargs(value)
    dropped = [k for k, v in kwargs.items() if v is None]
    if dropped:
        raise ValueError(f'{", ".join(dropped)} = null would be dropped by timm.create_model and do nothing; give a '
                         "value (capacity_factor=dropless for no capacity limit) or leave the key out")
    return kwargs


def _float_pair(value: Any) -> List[float]:
    items = value.split(',') if isinstance(value, str) else list(value)
    if len(items) != 2:
        raise ValueError(f'expected two numbers (min,max), got {value!r}')
    return [_float(v) for v in items]


def _optional(convert: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def wrapped(value: Any) -> Any:
        if value is None or (isinstance(value, str) and value.strip().lower() in ('', 'none', 'null')):
            return None
        return convert(value)
    wrapped.__name__ = f'optional {convert.__name__.lstrip("_")}'
    return wrapped


@dataclass(frozen=True)
class Option:
    """One configuration key: its converter, default, help text, allowed choices and a validity check."""

    convert: Callable[[Any], Any]
    default: Any
    help: str
    choices: Optional[Sequence[Any] | Callable[[], Sequence[Any]]] = None  # a callable: looked up when checked
    check: Optional[Callable[[Any], bool]] = None
    requirement: str = ''


def _positive(v: Any) -> bool:
    return v is None or v > 0


def _non_negative(v: Any) -> bool:
    return v is None or v >= 0


def _probability(v: Any) -> bool:
    return 0.0 <= v <= 1.0


OPTIONS: Dict[str, Option] = {
    # model
    'model': Option(_str, 'vmoe_nano_patch4_32', 'timm model name (a registered simoe_vision model)'),
    'router': Option(_optional(_str), None, "router of every MoE layer, a registered name (default: the model's)",
                     choices=lambda: (None, *ROUTERS)),
    'num_experts': Option(_optional(_int), None, "experts per MoE layer (default: the model's)", check=_positive,
                          requirement='> 0'),
    'top_k': Option(_optional(_int), None, "experts per token (default: the model's)", check=_positive,
                    requirement='> 0'),
    'router_kwargs': Option(parse_kwargs, {}, 'router settings: JSON object or k=v,k=v'),
    'model_kwargs': Option(_model_kwargs, {}, 'extra model constructor kwargs: JSON object or k=v,k=v '
                           "(capacity_factor=dropless for no capacity limit)"),
    'drop_path': Option(_float, 0.0, 'stochastic depth rate', check=_probability, requirement='in [0, 1]'),
    'expert_parallel': Option(_int, 1, 'expert-parallel size EP: each process holds E/EP experts of every MoE layer '
                              '(EP must divide the number of processes and of experts)', check=_positive,
                              requirement='> 0'),
    # data
    'data': Option(_str, 'fashion_mnist', 'dataset', choices=('fashion_mnist', 'imagefolder')),
    'data_dir': Option(_optional(_str), None, 'dataset folder (Fashion-MNIST idx files, or train/ + val/ folders)'),
    'in_chans': Option(_optional(_int), None, 'input channels (default: 1 for Fashion-MNIST, 3 otherwise)',
                       check=lambda v: v in (None, 1, 3), requirement='1 or 3'),
    'img_size': Option(_optional(_int), None, "input side (default: the model's)", check=_positive,
                       requirement='> 0'),
    'val_size': Option(_count_or_fraction, 5000, 'validation holdout carved from train for model selection '
                       '(a count, or a fraction like 0.01)', check=lambda v: v > 0 and (isinstance(v, int) or v < 1),
                       requirement='a positive count or a fraction in (0, 1)'),
    'split_seed': Option(_int, 0, 'seed of the train/val split and of the probe set'),
    'train_subset': Option(_optional(_int), None, 'train on a fixed seeded subset of N images', check=_positive,
                           requirement='> 0'),
    'probe_size': Option(_int, 512, 'validation images whose routing is recorded every epoch (fluctuation)',
                         check=_positive, requirement='> 0'),
    'strict_data': Option(_bool, False, 'fail on a corrupt image instead of skipping it'),
    'workers': Option(_int, 2, 'data loader worker processes', check=_non_negative, requirement='>= 0'),
    # augmentation
    'hflip': Option(_float, 0.5, 'horizontal flip probability', check=_probability, requirement='in [0, 1]'),
    'color_jitter': Option(_float, 0.0, 'color jitter strength (RGB only)', check=_non_negative,
                           requirement='>= 0'),
    'scale': Option(_float_pair, [0.08, 1.0], 'random-resized-crop scale range (large images)',
                    check=lambda v: 0 < v[0] <= v[1] <= 1, requirement='0 < min <= max <= 1'),
    'crop_padding': Option(_optional(_int), None, 'small images: zero-pad by this many px and random-crop back '
                           '(default: side // 8; 0: no crop)', check=_non_negative, requirement='>= 0'),
    'mixup': Option(_float, 0.0, 'mixup alpha (0: off)', check=_non_negative, requirement='>= 0'),
    'cutmix': Option(_float, 0.0, 'cutmix alpha (0: off)', check=_non_negative, requirement='>= 0'),
    'mixup_prob': Option(_float, 1.0, 'probability of applying mixup/cutmix to a batch', check=_probability,
                         requirement='in [0, 1]'),
    'smoothing': Option(_float, 0.1, 'label smoothing', check=lambda v: 0 <= v < 1, requirement='in [0, 1)'),
    # optimisation
    'epochs': Option(_int, 10, 'epochs of the schedule', check=_positive, requirement='> 0'),
    'stop_after': Option(_optional(_int), None, 'stop after this many epochs of the schedule (resume later)',
                         check=_positive, requirement='> 0'),
    'batch_size': Option(_int, 128, 'batch size per process', check=_positive, requirement='> 0'),
    'eval_batch_size': Option(_optional(_int), None, 'evaluation batch size (default: 2 x batch size)',
                              check=_positive, requirement='> 0'),
    'opt': Option(_str, 'adamw', 'optimizer (timm create_optimizer_v2 name)'),
    'opt_kwargs': Option(parse_kwargs, {}, "optimizer constructor kwargs: JSON object or k=v,k=v (e.g. fused=true: "
                         "torch's fused AdamW kernel, also on CPU)"),
    'lr': Option(_float, 1e-3, 'peak learning rate', check=_positive, requirement='> 0'),
    'min_lr': Option(_float, 1e-5, 'final learning rate of the cosine schedule', check=_non_negative,
                     requirement='>= 0'),
    'warmup_epochs': Option(_float, 1.0, 'linear warmup length in epochs', check=_non_negative, requirement='>= 0'),
    'warmup_lr': Option(_float, 1e-6, 'learning rate at the start of warmup', check=_non_negative,
                        requirement='>= 0'),
    'weight_decay': Option(_float, 0.05, 'AdamW weight decay (not on norms and biases)', check=_non_negative,
                           requirement='>= 0'),
    'clip_grad': Option(_optional(_float), 1.0, 'gradient-norm clipping (none: off)', check=_positive,
                        requirement='> 0'),
    'model_ema': Option(_bool, False, 'keep an EMA of the weights (evaluated and selected instead of the raw ones)'),
    'model_ema_decay': Option(_float, 0.9998, 'EMA decay per step', check=lambda v: 0 < v < 1,
                              requirement='in (0, 1)'),
    'amp': Option(_str, 'none', 'mixed precision', choices=('none', 'bf16')),
    'seed': Option(_int, 0, 'random seed (weights, shuffling, augmentation)'),
    # output
    'output': Option(_str, 'runs', 'parent folder of run folders'),
    'experiment': Option(_optional(_str), None, 'run folder name (default: model-router-data-timestamp)'),
    'resume': Option(_optional(_str), None, 'resume from a run folder or a checkpoint (.pt)'),
    'progress': Option(_bool, True, 'show progress bars'),
}


def _fail_unknown(key: str, where: str) -> None:
    close = difflib.get_close_matches(key, list(OPTIONS), n=3, cutoff=0.6)
    hint = f'; did you mean {", ".join(close)}?' if close else f'; valid keys: {", ".join(OPTIONS)}'
    raise ConfigError(f'unknown config key {key!r} in {where}{hint}')


def convert_value(key: str, value: Any) -> Any:
    """Convert and check one value for ``key``; raises ConfigError naming the key and what it accepts."""
    if key not in OPTIONS:
        _fail_unknown(key, 'the configuration')
    option = OPTIONS[key]
    try:
        out = option.convert(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f'invalid value {value!r} for {key}: {e}') from None
    choices = option.choices() if callable(option.choices) else option.choices
    if choices is not None and out not in choices:
        names = [str(c) for c in choices if c is not None]
        close = difflib.get_close_matches(str(out), names, n=1)
        hint = f' (did you mean {close[0]!r}?)' if close else ''
        raise ConfigError(f'invalid value {value!r} for {key}: choose one of {", ".join(names)}{hint}')
    if option.check is not None and out is not None and not option.check(out):
        raise ConfigError(f'invalid value {value!r} for {key}: must be {option.requirement}')
    return out


def load_yaml(path: str | Path) -> Dict[str, Any]:
    """Read a YAML mapping of config keys (dashes or underscores), converting and checking every value."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f'config file {path} does not exist')
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f'config file {path} is not valid YAML: {e}') from None
    if not isinstance(data, dict):
        raise ConfigError(f'config file {path} must hold a mapping of keys to values, got {type(data).__name__}')
    out = {}
    for key, value in data.items():
        name = str(key).replace('-', '_')
        if name not in OPTIONS:
            _fail_unknown(str(key), str(path))
        out[name] = convert_value(name, value)
    return out


class _Parser(argparse.ArgumentParser):
    """argparse that raises ConfigError (one message, close matches) instead of printing usage and exiting."""

    def error(self, message: str) -> None:
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(description='Train a sparse MoE vision transformer.', allow_abbrev=False,
                     argument_default=argparse.SUPPRESS)
    parser.add_argument('-c', '--config', action='append', default=[], help='YAML config file(s); later ones win')
    for key, option in OPTIONS.items():
        flag = '--' + key.replace('_', '-')
        if option.convert is _bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=option.help)
        else:
            parser.add_argument(flag, type=str, metavar=key.upper(), help=f'{option.help} (default: {option.default})')
    return parser


def parse_config(argv: Optional[Sequence[str]] = None, base: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Resolve the configuration: defaults < ``base`` (e.g. a resumed run's config) < ``-c`` YAML files < flags."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        flag = unknown[0].split('=')[0]
        if flag.startswith('--'):
            _fail_unknown(flag[2:].replace('-', '_'), 'the command line')
        argv = list(argv if argv is not None else sys.argv[1:])
        before = argv[argv.index(unknown[0]) - 1] if unknown[0] in argv[1:] else ''
        switch = before.lstrip('-').replace('-', '_').removeprefix('no_')
        if before.startswith('--') and switch in OPTIONS and OPTIONS[switch].convert is _bool:
            raise ConfigError(f'{before} is a switch and takes no value: use --{switch.replace("_", "-")} or '
                              f'--no-{switch.replace("_", "-")}')
        raise ConfigError(f'unexpected argument {unknown[0]!r}; options are --key value pairs')
    config = {key: option.default for key, option in OPTIONS.items()}
    for key, value in (base or {}).items():
        if key not in OPTIONS:
            _fail_unknown(key, 'the resumed run config')
        config[key] = convert_value(key, value)
    for path in vars(args).pop('config', []):
        config.update(load_yaml(path))
    for key, value in vars(args).items():
        if key != 'config':
            config[key] = convert_value(key, value)
    return check_config(config)


def check_config(config: Dict[str, Any]) -> Dict[str, Any]:
    """Checks across keys (each key alone was checked on conversion)."""
    if config['top_k'] is not None and config['num_experts'] is not None and config['top_k'] > config['num_experts']:
        raise ConfigError(f"invalid value {config['top_k']} for top_k: must be <= num_experts "
                          f"({config['num_experts']})")
    if config['num_experts'] is not None and config['num_experts'] % config['expert_parallel']:
        raise ConfigError(f"invalid value {config['expert_parallel']} for expert_parallel: must divide num_experts "
                          f"({config['num_experts']})")
    if config['data'] == 'imagefolder' and not config['data_dir']:
        raise ConfigError("data_dir is required for data 'imagefolder' (a folder holding train/ and val/)")
    if config['stop_after'] is not None and config['stop_after'] > config['epochs']:
        raise ConfigError(f"invalid value {config['stop_after']} for stop_after: must be <= epochs "
                          f"({config['epochs']})")
    if config['min_lr'] > config['lr']:
        raise ConfigError(f"invalid value {config['min_lr']} for min_lr: must be <= lr ({config['lr']})")
    return config


def save_config(config: Dict[str, Any], path: str | Path) -> None:
    """Write the resolved configuration as YAML (loadable with ``-c``), atomically."""
    atomic_write_text(path, yaml.safe_dump(dict(config), sort_keys=False))

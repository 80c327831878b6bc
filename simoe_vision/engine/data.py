"""Datasets and loaders of a training run: train, validation (model selection), routing probe, test."""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Dict, Optional

import timm
from torch.utils.data import DataLoader, Dataset, Subset

from ..data import (
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    build_dataset,
    build_loader,
    eval_transforms,
    fixed_subset,
    train_transforms,
)
from .config import ConfigError
from .distributed import DistEnv

__all__ = ['RunData', 'base_dataset', 'build_run_data', 'data_config_for']


def base_dataset(dataset: Dataset) -> Dataset:
    """The dataset under any ``Subset`` wrappers (where the transform lives)."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset


def data_config_for(config: Dict[str, Any]) -> Dict[str, Any]:
    """timm-style data config (input_size, mean, std, interpolation, crop_pct, crop_mode) from the model's
    pretrained cfg, with the run's channels/size; Fashion-MNIST uses its own mean/std."""
    name = config['model']
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f'; did you mean {", ".join(close)}?' if close else ''
        raise ConfigError(f'invalid value {name!r} for model: not a registered timm model{hint}')
    cfg = timm.models.get_pretrained_cfg(name).to_dict()
    in_chans = config['in_chans'] or (1 if config['data'] == 'fashion_mnist' else 3)
    side = config['img_size'] or cfg['input_size'][-1]
    out = {'input_size': (in_chans, side, side), 'interpolation': cfg.get('interpolation', 'bicubic'),
           'crop_pct': cfg.get('crop_pct', 0.875), 'crop_mode': cfg.get('crop_mode', 'center'),
           'mean': cfg['mean'], 'std': cfg['std']}
    if config['data'] == 'fashion_mnist':
        out['mean'], out['std'] = FASHION_MNIST_MEAN, FASHION_MNIST_STD
    elif in_chans == 1:
        out['mean'], out['std'] = (sum(out['mean']) / 3,), (sum(out['std']) / 3,)
    return out


@dataclass
class RunData:
    train: DataLoader
    val: DataLoader
    probe: DataLoader
    test: Optional[DataLoader]
    num_classes: int
    data_config: Dict[str, Any]


def build_run_data(config: Dict[str, Any], env: DistEnv) -> RunData:
    """Build every dataset and loader (fails fast with the data package's errors if data are missing)."""
    data_config = data_config_for(config)
    in_chans, side = data_config['input_size'][0], data_config['input_size'][-1]
    train_tf = train_transforms(side, in_chans, data_config['mean'], data_config['std'], scale=tuple(config['scale']),
                                hflip=config['hflip'], color_jitter=config['color_jitter'],
                                crop_padding=config['crop_padding'], interpolation=data_config['interpolation'])
    eval_tf = eval_transforms(data_config)
    common = dict(name=config['data'], data_dir=config['data_dir'], strict=config['strict_data'],
                  val_size=config['val_size'], split_seed=config['split_seed'])
    train_set = build_dataset(split='train', transform=train_tf, **common)
    val_set = build_dataset(split='val', transform=eval_tf, **common)
    test_set = build_dataset(split='test', transform=eval_tf, **common)
    classes = getattr(base_dataset(train_set), 'classes', None)
    num_classes = len(classes) if classes is not None else 10
    if config['train_subset']:
        train_set = fixed_subset(train_set, config['train_subset'], seed=config['split_seed'])
    if len(train_set) < config['batch_size'] * env.world_size:
        raise ConfigError(f"invalid value {config['batch_size']} for batch_size: the training set holds only "
                          f'{len(train_set)} images for {env.world_size} process(es); lower batch_size')
    eval_batch = config['eval_batch_size'] or 2 * config['batch_size']
    workers = config['workers']
    dist_kw = dict(distributed=env.distributed, num_replicas=env.world_size if env.distributed else None,
                   rank=env.rank if env.distributed else None)
    return RunData(
        train=build_loader(train_set, config['batch_size'], train=True, workers=workers, seed=config['seed'],
                           **dist_kw),
        val=build_loader(val_set, eval_batch, train=False, workers=workers, **dist_kw),
        probe=build_loader(fixed_subset(val_set, config['probe_size'], seed=config['split_seed']), eval_batch,
                           train=False, workers=0),
        # rank 0 tests the best weights; with sharded experts every process joins (each forward is collective)
        test=(build_loader(test_set, eval_batch, train=False, workers=workers)
              if env.is_main or config['expert_parallel'] > 1 else None),
        num_classes=num_classes,
        data_config=data_config,
    )

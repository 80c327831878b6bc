"""Training engine behind ``train.py``: config, data, loop, checkpoints, distributed helpers and display."""
from .checkpoint import CheckpointError, atomic_write, load_checkpoint, resolve_checkpoint, save_checkpoint
from .config import OPTIONS, ConfigError, load_yaml, parse_config, parse_kwargs, save_config
from .loop import NonFiniteLossError, evaluate, train_one_epoch
from .runner import epoch_row, fluctuation_report, main, run

__all__ = ['CheckpointError', 'ConfigError', 'NonFiniteLossError', 'OPTIONS', 'atomic_write', 'epoch_row',
           'evaluate', 'fluctuation_report', 'load_checkpoint', 'load_yaml', 'main', 'parse_config', 'parse_kwargs',
           'resolve_checkpoint', 'run', 'save_checkpoint', 'save_config', 'train_one_epoch']

"""Checkpoints: model weights as safetensors plus a ``weights_only``-loadable training state, written atomically.

A checkpoint ``TAG`` is the pair ``TAG.safetensors`` (model weights; the epoch and the run config in its metadata) and
``TAG.pt`` (optimizer, scheduler, epoch, RNG states, fluctuation tracker, best metric, EMA). Each file is written to
a temporary file in the same folder and moved into place with ``os.replace``, so a crash mid-write leaves the
previous checkpoint untouched. The ``.pt`` is written last and names its epoch, so a mismatched pair is detected on
load.
"""
from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

__all__ = ['CheckpointError', 'atomic_write', 'capture_rng', 'load_checkpoint', 'resolve_checkpoint',
           'restore_rng', 'save_checkpoint', 'save_weights', 'saved_config']


CONFIG_METADATA_KEY = 'simoe_vision.config'


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or inconsistent; the message names the file."""


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then move the result onto ``path``; on any error ``path`` is left as it was."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def capture_rng() -> Dict[str, Any]:
    """Python, numpy and torch RNG states as tensors and plain containers (``weights_only``-safe)."""
    np_state = np.random.get_state()
    state = {
        'python': list(random.getstate()[1]),
        'python_pos': random.getstate()[2],
        'numpy': torch.from_numpy(np_state[1].astype(np.int64)),
        'numpy_pos': int(np_state[2]),
        'torch': torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Dict[str, Any]) -> None:
    random.setstate((3, tuple(int(v) for v in state['python']), state['python_pos']))
    np.random.set_state(('MT19937', state['numpy'].numpy().astype(np.uint32), int(state['numpy_pos']), 0, 0.0))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def _weights(model: nn.Module) -> Dict[str, torch.Tensor]:
    # safetensors refuses shared or non-contiguous storage: give each tensor its own contiguous copy
    return {k: v.detach().to('cpu').contiguous().clone() for k, v in model.state_dict().items()}


def save_weights(model: nn.Module, path: str | Path, epoch: int, config: Optional[Dict[str, Any]] = None) -> None:
    """Model weights as safetensors, atomically, with ``epoch`` and the run ``config`` (JSON) in the metadata: a
    weights file copied out of its run folder still says which model, router and MoE settings it needs."""
    tensors = _weights(model)
    metadata = {'epoch': str(epoch)}
    if config is not None:
        metadata[CONFIG_METADATA_KEY] = json.dumps(config, sort_keys=True, default=str)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def saved_config(path: str | Path) -> Optional[Dict[str, Any]]:
    """The run config stored in a safetensors file's metadata by :func:`save_weights`, or None."""
    try:
        with safe_open(str(path), framework='pt') as f:
            text = (f.metadata() or {}).get(CONFIG_METADATA_KEY)
    except Exception as e:  # noqa: BLE001 - any read failure means the file is unusable
        raise CheckpointError(f'cannot read weights {path}: {e}') from None
    return json.loads(text) if text else None


def save_checkpoint(run_dir: str | Path, tag: str, model: nn.Module, state: Dict[str, Any],
                    config: Optional[Dict[str, Any]] = None) -> Path:
    """Write ``run_dir/TAG.safetensors`` (with ``config`` in its metadata) then ``run_dir/TAG.pt`` (``state`` must
    hold 'epoch'); returns the .pt."""
    run_dir = Path(run_dir)
    save_weights(model, run_dir / f'{tag}.safetensors', state['epoch'], config)
    pt = run_dir / f'{tag}.pt'
    atomic_write(pt, lambda tmp: torch.save(state, tmp))
    return pt


def resolve_checkpoint(path: str | Path) -> Path:
    """The ``.pt`` of a run folder (its ``last.pt``), a ``.pt`` file, or the ``.pt`` beside a ``.safetensors``."""
    path = Path(path)
    if path.is_dir():
        path = path / 'last.pt'
    elif path.suffix == '.safetensors':
        path = path.with_suffix('.pt')
    if not path.is_file():
        raise CheckpointError(f'checkpoint {path} does not exist; pass a run folder holding last.pt, or a .pt file')
    return path


def load_checkpoint(path: str | Path, model: Optional[nn.Module] = None) -> Tuple[Dict[str, Any], Path]:
    """Load a training state (``weights_only=True``) and, into ``model``, the weights beside it.

    Returns ``(state, pt_path)``. Raises CheckpointError if a file is unreadable or the pair's epochs differ.
    """
    pt = resolve_checkpoint(path)
    try:
        state = torch.load(pt, map_location='cpu', weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the file is unusable
        raise CheckpointError(f'cannot read checkpoint {pt}: {e}') from None
    if model is not None:
        weights_path = pt.with_suffix('.safetensors')
        try:
            with safe_open(str(weights_path), framework='pt') as f:
                epoch = (f.metadata() or {}).get('epoch')
            weights = load_file(str(weights_path))
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f'cannot read weights {weights_path}: {e}') from None
        if epoch != str(state['epoch']):
            raise CheckpointError(f'{weights_path} holds epoch {epoch} but {pt} epoch {state["epoch"]}: the pair is '
                                  'inconsistent (interrupted write?); resume from another checkpoint')
        model.load_state_dict(weights)
    return state, pt

"""Checkpoints: model weights as safetensors plus a ``weights_only``-loadable training state, saved as one unit.

A checkpoint ``TAG`` is the pair ``TAG.safetensors`` (model weights; the epoch, a save id and the run config in its
metadata) and ``TAG.pt`` (optimizer, epoch, RNG states, fluctuation tracker, best metric, EMA and the same save id).
Every file is written to a temporary file, fsynced and renamed into place, and a save never touches the committed
pair before the new one is whole on disk:

1. stage: ``TAG.next.safetensors``, then ``TAG.next.pt``; the rename of ``TAG.next.pt`` commits the checkpoint;
2. roll forward: rename ``TAG.next.safetensors`` onto ``TAG.safetensors``, then ``TAG.next.pt`` onto ``TAG.pt``.

So a process killed at any instant leaves either the previous pair (nothing staged, or a staged pair without its
``.pt``) or the new one (committed, perhaps not rolled forward yet). :func:`committed_files` names the committed
pair without touching the folder; :func:`recover_run_folder` finishes or discards what a killed save left. ``best``
is staged before ``last`` and is committed only by ``last``'s state naming its save id (:func:`stage_checkpoint`,
then :func:`commit_checkpoint` once ``last`` is saved), so a run never records a best that is not on disk.
"""
from __future__ import annotations

import errno
import json
import os
import random
import re
import tempfile
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

__all__ = ['BEST', 'CheckpointError', 'DiskFullError', 'INTERRUPTED', 'LAST', 'SAVE_ID', 'atomic_write',
           'atomic_write_text', 'capture_rng', 'checkpoint_tag', 'commit_checkpoint', 'committed_files',
           'describe_load_failure', 'discard_staged', 'is_disk_full', 'load_checkpoint', 'new_save_id',
           'recover_run_folder', 'resolve_checkpoint', 'restore_rng', 'safe_load', 'save_checkpoint', 'save_weights',
           'saved_config', 'stage_checkpoint', 'weights_metadata']

CONFIG_METADATA_KEY = 'simoe_vision.config'
SAVE_ID = 'save_id'  # key of the save id in the weights' metadata and in the training state
LAST, BEST, INTERRUPTED = 'last', 'best', 'interrupted'
STAGED = 'next'  # staged pair: TAG.next.safetensors + TAG.next.pt
Weights = Union[nn.Module, Mapping[str, torch.Tensor]]  # a model, or its state dict (e.g. gathered from processes)


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or inconsistent; the message names the file."""


class DiskFullError(OSError):
    """A file could not be written because its file system is full (or over quota); names the file."""


def is_disk_full(error: BaseException) -> bool:
    """True for an out-of-space failure: ENOSPC/EDQUOT, or how torch.save ('unexpected pos') and safetensors
    ('os error 28') report a short write."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error)
    return 'unexpected pos' in text or 'No space left on device' in text or 'os error 28' in text


def _file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_FILE_MODE = _file_mode()  # what open() would give a new file (mkstemp's temp files are private: 0600)


def _remove(path: str | Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _fsync(path: str | Path) -> None:
    """Flush a file's (or a folder's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)``, fsync it and move it onto ``path``: ``path`` is the old file or the new one, never
    a part. On any error ``path`` is left as it was and the temporary file removed; a full disk raises
    :class:`DiskFullError` naming ``path``."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
        os.close(fd)
        write(tmp)
        os.chmod(tmp, _FILE_MODE)  # after write: a writer may replace the file
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    except BaseException as e:
        if tmp is not None:
            _remove(tmp)
        if is_disk_full(e) and not isinstance(e, DiskFullError):
            raise DiskFullError(errno.ENOSPC, 'No space left on device', str(path)) from None
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


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


def new_save_id() -> str:
    """A fresh id tying a weights file to its training state."""
    return uuid.uuid4().hex


def _weights(model: Weights) -> Dict[str, torch.Tensor]:
    # safetensors refuses shared or non-contiguous storage: give each tensor its own contiguous copy
    state = model if isinstance(model, Mapping) else model.state_dict()
    return {k: v.detach().to('cpu').contiguous().clone() for k, v in state.items()}


def save_weights(model: Weights, path: str | Path, epoch: int, config: Optional[Dict[str, Any]] = None,
                 save_id: Optional[str] = None) -> None:
    """Model weights (a model or a state dict) as safetensors, atomically, with ``epoch``, ``save_id`` and the run
    ``config`` (JSON) in the metadata: a weights file copied out of its run folder still says which model, router and
    MoE settings it needs."""
    tensors = _weights(model)
    metadata = {'epoch': str(epoch)}
    if save_id is not None:
        metadata[SAVE_ID] = save_id
    if config is not None:
        metadata[CONFIG_METADATA_KEY] = json.dumps(config, sort_keys=True, default=str)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def weights_metadata(path: str | Path) -> Dict[str, str]:
    """The metadata of a safetensors file; CheckpointError if it cannot be read."""
    try:
        with safe_open(str(path), framework='pt') as f:
            return dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001 - any read failure means the file is unusable
        raise CheckpointError(f'cannot read weights {path}: {e}') from None


def saved_config(path: str | Path) -> Optional[Dict[str, Any]]:
    """The run config stored in a safetensors file's metadata by :func:`save_weights`, or None."""
    text = weights_metadata(path).get(CONFIG_METADATA_KEY)
    return json.loads(text) if text else None


def checkpoint_tag(path: str | Path) -> str:
    """The checkpoint ``TAG`` of ``TAG.pt``, ``TAG.safetensors`` or their staged ``TAG.next.*``."""
    name = Path(path).name
    for suffix in ('.safetensors', '.pt', f'.{STAGED}'):
        name = name.removesuffix(suffix)
    return name


def _paths(folder: Path, tag: str, staged: bool = False) -> Tuple[Path, Path]:
    stem = f'{tag}.{STAGED}' if staged else tag
    return folder / f'{stem}.safetensors', folder / f'{stem}.pt'


def discard_staged(folder: str | Path, tag: str) -> None:
    """Remove a staged pair of ``TAG`` that is not to be committed (its .pt first: that un-commits it)."""
    for path in reversed(_paths(Path(folder), tag, staged=True)):
        _remove(path)


def stage_checkpoint(folder: str | Path, tag: str, model: Weights, state: Dict[str, Any],
                     config: Optional[Dict[str, Any]] = None, save_id: Optional[str] = None) -> str:
    """Write ``TAG.next.safetensors`` then ``TAG.next.pt`` (``state`` must hold 'epoch'), both carrying ``save_id``
    (default: a new one, returned). On any error the staged files are removed: the committed pair is untouched."""
    folder = Path(folder)
    save_id = save_id or new_save_id()
    weights, pt = _paths(folder, tag, staged=True)
    discard_staged(folder, tag)  # the uncommitted leftover of an interrupted save
    try:
        save_weights(model, weights, state['epoch'], config, save_id)
        atomic_write(pt, lambda tmp: torch.save({**state, SAVE_ID: save_id}, tmp))
    except BaseException:
        discard_staged(folder, tag)
        raise
    return save_id


def commit_checkpoint(folder: str | Path, tag: str) -> Path:
    """Roll a staged pair forward onto ``TAG.safetensors`` and ``TAG.pt``; returns the .pt."""
    folder = Path(folder)
    (staged_weights, staged_pt), (weights, pt) = _paths(folder, tag, staged=True), _paths(folder, tag)
    if staged_weights.exists():  # absent when a previous roll forward was interrupted after moving it
        os.replace(staged_weights, weights)
    os.replace(staged_pt, pt)
    _fsync(folder)
    return pt


def save_checkpoint(run_dir: str | Path, tag: str, model: Weights, state: Dict[str, Any],
                    config: Optional[Dict[str, Any]] = None, save_id: Optional[str] = None) -> Path:
    """Stage and commit ``run_dir/TAG.{safetensors,pt}`` (``config`` in the weights' metadata); returns the .pt."""
    stage_checkpoint(run_dir, tag, model, state, config, save_id)
    return commit_checkpoint(run_dir, tag)


def safe_load(path: str | Path) -> Any:
    """``torch.load(weights_only=True)`` on the CPU, without torch's warnings about odd files (the caller reports
    a failure in one line: :func:`describe_load_failure`)."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return torch.load(path, map_location='cpu', weights_only=True)


def _read_state(pt: Path) -> Dict[str, Any]:
    try:
        return safe_load(pt)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the file is unusable
        raise CheckpointError(f'cannot read checkpoint {pt}: {describe_load_failure(e)}') from None


def _staged_is_committed(folder: Path, tag: str) -> bool:
    """Whether the staged pair of ``TAG`` (its .pt exists) is committed: always, except a staged ``best`` whose
    weights are still staged: that one only once the committed ``last`` names its save id."""
    staged_weights, _ = _paths(folder, tag, staged=True)
    if tag != BEST or not staged_weights.is_file():
        return True
    last = committed_files(folder, LAST)
    if last is None:
        return False
    recorded = _read_state(last[1]).get('best', {}).get(SAVE_ID)
    return recorded is not None and recorded == weights_metadata(staged_weights).get(SAVE_ID)


def committed_files(folder: str | Path, tag: str) -> Optional[Tuple[Path, Path]]:
    """The committed (weights, state) files of checkpoint ``TAG`` in ``folder``, or None; reads, never writes."""
    folder = Path(folder)
    (staged_weights, staged_pt), (weights, pt) = _paths(folder, tag, staged=True), _paths(folder, tag)
    if staged_pt.is_file() and _staged_is_committed(folder, tag):
        return (staged_weights if staged_weights.is_file() else weights), staged_pt
    return (weights, pt) if pt.is_file() else None


def recover_run_folder(folder: str | Path) -> None:
    """Finish the saves a killed process committed, discard the ones it did not, and remove its temporary files.
    Only the process that writes ``folder`` may call this (``last`` first: a staged best's fate depends on it)."""
    folder = Path(folder)
    for tag in (LAST, BEST, INTERRUPTED):
        if _paths(folder, tag, staged=True)[1].is_file() and _staged_is_committed(folder, tag):
            commit_checkpoint(folder, tag)
        else:
            discard_staged(folder, tag)
    for tmp in folder.glob('.*.tmp'):
        _remove(tmp)


def resolve_checkpoint(path: str | Path) -> Path:
    """The committed ``.pt`` of a run folder (its ``last``), of a ``TAG.pt`` file, or beside a ``TAG.safetensors``."""
    path = Path(path)
    folder, tag = (path, LAST) if path.is_dir() else (path.parent, checkpoint_tag(path))
    files = committed_files(folder, tag)
    if files is None:
        raise CheckpointError(f'checkpoint {folder / (tag + ".pt")} does not exist; pass a run folder holding '
                              'last.pt, or a .pt file')
    return files[1]


def describe_load_failure(error: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` failed, in one line and without torch's advice to load unsafely."""
    unsafe = re.search(r'Unsupported global: GLOBAL (\S+)', str(error))
    if unsafe:
        return (f'it holds a pickled {unsafe.group(1)}, which a safe load (weights_only=True) refuses to run; save '
                'the tensors alone (torch.save(model.state_dict(), path)) or as .safetensors')
    if isinstance(error, OSError) and error.errno not in (None, errno.EINVAL):
        return error.strerror or str(error)
    return 'not a PyTorch file of tensors (empty, truncated, corrupt or another format)'


def load_checkpoint(path: str | Path, model: Optional[nn.Module] = None,
                    save_id: Optional[str] = None) -> Tuple[Dict[str, Any], Path]:
    """Load a committed training state (``weights_only=True``) and, into ``model``, the weights saved with it.

    Returns ``(state, pt_path)``. Raises CheckpointError if a file is unreadable, the pair was not saved together,
    or (with ``save_id``) the checkpoint is not that save.
    """
    pt = resolve_checkpoint(path)
    state = _read_state(pt)
    if save_id is not None and state.get(SAVE_ID) != save_id:
        raise CheckpointError(f'{pt} is not the checkpoint the run recorded (save {state.get(SAVE_ID)}, expected '
                              f'{save_id}); evaluate another checkpoint or retrain')
    if model is not None:
        weights_path = committed_files(pt.parent, checkpoint_tag(pt))[0]
        metadata = weights_metadata(weights_path)
        saved = (metadata.get(SAVE_ID), state.get(SAVE_ID)) if SAVE_ID in state else (metadata.get('epoch'),
                                                                                      str(state['epoch']))
        if saved[0] != saved[1]:
            raise CheckpointError(f'{weights_path} and {pt} were not saved together (a copy mixed two saves?); '
                                  'resume from another checkpoint')
        try:
            weights = load_file(str(weights_path))
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f'cannot read weights {weights_path}: {e}') from None
        model.load_state_dict(weights)
    return state, pt

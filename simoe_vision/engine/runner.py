"""The training job: resolve the config, build data and model, train epoch by epoch with checkpoints and routing
metrics, then evaluate the best checkpoint on the test set. ``main(argv)`` is what ``train.py`` runs."""
from __future__ import annotations

import csv
import io
import json
import random
import signal
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import yaml
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel

from ..data import ClassFoldersMismatchError, CorruptImageError, DatasetNotFoundError, IdxFormatError
from ..layers import exclude_from_ddp, gather_optimizer_state, gather_state_dict, shard_optimizer_state
from ..metrics import FluctuationTracker, RoutingRecorder
from ..models import count_params
from ..perf.hardware import BF16_FALLBACK_HINT, describe_device, has_fast_bf16_matmul
from ..routers.diagnostics import DIAGNOSTICS
from .checkpoint import (
    BEST,
    INTERRUPTED,
    LAST,
    SAVE_ID,
    CheckpointError,
    atomic_write_text,
    capture_rng,
    checkpoint_tag,
    commit_checkpoint,
    committed_files,
    discard_staged,
    is_disk_full,
    load_checkpoint,
    new_save_id,
    recover_run_folder,
    restore_rng,
    save_checkpoint,
    stage_checkpoint,
    weights_metadata,
)
from .config import ConfigError, convert_value, parse_config, save_config
from .data import RunData, base_dataset, build_run_data
from .display import Display
from .distributed import DistEnv, cleanup_distributed, init_distributed, is_collective_failure, lost_ranks_message
from .loop import NonFiniteLossError, divergence_hint, evaluate, record_probe, train_one_epoch
from .model_factory import create_model_from_config, model_settings

__all__ = ['StopSignal', 'epoch_row', 'fluctuation_report', 'main', 'run']

EXIT_ERROR = 1  # training failed: non-finite loss or weights, full disk, a lost DDP process
EXIT_USAGE = 2  # bad config or data: nothing was trained
INVOCATION_KEYS = ('resume', 'stop_after')  # settings of one invocation that a resumed run does not inherit
# settings a resumed run may change; they apply from the resumed epoch on (the lr schedule is recomputed from the
# step count). Any other change (model, data split, batch size, optimizer, seed, ...) is refused.
RESUME_APPLIED = ('epochs', 'lr', 'min_lr', 'warmup_epochs', 'warmup_lr', 'clip_grad', 'drop_path', 'hflip',
                  'color_jitter', 'scale', 'crop_padding', 'mixup', 'cutmix', 'mixup_prob', 'smoothing',
                  'model_ema_decay', 'amp', 'eval_batch_size', 'workers', 'strict_data', 'data_dir', 'progress',
                  'expert_parallel')
RESUME_UNREPORTED = ('progress',)
MID_EPOCH = 'mid_epoch'  # training-state key of a checkpoint saved mid-epoch (interrupted.pt)


class StopSignal:
    """Turns the first SIGTERM/SIGINT into a request the loop polls (save, then exit); a second one kills."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: Dict[int, Any] = {}

    def install(self) -> StopSignal:
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum
        self.uninstall()

    def __call__(self) -> bool:
        return self.signum is not None


def _reseed(config: Dict[str, Any], epoch: int, env: DistEnv, data: RunData) -> None:
    """Seed every RNG from (seed, epoch, rank) so an epoch's randomness does not depend on how the run got there
    (exact resume). Albumentations keeps its own RNG per pipeline: reseeded here too (in-process loading)."""
    seed = (config['seed'] * 1_000_003 + epoch * 7919 + env.rank) % 2 ** 31
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    data.train.generator.manual_seed(seed)
    if data.train.num_workers == 0:
        transform = getattr(base_dataset(data.train.dataset), 'transform', None)
        if hasattr(transform, 'reseed'):
            transform.reseed(seed)
    if hasattr(data.train.sampler, 'set_epoch'):
        data.train.sampler.set_epoch(epoch)


def _layer_mean(routing: Dict[str, Dict[str, Any]], key: str) -> Optional[float]:
    """Mean of a per-layer routing value over the MoE layers that report it; None when none does."""
    values = [routing[n][key] for n in routing if routing[n].get(key) is not None]
    return float(np.mean(values)) if values else None


def epoch_row(epoch: int, train: Dict[str, Any], val: Dict[str, float], fluctuation: Dict[str, float],
              epoch_time: float) -> Dict[str, Any]:
    """One flat metrics row: means over MoE layers plus per-layer columns ``load_cv.LAYER`` etc."""
    routing = RoutingRecorder.summarize(train['routing'])
    layers = list(routing)
    row: Dict[str, Any] = {
        'epoch': epoch, 'train_loss': train['train_loss'], 'aux_loss': train['aux_loss'],
        'val_top1': val['top1'], 'val_top5': val['top5'], 'val_loss': val['loss'], 'val_images': val['images'],
        'lr': train['lr'],
        'load_cv': float(np.mean([routing[n]['load_cv'] for n in layers])) if layers else None,
        'dropped': float(np.mean([routing[n]['dropped_fraction'] for n in layers])) if layers else None,
        **{key: _layer_mean(routing, key) for key in DIAGNOSTICS},
        'fluctuation': fluctuation.get('mean'),
        'epoch_time': epoch_time, 'train_images': train['images'], 'skipped_images': train['skipped'] + val['skipped'],
    }
    for name in layers:
        row[f'load_cv.{name}'] = routing[name]['load_cv']
        row[f'dropped.{name}'] = routing[name]['dropped_fraction']
        for key in DIAGNOSTICS:
            row[f'{key}.{name}'] = routing[name].get(key)
        row[f'fluctuation.{name}'] = fluctuation.get(name)
    return row


def fluctuation_report(tracker: FluctuationTracker) -> Dict[str, Any]:
    """Curves per layer and the last-fluctuation-epoch distribution of the probe tokens (counts and CDF)."""
    last = tracker.last_fluctuation_epochs()
    epochs = list(tracker.epochs)
    counts = [int((last == e).sum()) for e in epochs]
    total = max(int(last.numel()), 1)
    cdf = np.cumsum(counts) / total
    return {'epochs': epochs, 'curves': tracker.curves(), 'curve_epochs': epochs[1:],
            'last_fluctuation_epoch': {'epoch': epochs, 'count': counts, 'cdf': cdf.tolist(), 'tokens': total}}


def _write_metrics(run_dir: Path, rows: List[Dict[str, Any]]) -> None:
    """``metrics.jsonl`` (one JSON object per epoch) and ``summary.csv`` (same rows, flat columns), atomically."""
    atomic_write_text(run_dir / 'metrics.jsonl', ''.join(json.dumps(r) + '\n' for r in rows))
    columns: List[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    table = io.StringIO(newline='')
    writer = csv.DictWriter(table, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(run_dir / 'summary.csv', table.getvalue())


def _read_rows(run_dir: Path, upto_epoch: int) -> List[Dict[str, Any]]:
    path = run_dir / 'metrics.jsonl'
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r['epoch'] <= upto_epoch]


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + '\n')


def _run_dir(config: Dict[str, Any]) -> Path:
    parts = [config['model'], config['router'], config['data'], datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')]
    name = config['experiment'] or '-'.join(p for p in parts if p)
    return Path(config['output']) / name


def run(config: Dict[str, Any], env: DistEnv, display: Display, stop: StopSignal) -> Dict[str, Any]:
    """Train per a resolved ``config`` whose 'experiment' names the run folder (``main`` sets it); returns the
    results (also written to ``results.json``) or ``{'stopped': signal or None, 'epoch': n}``."""
    _check_expert_parallel(config, env)
    torch.manual_seed(config['seed'])
    try:
        data = build_run_data(config, env)
    except (ConfigError, IdxFormatError, ClassFoldersMismatchError):
        raise
    except ValueError as e:  # e.g. a val_size larger than the training set
        raise ConfigError(f'cannot build the data from the config: {e}') from None
    in_chans = data.data_config['input_size'][0]
    sharded = config['expert_parallel'] > 1
    model = create_model_from_config(config, num_classes=data.num_classes, in_chans=in_chans,
                                     expert_parallel_size=config['expert_parallel']).to(env.device)
    config.update(model_settings(model))  # the saved config names the settings in force, the model's defaults too
    core = model
    steps = len(data.train)
    total_steps = config['epochs'] * steps
    warmup = min(round(config['warmup_epochs'] * steps), total_steps - 1)
    try:
        optimizer = create_optimizer_v2(core, opt=config['opt'], lr=config['lr'], weight_decay=config['weight_decay'],
                                        **config['opt_kwargs'])
    except (ValueError, AssertionError) as e:
        raise ConfigError(f"invalid value {config['opt']!r} for opt: {e}") from None
    except TypeError as e:  # a keyword the optimizer does not take
        raise ConfigError(f"invalid opt_kwargs {config['opt_kwargs']!r} for opt {config['opt']!r}: {e}") from None
    # the lr of a step is a function of the config and the step alone: a resumed run follows its (possibly changed)
    # schedule exactly, so no scheduler state is saved or restored
    scheduler = CosineLRScheduler(optimizer, t_initial=total_steps - warmup, lr_min=config['min_lr'],
                                  warmup_t=warmup, warmup_lr_init=config['warmup_lr'], warmup_prefix=True,
                                  t_in_epochs=False)
    mixup = None
    if config['mixup'] > 0 or config['cutmix'] > 0:
        mixup = Mixup(mixup_alpha=config['mixup'], cutmix_alpha=config['cutmix'], prob=config['mixup_prob'],
                      label_smoothing=config['smoothing'], num_classes=data.num_classes)
        criterion: nn.Module = SoftTargetCrossEntropy()
    else:
        criterion = nn.CrossEntropyLoss(label_smoothing=config['smoothing'])
    ema = ModelEmaV3(core, decay=config['model_ema_decay']) if config['model_ema'] else None
    tracker = FluctuationTracker()
    start_epoch, best = 0, _no_best()
    run_dir = Path(config['output']) / config['experiment']
    rows: List[Dict[str, Any]] = []
    if config['resume']:
        start_epoch, best = _restore(run_dir, core, optimizer, tracker, ema, display)
        _check_resumed_length(config, start_epoch, run_dir)
        rows = _read_rows(run_dir, start_epoch)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / 'config.yaml')
    if env.distributed:
        exclude_from_ddp(model)  # sharded experts: their gradients are averaged over their replicas instead
        model = DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == 'cuda' else None)
    total, active = count_params(core)
    display.print(f'{config["model"]} router={config["router"]} experts={config["num_experts"]} '
                  f'top-{config["top_k"]}: {total / 1e6:.2f}M params ({active / 1e6:.2f}M active), '
                  f'{len(data.train.dataset)} train images, {steps} steps/epoch x {env.world_size} process(es); '
                  f'run folder {run_dir}')
    if config['amp'] == 'bf16' and not has_fast_bf16_matmul(env.device):
        display.print(f'[yellow]warning:[/yellow] amp bf16: {BF16_FALLBACK_HINT}; --amp none trains in fp32')
    end_epoch = config['stop_after'] or config['epochs']
    for epoch in range(start_epoch, end_epoch):
        started = time.perf_counter()
        _reseed(config, epoch, env, data)
        train = train_one_epoch(model, data.train, optimizer, scheduler, criterion, env, display, epoch=epoch,
                                amp=config['amp'], clip_grad=config['clip_grad'], mixup=mixup,
                                ema=ema, stop_requested=stop)
        if train['interrupted']:
            weights, optimizer_state, ema_weights = _gathered(core, optimizer, ema)
            if env.is_main:
                state = {**_state(optimizer_state, tracker, ema_weights, epoch, best, step=train['images']),
                         MID_EPOCH: True}
                pt = save_checkpoint(run_dir, INTERRUPTED, weights, state, config)
                restart = 'from last.pt' if epoch > 0 else 'from the start: no epoch had finished'
                display.print(f'stopped by signal {stop.signum} during epoch {epoch + 1}: saved {pt} (mid-epoch '
                              f'weights, not a resume point); resume with --resume {run_dir} (restarts epoch '
                              f'{epoch + 1} {restart})')
            return {'stopped': stop.signum, 'epoch': epoch}
        _check_finite(core, ema, epoch, config['clip_grad'])
        eval_model = ema.module if ema is not None else core
        val = evaluate(eval_model, data.val, env, display, amp=config['amp'], description=f'val {epoch + 1}')
        fluctuation = {}
        if env.is_main or sharded:  # with sharded experts every process joins each forward
            fluctuation = tracker.update(epoch + 1, record_probe(eval_model, data.probe, env.device, config['amp']))
        row = epoch_row(epoch + 1, train, val, fluctuation, time.perf_counter() - started)
        is_best = val['top1'] > best['val_top1']
        if is_best:
            best = {'val_top1': val['top1'], 'val_top5': val['top5'], 'epoch': epoch + 1, SAVE_ID: new_save_id()}
        weights, optimizer_state, ema_weights = _gathered(core, optimizer, ema)
        if env.is_main:
            rows.append(row)
            _write_metrics(run_dir, rows)
            _write_json(run_dir / 'fluctuation.json', fluctuation_report(tracker))
            state = _state(optimizer_state, tracker, ema_weights, epoch + 1, best)
            _save_epoch(run_dir, weights, weights if ema is None else ema_weights, state, config,
                        best[SAVE_ID] if is_best else None)
            display.epoch_table(row, config['epochs'])
            if row['skipped_images']:
                display.print(f'[yellow]warning:[/yellow] skipped {row["skipped_images"]} unreadable image(s) in '
                              f'epoch {epoch + 1} (--strict-data makes them fatal)')
        if stop():
            display.print(f'stopped by signal {stop.signum} after epoch {epoch + 1}; last.pt saved; '
                          f'resume with --resume {run_dir}')
            return {'stopped': stop.signum, 'epoch': epoch + 1}
    if end_epoch < config['epochs']:
        display.print(f'stopped after epoch {end_epoch} of {config["epochs"]} (stop_after); '
                      f'resume with --resume {run_dir}')
        return {'stopped': None, 'epoch': end_epoch}
    results: Dict[str, Any] = {}
    if data.test is not None:  # rank 0, or with sharded experts every process (on the whole test set)
        if sharded:
            dist.barrier()  # rank 0 has written best
        # the weights best names, or an error (rank 0 checks: the other processes drew their own save ids)
        load_checkpoint(run_dir / 'best.pt', core, save_id=best.get(SAVE_ID) if env.is_main else None)
        test = evaluate(core, data.test, env, display, amp=config['amp'], description='test', reduce=False)
    if env.is_main:
        results = {'test_top1': test['top1'], 'test_top5': test['top5'], 'test_images': test['images'],
                   'best_epoch': best['epoch'], 'best_val_top1': best['val_top1'], 'epochs': config['epochs'],
                   'params': total, 'active_params': active, 'train_time_s': sum(r['epoch_time'] for r in rows),
                   'machine': describe_device(env.device)}
        _write_json(run_dir / 'results.json', results)
        display.results_table(results, str(run_dir))
    if env.distributed:
        dist.barrier()
    return results


def _no_best() -> Dict[str, Any]:
    return {'val_top1': -1.0, 'epoch': 0}


def _recover(run_dir: Path, env: DistEnv) -> None:
    """Rank 0 finishes or discards what a killed save left in the run folder, before any process reads it."""
    if env.is_main and run_dir.is_dir():
        recover_run_folder(run_dir)
    if env.distributed:
        dist.barrier()


def _restore(run_dir: Path, core: nn.Module, optimizer: torch.optim.Optimizer, tracker: FluctuationTracker,
             ema: Optional[ModelEmaV3], display: Display) -> Tuple[int, Dict[str, Any]]:
    """Load the run's committed ``last`` checkpoint; returns (epochs done, best). A run folder without a finished
    epoch starts again from epoch 1 (exact: the initial weights come from the seed)."""
    if committed_files(run_dir, LAST) is None:
        display.print(f'{run_dir} has no finished epoch: training it from epoch 1 with its saved config')
        return 0, _no_best()
    state, pt = load_checkpoint(run_dir, core)
    if state.get(MID_EPOCH):
        raise _mid_epoch_refusal(run_dir)
    optimizer.load_state_dict(shard_optimizer_state(state['optimizer'], optimizer, core))
    tracker.load_state_dict(state['tracker'])
    if ema is not None and 'ema' in state:
        ema.module.load_state_dict(state['ema'])
    restore_rng(state['rng'])
    best = dict(state['best'])
    display.print(f'resumed from {pt} (epoch {state["epoch"]}, best val top-1 {best["val_top1"]:.2f})')
    return int(state['epoch']), best


def _check_expert_parallel(config: Dict[str, Any], env: DistEnv) -> None:
    """EP must divide the number of processes (and the experts: checked with the model's own E when it is built)."""
    if env.world_size % config['expert_parallel']:
        raise ConfigError(f"invalid value {config['expert_parallel']} for expert_parallel: must divide the number of "
                          f'processes ({env.world_size}); run with torchrun --nproc_per_node a multiple of it')


def _check_resumed_length(config: Dict[str, Any], done: int, run_dir: Path) -> None:
    """A resumed run's epochs and stop_after must leave something to do (or only the final test: epochs == done)."""
    if config['epochs'] < done:
        raise ConfigError(f"invalid value {config['epochs']} for epochs: {run_dir} has already trained {done} "
                          'epoch(s); pass at least that many')
    if config['stop_after'] is not None and config['stop_after'] <= done < config['epochs']:
        raise ConfigError(f"invalid value {config['stop_after']} for stop_after: {run_dir} has already trained "
                          f'{done} epoch(s); pass a larger --stop-after, or none')


def _check_finite(core: nn.Module, ema: Optional[ModelEmaV3], epoch: int, clip_grad: Optional[float]) -> None:
    """Weights that became NaN/inf (every step's loss finite, e.g. in the last update) are never evaluated or saved."""
    models = [core] + ([ema.module] if ema is not None else [])
    if not all(torch.isfinite(p).all() for m in models for p in m.parameters()):
        raise NonFiniteLossError(f'the weights became non-finite in epoch {epoch + 1} (every loss was finite); '
                                 f'{divergence_hint(clip_grad)}')


def _save_epoch(run_dir: Path, weights: Dict[str, torch.Tensor], eval_weights: Dict[str, torch.Tensor],
                state: Dict[str, Any], config: Dict[str, Any], best_id: Optional[str]) -> None:
    """Save a finished epoch as ``last`` and, when ``best_id`` is given, as ``best`` (the evaluated weights: the
    EMA's when on). ``best`` is staged first and committed only after ``last``, whose state names it, so a kill at
    any instant leaves a ``best`` that the committed ``last`` records."""
    if best_id is not None:
        stage_checkpoint(run_dir, BEST, eval_weights, state, config, save_id=best_id)
    try:
        stage_checkpoint(run_dir, LAST, weights, state, config)
    except BaseException:
        if best_id is not None:
            discard_staged(run_dir, BEST)
        raise
    commit_checkpoint(run_dir, LAST)
    if best_id is not None:
        commit_checkpoint(run_dir, BEST)


def _gathered(core: nn.Module, optimizer: torch.optim.Optimizer, ema: Optional[ModelEmaV3]) -> Tuple[Any, Any, Any]:
    """(weights, optimizer state, EMA weights or None) as one process holding every expert has them: with sharded
    experts gathered on rank 0 (every process must call this; the others get None)."""
    return (gather_state_dict(core), gather_optimizer_state(optimizer, core),
            gather_state_dict(ema.module) if ema is not None else None)


def _state(optimizer_state: Dict[str, Any], tracker: FluctuationTracker, ema_weights: Optional[Dict[str, Any]],
           epoch: int, best: Dict[str, Any], step: int = 0) -> Dict[str, Any]:
    """The training state of a checkpoint (tensors and plain containers only: ``weights_only``-loadable)."""
    state = {'epoch': epoch, 'step': step, 'optimizer': optimizer_state, 'tracker': tracker.state_dict(),
             'best': dict(best), 'rng': capture_rng()}
    if ema_weights is not None:
        state['ema'] = ema_weights
    return state


def _mid_epoch_refusal(folder: Path) -> CheckpointError:
    """The error refusing to resume from ``interrupted.pt``, with the command that works."""
    files = committed_files(folder, INTERRUPTED)
    during = f' during epoch {int(weights_metadata(files[0])["epoch"]) + 1}' if files else ''
    restart = 'from last.pt' if committed_files(folder, LAST) else 'from the start'
    return CheckpointError(f'{folder / "interrupted.pt"} was saved mid-epoch{during}: a resume from it cannot be '
                           'exact (the epoch would replay from mid-epoch weights), so it is refused; resume with '
                           f'--resume {folder} (restarts that epoch {restart})')


def _resume_folder(path: Path) -> Path:
    """The run folder ``--resume PATH`` continues: PATH is the folder or its last checkpoint."""
    folder = path.parent if path.suffix in ('.pt', '.safetensors') else path
    tag = checkpoint_tag(path) if folder != path else LAST
    if tag == INTERRUPTED:
        raise _mid_epoch_refusal(folder)
    if tag != LAST:
        raise CheckpointError(f'--resume continues a run from its last checkpoint: pass the run folder {folder} '
                              f'(resuming from {path.name} would rewind the run and overwrite its last.pt)')
    if not (folder / 'config.yaml').is_file():
        what = 'does not exist' if not folder.exists() else 'holds no config.yaml'
        raise CheckpointError(f'{folder} {what}: --resume needs the run folder written by train.py')
    return folder


def _resumed_base(argv: Sequence[str]) -> Optional[Dict[str, Any]]:
    """With ``--resume PATH``, the resumed run's saved config (the base the command line overrides)."""
    probe = parse_config(argv)
    if not probe['resume']:
        return None
    folder = _resume_folder(Path(probe['resume']))
    saved = yaml.safe_load((folder / 'config.yaml').read_text())
    base = {k: convert_value(k, v) for k, v in saved.items() if k not in INVOCATION_KEYS}
    base.update(output=str(folder.parent), experiment=folder.name)
    return base


def _resume_changes(base: Dict[str, Any], config: Dict[str, Any]) -> List[str]:
    """The settings a resumed run changes ('key old -> new'); ConfigError naming those it cannot change."""
    changed = {k: (v, config[k]) for k, v in base.items() if config[k] != v}
    listing = {k: f'{k} {old!r} -> {new!r}' for k, (old, new) in changed.items()}
    refused = [text for k, text in listing.items() if k not in RESUME_APPLIED]
    if refused:
        run_dir = Path(base['output']) / base['experiment']
        raise ConfigError(f'cannot change {", ".join(refused)} when resuming {run_dir}: its weights and training '
                          'state depend on the saved value(s); drop the flag(s), or start a new run with '
                          f'-c {run_dir / "config.yaml"} --experiment NEW')
    return [text for k, text in listing.items() if k not in RESUME_UNREPORTED]


def _one_line(error: BaseException) -> str:
    """An error as one line: a DataLoader worker's error carries the worker's traceback (keep its last line, the
    original message); other multi-line messages are joined."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if any(line.startswith('Traceback') for line in lines):
        return lines[-1]
    return ' '.join(lines) or type(error).__name__


def _saved_note(run_dir: Optional[Path]) -> str:
    """What a failed run leaves to resume from, for its error line."""
    files = committed_files(run_dir, LAST) if run_dir is not None else None
    if files is None:
        return 'no epoch had finished, so no checkpoint was saved'
    return f'{run_dir / "last.pt"} (epoch {weights_metadata(files[0])["epoch"]}) is intact'


def _failure_line(error: Exception, env: Optional[DistEnv], run_dir: Optional[Path]) -> Optional[str]:
    """The one error line of a run that failed for a reason outside the config (full disk, a lost process), or
    None for anything else (a bug: its traceback is the report)."""
    if is_disk_full(error) and run_dir is not None:
        where = getattr(error, 'filename', None) or run_dir
        return (f'{run_dir}: No space left on device (writing {where}); {_saved_note(run_dir)}: free space, then '
                f'resume with --resume {run_dir}')
    if env is not None and env.distributed and is_collective_failure(error):
        return f'rank {env.rank}: {lost_ranks_message(env)}; {_saved_note(run_dir)}: resume with --resume {run_dir}'
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``train.py``; returns the exit code (0 done, 1 failed: non-finite loss, full disk or a lost process,
    2 bad config/data: nothing was trained, 128+signal when stopped)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    env: Optional[DistEnv] = None
    run_dir: Optional[Path] = None
    stop = StopSignal().install()
    try:
        base = _resumed_base(argv)
        config = parse_config(argv, base)
        changes = _resume_changes(base, config) if base is not None else []
        env = init_distributed()
        if not config['resume']:
            name = [_run_dir(config).name]
            if env.distributed:  # one run folder for all processes: rank 0's timestamp
                dist.broadcast_object_list(name, src=0)
            config['experiment'] = name[0]
        run_dir = Path(config['output']) / config['experiment']
        _recover(run_dir, env)
        if not config['resume'] and committed_files(run_dir, LAST) is not None:  # never overwrite a saved run
            raise ConfigError(f'{run_dir} already holds a run; continue it with --resume {run_dir}, or choose another '
                              '--experiment/--output')
        display = Display(enabled=env.is_main, progress=config['progress'])
        if changes:
            display.print(f'resuming with changed settings, applied from the resumed epoch on: {", ".join(changes)}')
        try:
            results = run(config, env, display, stop)
        finally:
            display.close()  # the live table's last frame stays; the cursor comes back
        if results.get('stopped'):
            return 128 + int(results['stopped'])
        return 0
    except (ConfigError, CheckpointError, DatasetNotFoundError, IdxFormatError, ClassFoldersMismatchError) as e:
        print(f'error: {_one_line(e)}', file=sys.stderr)
        return EXIT_USAGE
    except CorruptImageError as e:
        print(f'error: {_one_line(e)}; remove or replace the file, or run without --strict-data (--no-strict-data) '
              'to skip unreadable images', file=sys.stderr)
        return EXIT_USAGE
    except NonFiniteLossError as e:
        print(f'error: {e}; {_saved_note(run_dir)}', file=sys.stderr)
        return EXIT_ERROR
    except Exception as e:  # noqa: BLE001 - classified by _failure_line; anything else keeps its traceback
        line = _failure_line(e, env, run_dir)
        if line is None:
            raise
        print(f'error: {line}', file=sys.stderr)
        return EXIT_ERROR
    finally:
        stop.uninstall()
        if env is not None:
            cleanup_distributed()

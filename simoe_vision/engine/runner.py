"""The training job: resolve the config, build data and model, train epoch by epoch with checkpoints and routing
metrics, then evaluate the best checkpoint on the test set. ``main(argv)`` is what ``train.py`` runs."""
from __future__ import annotations

import csv
import json
import random
import signal
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import timm
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

from ..data import CorruptImageError, DatasetNotFoundError, IdxFormatError
from ..metrics import FluctuationTracker, RoutingRecorder
from ..models import count_params
from .checkpoint import CheckpointError, capture_rng, load_checkpoint, resolve_checkpoint, restore_rng, save_checkpoint
from .config import ConfigError, parse_config, save_config
from .data import RunData, base_dataset, build_run_data
from .display import Display
from .model_factory import create_model_from_config, model_settings
from .distributed import DistEnv, cleanup_distributed, init_distributed
from .loop import NonFiniteLossError, evaluate, record_probe, train_one_epoch

__all__ = ['StopSignal', 'epoch_row', 'fluctuation_report', 'main', 'run']

EXIT_ERROR = 1  # training failed (non-finite loss)
EXIT_USAGE = 2  # bad config or data: nothing was trained
INVOCATION_KEYS = ('resume', 'stop_after')  # settings of one invocation that a resumed run does not inherit


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
        'entropy': float(np.mean([routing[n]['entropy'] for n in layers])) if layers else None,
        'fluctuation': fluctuation.get('mean'),
        'epoch_time': epoch_time, 'train_images': train['images'], 'skipped_images': train['skipped'] + val['skipped'],
    }
    for name in layers:
        row[f'load_cv.{name}'] = routing[name]['load_cv']
        row[f'dropped.{name}'] = routing[name]['dropped_fraction']
        row[f'entropy.{name}'] = routing[name]['entropy']
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
    """``metrics.jsonl`` (one JSON object per epoch) and ``summary.csv`` (same rows, flat columns)."""
    lines = ''.join(json.dumps(r) + '\n' for r in rows)
    (run_dir / 'metrics.jsonl').write_text(lines)
    columns: List[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    with open(run_dir / 'summary.csv', 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _read_rows(run_dir: Path, upto_epoch: int) -> List[Dict[str, Any]]:
    path = run_dir / 'metrics.jsonl'
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r['epoch'] <= upto_epoch]


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + '\n')


def _run_dir(config: Dict[str, Any]) -> Path:
    parts = [config['model'], config['router'], config['data'], datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')]
    name = config['experiment'] or '-'.join(p for p in parts if p)
    return Path(config['output']) / name


def run(config: Dict[str, Any], env: DistEnv, display: Display, stop: StopSignal) -> Dict[str, Any]:
    """Train per a resolved ``config`` whose 'experiment' names the run folder (``main`` sets it); returns the
    results (also written to ``results.json``) or ``{'stopped': signal or None, 'epoch': n}``."""
    torch.manual_seed(config['seed'])
    try:
        data = build_run_data(config, env)
    except (ConfigError, IdxFormatError):
        raise
    except ValueError as e:  # e.g. a val_size larger than the training set
        raise ConfigError(f'cannot build the data from the config: {e}') from None
    in_chans = data.data_config['input_size'][0]
    model = create_model_from_config(config, num_classes=data.num_classes, in_chans=in_chans).to(env.device)
    config.update(model_settings(model))  # the saved config names the settings in force, the model's defaults too
    core = model
    steps = len(data.train)
    total_steps = config['epochs'] * steps
    warmup = min(round(config['warmup_epochs'] * steps), total_steps - 1)
    try:
        optimizer = create_optimizer_v2(core, opt=config['opt'], lr=config['lr'], weight_decay=config['weight_decay'])
    except (ValueError, AssertionError) as e:
        raise ConfigError(f"invalid value {config['opt']!r} for opt: {e}") from None
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
    start_epoch, best = 0, {'val_top1': -1.0, 'epoch': 0}
    run_dir = Path(config['output']) / config['experiment']
    rows: List[Dict[str, Any]] = []
    if config['resume']:
        state, pt = load_checkpoint(config['resume'], core)
        optimizer.load_state_dict(state['optimizer'])
        if state['scheduler'].get('t_initial') == scheduler.t_initial:
            scheduler.load_state_dict(state['scheduler'])
        tracker.load_state_dict(state['tracker'])
        if ema is not None and 'ema' in state:
            ema.module.load_state_dict(state['ema'])
        restore_rng(state['rng'])
        start_epoch, best = int(state['epoch']), dict(state['best'])
        rows = _read_rows(run_dir, start_epoch)
        display.print(f'resumed from {pt} (epoch {start_epoch}, best val top-1 {best["val_top1"]:.2f})')
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / 'config.yaml')
    if env.distributed:
        model = DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == 'cuda' else None)
    total, active = count_params(core)
    display.print(f'{config["model"]} router={config["router"]} experts={config["num_experts"]} '
                  f'top-{config["top_k"]}: {total / 1e6:.2f}M params ({active / 1e6:.2f}M active), '
                  f'{len(data.train.dataset)} train images, {steps} steps/epoch x {env.world_size} process(es); '
                  f'run folder {run_dir}')
    end_epoch = config['stop_after'] or config['epochs']
    for epoch in range(start_epoch, end_epoch):
        started = time.perf_counter()
        _reseed(config, epoch, env, data)
        train = train_one_epoch(model, data.train, optimizer, scheduler, criterion, env, display, epoch=epoch,
                                amp=config['amp'], clip_grad=config['clip_grad'], mixup=mixup,
                                ema=ema, stop_requested=stop)
        if train['interrupted']:
            state = _state(optimizer, scheduler, tracker, ema, epoch, best, step=train['images'])
            if env.is_main:
                pt = save_checkpoint(run_dir, 'interrupted', core, state, config)
                display.print(f'stopped by signal {stop.signum} during epoch {epoch + 1}: saved {pt}; '
                              f'resume with --resume {run_dir} (restarts epoch {epoch + 1} from last.pt)')
            return {'stopped': stop.signum, 'epoch': epoch}
        eval_model = ema.module if ema is not None else core
        val = evaluate(eval_model, data.val, env, display, amp=config['amp'], description=f'val {epoch + 1}')
        fluctuation = {}
        if env.is_main:
            fluctuation = tracker.update(epoch + 1, record_probe(eval_model, data.probe, env.device, config['amp']))
        row = epoch_row(epoch + 1, train, val, fluctuation, time.perf_counter() - started)
        is_best = val['top1'] > best['val_top1']
        if is_best:
            best = {'val_top1': val['top1'], 'val_top5': val['top5'], 'epoch': epoch + 1}
        if env.is_main:
            rows.append(row)
            _write_metrics(run_dir, rows)
            _write_json(run_dir / 'fluctuation.json', fluctuation_report(tracker))
            state = _state(optimizer, scheduler, tracker, ema, epoch + 1, best)
            save_checkpoint(run_dir, 'last', core, state, config)
            if is_best:  # the evaluated weights (the EMA's when on) with the training state beside them
                save_checkpoint(run_dir, 'best', eval_model, state, config)
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
    if env.is_main:
        load_checkpoint(run_dir / 'best.pt', core)
        test = evaluate(core, data.test, env, display, amp=config['amp'], description='test', reduce=False)
        results = {'test_top1': test['top1'], 'test_top5': test['top5'], 'test_images': test['images'],
                   'best_epoch': best['epoch'], 'best_val_top1': best['val_top1'], 'epochs': config['epochs'],
                   'params': total, 'active_params': active, 'train_time_s': sum(r['epoch_time'] for r in rows)}
        _write_json(run_dir / 'results.json', results)
        display.results_table(results, str(run_dir))
    if env.distributed:
        dist.barrier()
    return results


def _state(optimizer: torch.optim.Optimizer, scheduler: Any, tracker: FluctuationTracker,
           ema: Optional[ModelEmaV3], epoch: int, best: Dict[str, Any], step: int = 0) -> Dict[str, Any]:
    """The training state of a checkpoint (tensors and plain containers only: ``weights_only``-loadable)."""
    sched = {k: v for k, v in scheduler.state_dict().items() if isinstance(v, (int, float, str, list, tuple, bool))
             or v is None}
    state = {'epoch': epoch, 'step': step, 'optimizer': optimizer.state_dict(), 'scheduler': sched,
             'tracker': tracker.state_dict(), 'best': dict(best), 'rng': capture_rng()}
    if ema is not None:
        state['ema'] = ema.module.state_dict()
    return state


def _resumed_base(argv: Sequence[str]) -> Optional[Dict[str, Any]]:
    """With ``--resume PATH``, the resumed run's saved config (the base the command line overrides)."""
    probe = parse_config(argv)
    if not probe['resume']:
        return None
    pt = resolve_checkpoint(probe['resume'])
    saved = pt.parent / 'config.yaml'
    if not saved.is_file():
        raise CheckpointError(f'{saved} is missing: --resume needs the run folder written by train.py')
    base = {k: v for k, v in yaml.safe_load(saved.read_text()).items() if k not in INVOCATION_KEYS}
    base.update(output=str(pt.parent.parent), experiment=pt.parent.name)
    return base


def _one_line(error: BaseException) -> str:
    """An error as one line: a DataLoader worker's error carries the worker's traceback (keep its last line, the
    original message); other multi-line messages are joined."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if any(line.startswith('Traceback') for line in lines):
        return lines[-1]
    return ' '.join(lines) or type(error).__name__


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``train.py``; returns the exit code (0 done, 1 failed, 2 bad config/data, 128+signal when stopped)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    env: Optional[DistEnv] = None
    stop = StopSignal().install()
    try:
        base = _resumed_base(argv)
        config = parse_config(argv, base)
        env = init_distributed()
        if not config['resume']:
            name = [_run_dir(config).name]
            if env.distributed:  # one run folder for all processes: rank 0's timestamp
                dist.broadcast_object_list(name, src=0)
            config['experiment'] = name[0]
            existing = Path(config['output']) / config['experiment'] / 'last.pt'
            if existing.exists():  # never overwrite a run that was saved
                raise ConfigError(f'{existing.parent} already holds a run; continue it with --resume '
                                  f'{existing.parent}, or choose another --experiment/--output')
        display = Display(enabled=env.is_main, progress=config['progress'])
        results = run(config, env, display, stop)
        if results.get('stopped'):
            return 128 + int(results['stopped'])
        return 0
    except (ConfigError, CheckpointError, DatasetNotFoundError, IdxFormatError, CorruptImageError) as e:
        print(f'error: {_one_line(e)}', file=sys.stderr)
        return EXIT_USAGE
    except NonFiniteLossError as e:
        print(f'error: {e}; the last good checkpoint is untouched', file=sys.stderr)
        return EXIT_ERROR
    finally:
        stop.uninstall()
        if env is not None:
            cleanup_distributed()

"""The compact JSON summary of one finished run (``docs/<results>/runs/<arm>_s<seed>.json``), made from its
``train.py`` folder and its ``evaluate.py`` results; the report needs nothing else, so run folders (checkpoints)
are never needed again once a run is summarised."""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import yaml

from simoe_vision.evaluation.plots import per_severity
from simoe_vision.evaluation.report import mean_of
from simoe_vision.metrics import window_mean
from simoe_vision.routers.diagnostics import DIAGNOSTICS

from .design import Study, StudyError

__all__ = ['FLUCTUATION_WINDOWS', 'SUMMARY_VERSION', 'describe_hardware', 'load_summaries', 'summarize_run']

SUMMARY_VERSION = 1
# The parts of training whose fluctuation is averaged (fractions of the epochs; see metrics.window_mean).
FLUCTUATION_WINDOWS = {'40-90%': (0.4, 0.9), 'last 30%': (0.7, 1.0)}


def describe_hardware() -> Dict[str, Any]:
    """Where a run ran: platform, CPU model and count, torch and Python versions."""
    cpu = platform.processor() or ''
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                cpu = line.split(':', 1)[1].strip()
                break
    except OSError:
        pass
    return {'platform': platform.platform(), 'cpu': cpu, 'cpu_count': os.cpu_count(), 'torch': torch.__version__,
            'python': platform.python_version()}


def load_summaries(study: Study, docs: Path) -> List[Dict[str, Any]]:
    """Every run summary of the study under ``docs`` (sorted by run name)."""
    folder = study.summaries_dir(docs)
    out = []
    for path in sorted(folder.glob('*.json')) if folder.is_dir() else []:
        try:
            out.append(json.loads(path.read_text()))
        except ValueError as e:
            raise StudyError(f'{path} is not valid JSON ({e}); restore it from git or delete it to redo the run') \
                from None
    return out


def summarize_run(run_dir: Path, eval_results: Path, arm: str, seed: int, commands: Sequence[str],
                  eval_s: Optional[float] = None, hardware: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The compact summary of one finished run, from its train.py folder and its evaluate.py ``results.json``.

    Accuracies are top-1 in %; ``corruption.per_severity`` averages the corruptions at each severity;
    ``corruption.mce`` is unnormalised (100 x mean error); ``corruption.errors`` keeps the error table so that mCE
    relative to the reference run of the same seed can be recomputed by the report; ``routing.agreement`` is the
    share of tokens whose top-1 expert is the same on the clean and corrupted image, averaged over corruptions.
    """
    for path in (run_dir / 'results.json', run_dir / 'metrics.jsonl', run_dir / 'fluctuation.json', eval_results):
        if not path.is_file():
            raise StudyError(f'{path} is missing: finish the run first (python -m study run)')
    train = json.loads((run_dir / 'results.json').read_text())
    rows = [json.loads(line) for line in (run_dir / 'metrics.jsonl').read_text().splitlines() if line.strip()]
    fluct = json.loads((run_dir / 'fluctuation.json').read_text())
    config = yaml.safe_load((run_dir / 'config.yaml').read_text()) if (run_dir / 'config.yaml').is_file() else {}
    result = next(iter(json.loads(eval_results.read_text())['checkpoints'].values()))
    epochs = int(train['epochs'])
    curve_epochs, curves = fluct['curve_epochs'], fluct['curves']
    windows = {name: {layer: window_mean(values, curve_epochs, epochs, lo, hi) for layer, values in curves.items()}
               for name, (lo, hi) in FLUCTUATION_WINDOWS.items()}
    corr = result['corruptions']
    severities = [int(s) for s in corr['severities']]
    accuracy = per_severity({c: {s: m['top1'] for s, m in by_s.items()} for c, by_s in corr['cells'].items()})
    agreement = result['routing']['agreement']
    layers = list(result['routing']['layers']) + ['mean']
    agree = {layer: per_severity({c: {s: v[layer] for s, v in by_s.items()} for c, by_s in agreement.items()})
             for layer in layers}
    adversarial: Dict[str, Dict[str, float]] = {}
    for a in result.get('adversarial', []):
        adversarial.setdefault(a['attack'], {})[f'{a["eps"]:g}'] = a['adv_top1']
    load_cv = {layer: v['load_cv'] for layer, v in result['routing']['layers'].items()}
    diagnostics = {key: mean_of(v.get(key) for v in result['routing']['layers'].values())
                   for key in DIAGNOSTICS}
    epoch_times = [r['epoch_time'] for r in rows]
    train_s = float(train.get('train_time_s', sum(epoch_times)))
    return {
        'version': SUMMARY_VERSION, 'run': f'{arm}_s{seed}', 'arm': arm, 'seed': seed,
        'model': result['model'], 'router': result['router'],
        'router_kwargs': config.get('router_kwargs', {}), 'epochs': epochs,
        'train_images': rows[-1]['train_images'] if rows else None,
        'test_top1': train['test_top1'], 'val_top1': train['best_val_top1'], 'best_epoch': train['best_epoch'],
        'eval': {'images': result['clean']['num_samples'], 'clean_top1': result['clean']['top1'],
                 'corruptions': corr['corruptions'], 'severities': severities},
        'corruption': {'per_severity': {str(s): accuracy[s] for s in severities},
                       'mean_accuracy': corr['mean_corruption_accuracy'], 'mce': corr['mce'], 'errors': corr['errors']},
        'adversarial': adversarial,
        'fluctuation': {'epochs': curve_epochs, 'curves': curves, 'windows': windows},
        'routing': {'agreement': {str(s): {layer: agree[layer][s] for layer in layers} for s in severities},
                    'load_cv': load_cv, 'load_cv_mean': mean_of(load_cv.values()),
                    **({'diagnostics': diagnostics} if any(v is not None for v in diagnostics.values()) else {})},
        'timing': {'epoch_s': mean_of(epoch_times), 'train_s': train_s, 'eval_s': eval_s,
                   'wall_s': train_s + (eval_s or 0.0)},
        'hardware': hardware or describe_hardware(), 'commands': list(commands),
    }

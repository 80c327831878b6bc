"""The small-scale study behind ``docs/results.md``: every router (and four ablations) trained with ``train.py`` and
evaluated with ``evaluate.py``, run by run, resumable across sessions.

``python -m simoe_vision.study plan|run|report``:

* ``plan`` lists the runs (arm x seed) with their status: *done* (its summary ``docs/results/runs/<run>.json`` is
  committed), *partial* (``<runs-dir>/<run>/last.pt`` exists: training is resumed) or *todo*, and the estimated time.
* ``run`` trains, evaluates and summarises the missing runs one after another, stopping before a run that would not
  fit ``--budget-minutes``; the summaries are small JSON files meant to be committed after each session.
* ``report`` regenerates ``docs/results.md`` (tables of mean ± std over seeds, plots, expert maps, commands,
  hardware, mechanical conclusions, the runs still missing) from the committed summaries alone: the run folders
  (checkpoints) are never needed again, so a fresh session can continue the study from the repository.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import yaml

from .robustness import CORRUPTIONS, SEVERITIES, mean_corruption_error

__all__ = ['ARMS', 'Arm', 'EvalPlan', 'Run', 'StudyError', 'fits_budget', 'main', 'mean_std', 'paired_deltas',
           'plan_runs', 'relative_mce', 'render_report', 'run_status', 'summarize_run', 'window_mean']

REPO = Path(__file__).resolve().parents[1]
SUMMARY_VERSION = 1
HUMAN_BEGIN = '<!-- BEGIN HUMAN CONCLUSION (kept when the report is regenerated) -->'
HUMAN_END = '<!-- END HUMAN CONCLUSION -->'
FLUCTUATION_WINDOWS = {'40-90%': (0.4, 0.9), 'last 30%': (0.7, 1.0)}
# Training throughput on 2 idle CPU cores (images/s in train.py), for time estimates before a run of the family
# exists: V-MoE nano with the demo recipe (16 tokens, batch 128) measured ~780 img/s with MoE in blocks 1/3/5 (the
# last-2 layout is faster, so estimates err long); Swin-MoE nano (256 tokens in its first stage) assumed from a
# 0.7-0.8x speed ratio to the 65-token V-MoE nano. Measured runs replace these.
IMAGES_PER_SECOND = {'vmoe_nano_patch4_32': 780.0, 'swin_moe_nano_patch2_window4_32': 150.0}
# evaluate.py with the study's EvalPlan (2 idle cores, corruption cache already built): ~77000 forward passes and
# ~22000 attack steps, estimated from the training speed and rounded up.
EVAL_SECONDS = {'vmoe_nano_patch4_32': 150.0, 'swin_moe_nano_patch2_window4_32': 500.0}
OVERHEAD_SECONDS = 60.0  # train.py start-up, data loading and its final test-set evaluation


class StudyError(ValueError):
    """A study input is missing or invalid (unknown arm, missing config, a failed subprocess); the message says
    what to do."""


@dataclass(frozen=True)
class Arm:
    """One configuration of the study: ``configs/study_<name>.yaml`` trained with each of ``seeds``.

    ``family`` groups arms compared with each other (its ``softmax`` arm is the reference of relative mCE and of the
    paired differences); ``knob`` names the one setting an ablation changes (``None`` for a main-comparison arm).
    """

    name: str
    family: str
    router: str
    seeds: tuple[int, ...]
    knob: Optional[str] = None

    @property
    def config(self) -> str:
        return f'configs/study_{self.name}.yaml'


def _arms(*arms: Arm) -> Dict[str, Arm]:
    return {a.name: a for a in arms}


# Priority order: the V-MoE router comparison over all seeds first, then Swin-MoE, then the ablations.
ARMS: Dict[str, Arm] = _arms(
    Arm('vmoe_softmax', 'vmoe', 'softmax', (0, 1, 2)),
    Arm('vmoe_similarity', 'vmoe', 'similarity', (0, 1, 2)),
    Arm('vmoe_attention', 'vmoe', 'attention', (0, 1, 2)),
    Arm('swinmoe_softmax', 'swinmoe', 'softmax', (0,)),
    Arm('swinmoe_similarity', 'swinmoe', 'similarity', (0,)),
    Arm('swinmoe_attention', 'swinmoe', 'attention', (0,)),
    Arm('vmoe_similarity_mixlogits', 'vmoe', 'similarity', (0,), knob='mix=logits'),
    Arm('vmoe_similarity_tau005', 'vmoe', 'similarity', (0,), knob='tau=0.05'),
    Arm('vmoe_similarity_tau05', 'vmoe', 'similarity', (0,), knob='tau=0.5'),
    Arm('vmoe_similarity_alpha05', 'vmoe', 'similarity', (0,), knob='alpha=0.5'),
)
FAMILY_TITLES = {'vmoe': 'V-MoE nano (vmoe_nano_patch4_32)',
                 'swinmoe': 'Swin-MoE nano (swin_moe_nano_patch2_window4_32)'}


@dataclass(frozen=True)
class EvalPlan:
    """The ``evaluate.py`` settings every run is scored with (one fixed seeded subset of the test set)."""

    eval_subset: int = 1000
    corruptions: tuple[str, ...] = CORRUPTIONS
    eps: tuple[float, ...] = (1.0, 4.0)
    pgd_steps: int = 10
    adv_subset: Optional[int] = None

    def flags(self) -> List[str]:
        flags = ['--suite', 'clean,c,adv,routing', '--eval-subset', str(self.eval_subset),
                 '--corruptions', ','.join(self.corruptions), '--eps', ','.join(f'{e:g}' for e in self.eps),
                 '--pgd-steps', str(self.pgd_steps)]
        return flags + (['--adv-subset', str(self.adv_subset)] if self.adv_subset else [])


@dataclass(frozen=True)
class Run:
    """One training run of the study: an arm and a seed, stored as ``<runs-dir>/<arm>_s<seed>``."""

    arm: Arm
    seed: int

    @property
    def name(self) -> str:
        return f'{self.arm.name}_s{self.seed}'


# Smoke mode: the whole pipeline on a tiny model and data, into a temporary folder (proves the subprocess plumbing).
SMOKE_TRAIN = ['--model', 'vmoe_test', '--train-subset', '256', '--epochs', '1', '--val-size', '128',
               '--probe-size', '32', '--workers', '0']
SMOKE_EVAL = EvalPlan(eval_subset=32, corruptions=('gaussian_noise', 'contrast'), pgd_steps=2)
SMOKE_ARMS = ('vmoe_softmax', 'vmoe_similarity')
SMOKE_SEEDS = (0, 1)  # two seeds: the report's mean ± std and paired differences get exercised too


# ---------------------------------------------------------------------------------------------------- planning --

def select_runs(arms: Optional[Sequence[str]] = None, seeds: Optional[Sequence[int]] = None) -> List[Run]:
    """The study's runs in priority order (``ARMS`` order, seed-major within the main V-MoE comparison so that every
    seed's softmax reference comes first), restricted to ``arms`` and ``seeds`` when given."""
    unknown = [a for a in arms or () if a not in ARMS]
    if unknown:
        raise StudyError(f'unknown arm(s) {", ".join(unknown)}; choose from {", ".join(ARMS)}')
    chosen = [ARMS[a] for a in ARMS if arms is None or a in arms]
    runs = [Run(arm, s) for arm in chosen for s in arm.seeds if seeds is None or s in seeds]
    order = {name: i for i, name in enumerate(ARMS)}
    main = [r for r in runs if r.arm.family == 'vmoe' and r.arm.knob is None]
    rest = [r for r in runs if r not in main]
    return sorted(main, key=lambda r: (r.seed, order[r.arm.name])) + rest


def summary_path(docs: Path, run: str) -> Path:
    return docs / 'results' / 'runs' / f'{run}.json'


def run_status(run: str, runs_dir: Path, docs: Path) -> str:
    """'done' (summary written under ``docs``), 'partial' (``last.pt`` in its run folder) or 'todo'."""
    if summary_path(docs, run).is_file():
        return 'done'
    if (runs_dir / run / 'last.pt').is_file():
        return 'partial'
    return 'todo'


def _epochs_done(run_dir: Path) -> int:
    path = run_dir / 'metrics.jsonl'
    return sum(1 for line in path.read_text().splitlines() if line.strip()) if path.is_file() else 0


def estimate_seconds(run: Run, runs_dir: Path, summaries: Sequence[Dict[str, Any]]) -> float:
    """Expected remaining seconds of a run: epochs left x seconds per epoch + evaluation + ``OVERHEAD_SECONDS``.

    Seconds per epoch and evaluation come from the finished runs of the same arm, else of the same model family,
    else from ``IMAGES_PER_SECOND`` and ``EVAL_SECONDS``; a partial run only counts the epochs it has left."""
    config = load_arm_config(run.arm)
    same_arm = [s for s in summaries if s['arm'] == run.arm.name]
    same_family = [s for s in summaries if s['arm'] in ARMS and ARMS[s['arm']].family == run.arm.family]
    measured = same_arm or same_family
    per_epoch = _mean([s['timing']['train_s'] / s['epochs'] for s in measured if s['timing'].get('train_s')])
    if per_epoch is None:
        images = config.get('train_subset') or 60000 - config.get('val_size', 5000)
        per_epoch = images / IMAGES_PER_SECOND[config['model']]
    eval_s = _mean([s['timing']['eval_s'] for s in measured if s['timing'].get('eval_s')])
    remaining = max(config['epochs'] - _epochs_done(runs_dir / run.name), 0)
    return remaining * per_epoch + (eval_s if eval_s is not None else EVAL_SECONDS[config['model']]) \
        + OVERHEAD_SECONDS


def fits_budget(elapsed_s: float, estimate_s: float, budget_s: Optional[float]) -> bool:
    """Whether a run expected to take ``estimate_s`` can start after ``elapsed_s`` within ``budget_s`` (None: no
    budget)."""
    return budget_s is None or elapsed_s + estimate_s <= budget_s


def load_arm_config(arm: Arm) -> Dict[str, Any]:
    path = REPO / arm.config
    if not path.is_file():
        raise StudyError(f'{arm.config} is missing: every study arm needs its config (see configs/study_*.yaml)')
    return yaml.safe_load(path.read_text())


def load_summaries(docs: Path) -> List[Dict[str, Any]]:
    """Every run summary under ``docs/results/runs`` (sorted by run name)."""
    folder = docs / 'results' / 'runs'
    out = []
    for path in sorted(folder.glob('*.json')) if folder.is_dir() else []:
        try:
            out.append(json.loads(path.read_text()))
        except ValueError as e:
            raise StudyError(f'{path} is not valid JSON ({e}); restore it from git or delete it to redo the run') \
                from None
    return out


def plan_runs(runs: Sequence[Run], runs_dir: Path, docs: Path) -> List[Dict[str, Any]]:
    """One row per run: name, status and estimated remaining seconds (0 when done)."""
    summaries = load_summaries(docs)
    rows = []
    for r in runs:
        status = run_status(r.name, runs_dir, docs)
        estimate = 0.0 if status == 'done' else estimate_seconds(r, runs_dir, summaries)
        rows.append({'run': r.name, 'status': status, 'estimate_s': estimate})
    return rows


# ----------------------------------------------------------------------------------------------------- summary --

def window_mean(curve_epochs: Sequence[int], values: Sequence[Optional[float]], epochs: int, lo: float,
                hi: float) -> Optional[float]:
    """Mean of the curve points whose epoch ends inside the window ``(lo, hi]`` of training (as a fraction of
    ``epochs``). The fluctuation at epoch e is measured between the ends of epochs e-1 and e, so it belongs to the
    part of training ending at e / epochs. None when the window holds no point."""
    picked = [v for e, v in zip(curve_epochs, values, strict=True) if lo < e / epochs <= hi and v is not None]
    return sum(picked) / len(picked) if picked else None


def relative_mce(errors: Dict[str, Dict[Any, float]], reference: Dict[str, Dict[Any, float]]) -> float:
    """mCE (%) relative to a reference model's error table over the same corruptions and severities (100 = same)."""
    table = {c: {int(s): e for s, e in by_s.items()} for c, by_s in errors.items()}
    ref = {c: {int(s): e for s, e in by_s.items()} for c, by_s in reference.items()}
    severities = sorted(next(iter(table.values())))
    return mean_corruption_error(table, ref, list(table), severities)['mce']


def _mean(values: Sequence[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def _hardware() -> Dict[str, Any]:
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


def summarize_run(run_dir: Path, eval_results: Path, arm: str, seed: int, commands: Sequence[str],
                  eval_s: Optional[float] = None, hardware: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The compact summary of one finished run, from its train.py folder and its evaluate.py ``results.json``.

    Accuracies are top-1 in %; ``corruption.per_severity`` averages the corruptions at each severity;
    ``corruption.mce`` is unnormalised (100 x mean error); ``corruption.errors`` keeps the error table so that mCE
    relative to the softmax run of the same seed can be recomputed by ``report``; ``routing.agreement`` is the share
    of tokens whose top-1 expert is the same on the clean and corrupted image, averaged over corruptions.
    """
    for path in (run_dir / 'results.json', run_dir / 'metrics.jsonl', run_dir / 'fluctuation.json', eval_results):
        if not path.is_file():
            raise StudyError(f'{path} is missing: finish the run first (python -m simoe_vision.study run)')
    train = json.loads((run_dir / 'results.json').read_text())
    rows = [json.loads(line) for line in (run_dir / 'metrics.jsonl').read_text().splitlines() if line.strip()]
    fluct = json.loads((run_dir / 'fluctuation.json').read_text())
    config = yaml.safe_load((run_dir / 'config.yaml').read_text()) if (run_dir / 'config.yaml').is_file() else {}
    checkpoints = json.loads(eval_results.read_text())['checkpoints']
    result = next(iter(checkpoints.values()))
    epochs = int(train['epochs'])
    curve_epochs = fluct['curve_epochs']
    curves = fluct['curves']
    windows = {name: {layer: window_mean(curve_epochs, values, epochs, lo, hi) for layer, values in curves.items()}
               for name, (lo, hi) in FLUCTUATION_WINDOWS.items()}
    corr = result['corruptions']
    severities = [int(s) for s in corr['severities']]
    per_severity = {str(s): _mean([corr['cells'][c][str(s)]['top1'] for c in corr['corruptions']])
                    for s in severities}
    agreement = result['routing']['agreement']
    layers = list(result['routing']['layers'])
    agree = {str(s): {layer: _mean([agreement[c][str(s)][layer] for c in agreement]) for layer in layers + ['mean']}
             for s in severities}
    adversarial: Dict[str, Dict[str, float]] = {}
    for a in result.get('adversarial', []):
        adversarial.setdefault(a['attack'], {})[f'{a["eps"]:g}'] = a['adv_top1']
    load_cv = {layer: v['load_cv'] for layer, v in result['routing']['layers'].items()}
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
        'corruption': {'per_severity': per_severity, 'mean_accuracy': corr['mean_corruption_accuracy'],
                       'mce': corr['mce'], 'errors': corr['errors']},
        'adversarial': adversarial,
        'fluctuation': {'epochs': curve_epochs, 'curves': curves, 'windows': windows},
        'routing': {'agreement': agree, 'load_cv': load_cv, 'load_cv_mean': _mean(list(load_cv.values()))},
        'timing': {'epoch_s': _mean(epoch_times), 'train_s': train_s, 'eval_s': eval_s,
                   'wall_s': train_s + (eval_s or 0.0)},
        'hardware': hardware or _hardware(), 'commands': list(commands),
    }


# ------------------------------------------------------------------------------------------------------ runner --

def _command_text(cmd: Sequence[str]) -> str:
    """A command as a user would type it from the repository root (``python`` for the interpreter)."""
    parts = ['python' if i == 0 else (os.path.relpath(p, REPO) if os.path.isabs(p) and p.startswith(str(REPO))
                                      else p) for i, p in enumerate(cmd)]
    return shlex.join(parts)


def train_command(run: Run, runs_dir: Path, resume: bool, extra: Sequence[str] = ()) -> List[str]:
    py = [sys.executable, str(REPO / 'train.py')]
    if resume:
        return py + ['--resume', str(runs_dir / run.name), '--no-progress']
    return py + ['-c', str(REPO / run.arm.config), '--seed', str(run.seed), '--output', str(runs_dir),
                 '--experiment', run.name, '--no-progress', *extra]


def eval_command(run: Run, runs_dir: Path, plan: EvalPlan, cache_dir: Path) -> List[str]:
    """evaluate.py on the run's best checkpoint; ``--reference`` the softmax run of the same family and seed when its
    evaluation exists."""
    cmd = [sys.executable, str(REPO / 'evaluate.py'), '--checkpoint', str(runs_dir / run.name), *plan.flags(),
           '--output', str(runs_dir / run.name / 'eval'), '--cache-dir', str(cache_dir), '--no-progress']
    reference = runs_dir / f'{run.arm.family}_softmax_s{run.seed}' / 'eval' / 'results.json'
    if run.arm.router != 'softmax' and reference.is_file():
        cmd += ['--reference', str(reference)]
    return cmd


def _call(cmd: Sequence[str], log: Callable[[str], None]) -> int:
    log(f'$ {_command_text(cmd)}')
    return subprocess.call(list(cmd), cwd=REPO)


def execute_run(run: Run, runs_dir: Path, docs: Path, plan: EvalPlan, cache_dir: Path,
                train_extra: Sequence[str], log: Callable[[str], None]) -> Dict[str, Any]:
    """Train (or resume, or skip when ``results.json`` exists), evaluate (unless done) and write the summary."""
    run_dir = runs_dir / run.name
    commands = [_command_text(train_command(run, runs_dir, False, train_extra))]
    if not (run_dir / 'results.json').is_file():
        resume = (run_dir / 'last.pt').is_file()
        cmd = train_command(run, runs_dir, resume, train_extra)
        if resume:
            commands.append(_command_text(cmd))
        code = _call(cmd, log)
        if code != 0:
            raise StudyError(f'train.py exited with code {code} for {run.name}; its run folder {run_dir} is kept: '
                             'fix the cause and rerun (a partial run resumes from last.pt)')
    results = run_dir / 'eval' / 'results.json'
    timing_file = run_dir / 'eval' / 'study_timing.json'
    cmd = eval_command(run, runs_dir, plan, cache_dir)
    commands.append(_command_text(cmd))
    if not (results.is_file() and timing_file.is_file()):
        started = time.perf_counter()
        code = _call(cmd, log)
        if code != 0:
            raise StudyError(f'evaluate.py exited with code {code} for {run.name}; rerun the study to retry')
        timing_file.write_text(json.dumps({'eval_s': time.perf_counter() - started}) + '\n')
    eval_s = json.loads(timing_file.read_text())['eval_s']
    summary = summarize_run(run_dir, results, run.arm.name, run.seed, commands, eval_s=eval_s)
    reference = summary_path(docs, f'{run.arm.family}_softmax_s{run.seed}')
    if run.arm.router == 'softmax':
        summary['corruption']['relative_mce'] = 100.0
    elif reference.is_file():
        summary['corruption']['relative_mce'] = relative_mce(summary['corruption']['errors'],
                                                             json.loads(reference.read_text())['corruption']['errors'])
    maps = sorted((run_dir / 'eval' / 'expert_maps').glob('*.png'))
    if maps and run.seed == run.arm.seeds[0]:  # one map (the deepest MoE layer) per arm, kept small in docs/
        target = docs / 'results' / 'maps' / f'{run.name}.png'
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(maps[-1], target)
        summary['expert_map'] = os.path.relpath(target, docs)
    path = summary_path(docs, run.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=1) + '\n')
    log(f'wrote {path}')
    return summary


def run_study(runs: Sequence[Run], runs_dir: Path, docs: Path, budget_s: Optional[float], plan: EvalPlan,
              cache_dir: Path, train_extra: Sequence[str] = (), log: Callable[[str], None] = print,
              clock: Callable[[], float] = time.monotonic,
              execute: Callable[..., Dict[str, Any]] = execute_run) -> List[str]:
    """Run the missing runs in order until the next one would not fit ``budget_s``; returns the runs completed."""
    start = clock()
    done = []
    for r in runs:
        if run_status(r.name, runs_dir, docs) == 'done':
            continue
        estimate = estimate_seconds(r, runs_dir, load_summaries(docs))
        elapsed = clock() - start
        if not fits_budget(elapsed, estimate, budget_s):
            log(f'stopping before {r.name}: it needs ~{estimate / 60:.0f} min and {(budget_s - elapsed) / 60:.0f} '
                'min of the budget are left; commit docs/results and continue in the next session')
            break
        log(f'== {r.name} (~{estimate / 60:.0f} min)')
        execute(r, runs_dir, docs, plan, cache_dir, train_extra, log)
        done.append(r.name)
    return done


# ------------------------------------------------------------------------------------------------------ report --

def mean_std(values: Sequence[Optional[float]]) -> tuple[Optional[float], Optional[float], int]:
    """(mean, sample standard deviation (n-1), n) of the non-missing values; std is None below two values."""
    xs = [v for v in values if v is not None]
    if not xs:
        return None, None, 0
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else None
    return mean, std, len(xs)


def fmt(values: Sequence[Optional[float]], digits: int = 2, sign: bool = False) -> str:
    """'m ± s' over seeds (n >= 2), 'm' for one value, '–' for none."""
    mean, std, n = mean_std(values)
    if n == 0:
        return '–'
    text = f'{mean:+.{digits}f}' if sign else f'{mean:.{digits}f}'
    return text if std is None else f'{text} ± {std:.{digits}f}'


def paired_deltas(summaries: Sequence[Dict[str, Any]], arm: str, reference: str,
                  metric: Callable[[Dict[str, Any]], Optional[float]]) -> List[float]:
    """``metric(arm run) - metric(reference run)`` for every seed both have (the per-seed paired differences)."""
    by_seed = {(s['arm'], s['seed']): s for s in summaries}
    out = []
    for (name, seed), s in sorted(by_seed.items(), key=lambda kv: kv[0][1]):
        ref = by_seed.get((reference, seed))
        if name == arm and ref is not None:
            a, b = metric(s), metric(ref)
            if a is not None and b is not None:
                out.append(a - b)
    return out


def _rel_mce(summaries: Sequence[Dict[str, Any]]) -> Callable[[Dict[str, Any]], Optional[float]]:
    """Relative mCE of a summary against the softmax run of its family and seed (recomputed from the errors)."""
    refs = {(s['arm'], s['seed']): s for s in summaries}

    def metric(s: Dict[str, Any]) -> Optional[float]:
        ref = refs.get((f'{ARMS[s["arm"]].family}_softmax', s['seed'])) if s['arm'] in ARMS else None
        if ref is None:
            return None
        return relative_mce(s['corruption']['errors'], ref['corruption']['errors'])
    return metric


def _metrics(summaries: Sequence[Dict[str, Any]]) -> Dict[str, tuple[str, Callable[[Dict[str, Any]], Any]]]:
    """The headline metrics: column title and how to read it from a summary."""
    out: Dict[str, tuple[str, Callable[[Dict[str, Any]], Any]]] = {
        'test_top1': ('test top-1 (%)', lambda s: s['test_top1']),
        'val_top1': ('val top-1 (%)', lambda s: s['val_top1']),
        'corr_acc': ('mean corr. acc. (%)', lambda s: s['corruption']['mean_accuracy']),
        'mce': ('mCE, unnorm. (%)', lambda s: s['corruption']['mce']),
        'rel_mce': ('mCE vs softmax (%)', _rel_mce(summaries)),
    }
    planned = {f'{e:g}' for e in EvalPlan().eps}
    eps = sorted(planned | {e for s in summaries for e in s['adversarial'].get('pgd', {})}, key=float)
    for e in eps:
        out[f'pgd_{e}'] = (f'PGD {e}/255 top-1 (%)', lambda s, e=e: s['adversarial'].get('pgd', {}).get(e))
    for name in FLUCTUATION_WINDOWS:
        out[f'fluct_{name}'] = (f'fluctuation {name}', lambda s, n=name: s['fluctuation']['windows'][n].get('mean'))
    out['agree'] = ('agreement s3', lambda s: s['routing']['agreement'].get('3', {}).get('mean'))
    out['load_cv'] = ('expert-load CV', lambda s: s['routing']['load_cv_mean'])
    out['epoch_s'] = ('s / epoch', lambda s: s['timing']['epoch_s'])
    return out


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join('---' for _ in header) + '|']
    return lines + ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]


def _family_arms(family: str, ablations: bool) -> List[Arm]:
    return [a for a in ARMS.values() if a.family == family and (a.knob is not None) == ablations]


def _router_table(summaries: Sequence[Dict[str, Any]], arms: Sequence[Arm], planned: Optional[int] = None) -> List[str]:
    """One row per arm: 'n' is runs done / planned (``planned`` overrides each arm's seed count)."""
    metrics = _metrics(summaries)
    digits = {'fluct_40-90%': 4, 'fluct_last 30%': 4, 'agree': 3, 'load_cv': 3, 'epoch_s': 0}
    rows = []
    for arm in arms:
        group = [s for s in summaries if s['arm'] == arm.name]
        label = arm.router if arm.knob is None else f'{arm.router}, {arm.knob}'
        rows.append([label, f'{len(group)}/{planned or len(arm.seeds)}'] + [fmt([f(s) for s in group], digits.get(k, 2))
                                                                 for k, (_, f) in metrics.items()])
    return _table(['router', 'n'] + [title for title, _ in metrics.values()], rows)


def _severity_table(summaries: Sequence[Dict[str, Any]], arms: Sequence[Arm], key: str) -> List[str]:
    severities = sorted(set(SEVERITIES) | {int(x) for s in summaries for x in s['corruption']['per_severity']})
    rows = []
    for arm in arms:
        group = [s for s in summaries if s['arm'] == arm.name]
        if key == 'accuracy':
            cells = [fmt([s['eval']['clean_top1'] for s in group])]
            cells += [fmt([s['corruption']['per_severity'].get(str(v)) for s in group]) for v in severities]
        else:
            cells = [fmt([s['routing']['agreement'].get(str(v), {}).get('mean') for s in group], 3)
                     for v in severities]
        rows.append([arm.router if arm.knob is None else f'{arm.router}, {arm.knob}'] + cells)
    header = ['router'] + (['clean'] if key == 'accuracy' else []) + [f's{v}' for v in severities]
    return _table(header, rows)


def _plot(series: Dict[str, Dict[int, float]], xlabel: str, ylabel: str, title: str, path: Path) -> Optional[str]:
    """One line per label (x -> mean over seeds); None when there is nothing to draw."""
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for label, points in series.items():
        xs = sorted(points)
        ax.plot(xs, [points[x] for x in xs], marker='o', label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path.name


def _mean_points(groups: Sequence[Dict[Any, Optional[float]]]) -> Dict[int, float]:
    """Pointwise mean over seeds of {x: value} dicts (x as int; missing values skipped)."""
    points: Dict[int, List[float]] = {}
    for g in groups:
        for x, v in g.items():
            if v is not None:
                points.setdefault(int(x), []).append(v)
    return {x: sum(v) / len(v) for x, v in sorted(points.items())}


def _figures(summaries: Sequence[Dict[str, Any]], family: str, folder: Path) -> List[str]:
    arms = _family_arms(family, False)
    groups = {a.router: [s for s in summaries if s['arm'] == a.name] for a in arms}
    fluct = {r: _mean_points([dict(zip(s['fluctuation']['epochs'], s['fluctuation']['curves']['mean'], strict=True))
                              for s in g]) for r, g in groups.items()}
    acc = {r: _mean_points([{0: s['eval']['clean_top1'], **s['corruption']['per_severity']} for s in g])
           for r, g in groups.items()}
    agree = {r: _mean_points([{k: v['mean'] for k, v in s['routing']['agreement'].items()} for s in g])
             for r, g in groups.items()}
    made = [_plot(fluct, 'epoch', 'routing fluctuation (probe tokens)', f'{family}: fluctuation vs epoch',
                  folder / f'{family}_fluctuation.png'),
            _plot(acc, 'severity (0 = clean)', 'top-1 (%)', f'{family}: accuracy vs severity',
                  folder / f'{family}_accuracy_vs_severity.png'),
            _plot(agree, 'severity', 'clean vs corrupted top-1 expert agreement', f'{family}: routing agreement',
                  folder / f'{family}_agreement_vs_severity.png')]
    return [m for m in made if m]


def _conclusions(summaries: Sequence[Dict[str, Any]]) -> List[str]:
    """Paired per-seed differences of every graph router against softmax, stated mechanically."""
    metrics = _metrics(summaries)
    lines = []
    for family in FAMILY_TITLES:
        for router in ('similarity', 'attention'):
            arm, ref = f'{family}_{router}', f'{family}_softmax'
            for key, unit in (('test_top1', 'pp'), ('corr_acc', 'pp'), ('rel_mce', ''), ('fluct_40-90%', ''),
                              ('fluct_last 30%', ''), ('agree', '')) + tuple((k, 'pp') for k in metrics
                                                                               if k.startswith('pgd_')):
                title, metric = metrics[key]
                deltas = paired_deltas(summaries, arm, ref, metric)
                if not deltas:
                    continue
                digits = 4 if key.startswith('fluct') else 3 if key == 'agree' else 2
                value = fmt(deltas, digits, sign=True)
                lines.append(f'- {family} {router} − softmax, {title}: {value}{" " + unit if unit else ""} over '
                             f'{len(deltas)} seed(s)')
    return lines or ['- (no paired runs yet)']


def _human_section(previous: Optional[str]) -> str:
    """The human-written conclusion of an existing results.md (between the markers), or a placeholder."""
    if previous and HUMAN_BEGIN in previous and HUMAN_END in previous:
        return previous[previous.index(HUMAN_BEGIN):previous.index(HUMAN_END) + len(HUMAN_END)]
    return '\n'.join([HUMAN_BEGIN, '_To be written by a person once the study is complete: what the numbers above do '
                      'and do not support, with their uncertainty._', HUMAN_END])


def _command_templates() -> List[str]:
    """The train and evaluate commands of a run of arm A with seed S (the defaults of ``run``)."""
    run, runs_dir = Run(Arm('A', 'F', 'similarity', ()), 0), REPO / 'runs' / 'study'
    train = _command_text(train_command(run, runs_dir, False))
    evaluate = _command_text(eval_command(run, runs_dir, EvalPlan(), REPO / 'data' / 'cache' / 'corruptions'))
    reference = ' [--reference runs/study/F_softmax_sS/eval/results.json]'
    return [train.replace('--seed 0', '--seed S').replace('A_s0', 'A_sS'), evaluate.replace('A_s0', 'A_sS') + reference]


def render_report(summaries: Sequence[Dict[str, Any]], docs: Path, previous: Optional[str] = None) -> str:
    """``docs/results.md`` from the run summaries (figures are written to ``docs/results/``)."""
    expected = [r.name for r in select_runs()]
    have = {s['run'] for s in summaries}
    missing = [r for r in expected if r not in have]
    lines = ['# Results: the paper\'s claims at small scale', '',
             'Generated by `python -m simoe_vision.study report` from the run summaries in `docs/results/runs/`; '
             'do not edit by hand except the conclusion between the markers.', '']
    if missing:
        lines += [f'**Study incomplete: {len(have & set(expected))} of {len(expected)} runs done.** Runs missing: '
                  + ', '.join(missing), '']
    else:
        lines += [f'All {len(expected)} runs done.', '']
    lines += ['## Setup', '',
              'Fashion-MNIST (28 px: native for the V-MoE arms with 7 px patches, zero-padded to 32 for Swin-MoE): '
              '5000 training images held out for model selection (best epoch on validation; the test set is used for '
              'the reported numbers only). Everything equal across routers but '
              'the router. Evaluation: `evaluate.py` on a fixed seeded subset of the test set (see the commands), '
              'corruptions generated at 5 severities, FGSM/PGD L-inf attacks, clean-vs-corrupted routing agreement. '
              'Values are mean ± sample std over seeds; `n` is seeds done / planned. Test top-1 is on the full 10000 '
              'test images; the corruption and attack numbers on the evaluation subset. mCE vs softmax: relative to '
              'the softmax run of the same seed (100 = same). Fluctuation: share of probe tokens whose top-1 expert '
              'changed since the previous epoch, averaged over the epochs ending in 40–90 % and in the last 30 % of '
              'training. Agreement s3: at severity 3, averaged over corruptions and MoE layers.', '']
    figures_dir = docs / 'results'
    for family, title in FAMILY_TITLES.items():
        group = [s for s in summaries if ARMS.get(s['arm']) and ARMS[s['arm']].family == family]
        lines += [f'## {title}', '', *_router_table(summaries, _family_arms(family, False)), '',
                  'Accuracy (%) per corruption severity (mean over corruptions):', '',
                  *_severity_table(summaries, _family_arms(family, False), 'accuracy'), '',
                  'Routing agreement clean vs corrupted per severity:', '',
                  *_severity_table(summaries, _family_arms(family, False), 'agreement'), '']
        for name in _figures(group, family, figures_dir):
            lines += [f'![{name}](results/{name})', '']
        if _family_arms(family, True):
            base = [a for a in _family_arms(family, False) if a.router == 'similarity']
            lines += [f'### {family} ablations (1 seed; baseline: similarity, tau 0.1, mix probs, alpha 1)', '',
                      *_router_table([s for s in summaries if s['seed'] == 0], base + _family_arms(family, True), 1),
                      '']
    maps = [(s['run'], s['expert_map']) for s in summaries if s.get('expert_map')]
    if maps:
        lines += ['## Expert maps', '', 'Top-1 expert per token of the deepest MoE layer, clean vs corrupted, one run '
                  'per arm:', '']
        lines += [f'![{run}]({path})' for run, path in maps] + ['']
    lines += ['## Mechanical comparison (paired by seed)', '', *_conclusions(summaries), '',
              '## Conclusion', '', _human_section(previous), '', '## Commands', '',
              'Everything: `python -m simoe_vision.study run --budget-minutes 150` (repeat per session; commit '
              '`docs/results/` after each), then `python -m simoe_vision.study report`. Each run (arm A, seed S) is:',
              '', '```', *_command_templates(), '```', '']
    if summaries:
        lines += ['The commands of each finished run, as recorded:', '', '```']
        for s in summaries:
            lines += [f'# {s["run"]}', *s['commands']]
        lines += ['```', '']
    lines += ['## Hardware and wall time', '']
    if not summaries:
        return '\n'.join(lines + ['No runs yet.', ''])
    rows = [[s['run'], s['hardware']['cpu'], str(s['hardware']['cpu_count']), s['hardware']['torch'],
             f'{s["timing"]["epoch_s"]:.0f}', f'{s["timing"]["wall_s"] / 60:.1f}'] for s in summaries]
    lines += _table(['run', 'CPU', 'cores', 'torch', 's / epoch', 'wall (min)'], rows)
    total = sum(s['timing']['wall_s'] for s in summaries)
    platforms = sorted({s['hardware']['platform'] for s in summaries})
    lines += ['', f'Total wall time: {total / 3600:.1f} h over {len(summaries)} run(s). Platform(s): '
              + (', '.join(platforms) or '–') + '.', '']
    return '\n'.join(lines)


def write_report(docs: Path) -> Path:
    path = docs / 'results.md'
    previous = path.read_text() if path.is_file() else None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report(load_summaries(docs), docs, previous))
    return path


# --------------------------------------------------------------------------------------------------------- CLI --

def _csv(value: str) -> List[str]:
    return [v.strip() for v in value.split(',') if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='python -m simoe_vision.study', description=__doc__.split('\n\n')[0])
    p.add_argument('command', choices=('plan', 'run', 'report'))
    p.add_argument('--arms', type=_csv, default=None, help=f'comma-separated arms (default all: {", ".join(ARMS)})')
    p.add_argument('--seeds', type=lambda v: [int(x) for x in _csv(v)], default=None,
                   help="comma-separated seeds (default: each arm's own)")
    p.add_argument('--budget-minutes', type=float, default=None,
                   help='run: do not start a run that would end after this many minutes')
    p.add_argument('--runs-dir', default=None, help='run folders (default runs/study)')
    p.add_argument('--docs', default=None, help='folder of results.md and results/ (default docs)')
    p.add_argument('--cache-dir', default='data/cache/corruptions', help='cache of generated corruptions')
    p.add_argument('--smoke', action='store_true',
                   help='run: the whole pipeline with a tiny model and data into a temporary folder (plumbing check)')
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.smoke:
            if args.runs_dir or args.docs:
                raise StudyError('--smoke writes to a temporary folder; drop --runs-dir/--docs')
            root = Path(tempfile.mkdtemp(prefix='simoe-study-smoke-'))
            runs_dir, docs, cache_dir = root / 'runs', root / 'docs', root / 'cache'
            print(f'smoke: writing under {root}')
            arms, plan, extra = args.arms or list(SMOKE_ARMS), SMOKE_EVAL, SMOKE_TRAIN
        else:
            runs_dir, docs = Path(args.runs_dir or 'runs/study'), Path(args.docs or 'docs')
            cache_dir, arms, plan, extra = Path(args.cache_dir), args.arms, EvalPlan(), []
        runs = select_runs(arms, args.seeds or (list(SMOKE_SEEDS) if args.smoke else None))
        if args.command == 'plan':
            rows = plan_runs(runs, runs_dir, docs)
            for row in rows:
                print(f'{row["run"]:32s} {row["status"]:8s} ~{row["estimate_s"] / 60:5.1f} min')
            left = sum(r['estimate_s'] for r in rows)
            print(f'{sum(r["status"] == "done" for r in rows)}/{len(rows)} done; ~{left / 3600:.1f} h of runs left')
        elif args.command == 'run':
            budget = args.budget_minutes * 60 if args.budget_minutes is not None else None
            completed = run_study(runs, runs_dir.resolve(), docs, budget, plan, cache_dir.resolve(), extra)
            print(f'completed {len(completed)} run(s): {", ".join(completed) or "none"}')
            print(f'wrote {write_report(docs)}')
        else:
            print(f'wrote {write_report(docs)}')
    except StudyError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())

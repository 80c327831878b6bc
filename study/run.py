"""Running a study: each missing run is trained with ``train.py`` (or resumed), evaluated with ``evaluate.py`` and
summarised, one after another, until the next one would not fit the session's budget. Finished training or
evaluation is never redone, so a study continues across sessions from its run folders and committed summaries."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from simoe_vision.evaluation.report import relative_ce

from .design import REPO, EvalPlan, Run, Study, StudyError, arm_flags
from .plan import estimate_seconds, fits_budget, run_status
from .summarize import load_summaries, summarize_run

__all__ = ['SMOKE_EVAL', 'SMOKE_SEEDS', 'SMOKE_TRAIN', 'command_text', 'eval_command', 'execute_run', 'run_study',
           'train_command']

# Smoke mode: the whole pipeline on a tiny model and data, into a temporary folder (proves the subprocess plumbing).
SMOKE_TRAIN = ['--model', 'vmoe_test', '--train-subset', '256', '--epochs', '1', '--val-size', '128',
               '--probe-size', '32', '--workers', '0']
SMOKE_EVAL = EvalPlan(eval_subset=32, corruptions=('gaussian_noise', 'contrast'), pgd_steps=2)
SMOKE_SEEDS = (0, 1)  # two seeds: the report's mean ± std and paired differences get exercised too


def command_text(cmd: Sequence[str]) -> str:
    """A command as a user would type it from the repository root (``python`` for the interpreter)."""
    parts = ['python' if i == 0 else (os.path.relpath(p, REPO) if os.path.isabs(p) and p.startswith(str(REPO))
                                      else p) for i, p in enumerate(cmd)]
    return shlex.join(parts)


def train_command(run: Run, runs_dir: Path, resume: bool, extra: Sequence[str] = ()) -> List[str]:
    """train.py on the family's base config with the arm's flags (``extra`` last, so it wins), or its resumption."""
    py = [sys.executable, str(REPO / 'train.py')]
    if resume:
        return py + ['--resume', str(runs_dir / run.name), '--no-progress']
    return py + ['-c', str(REPO / run.arm.family.config), *arm_flags(run.arm), '--seed', str(run.seed),
                 '--output', str(runs_dir), '--experiment', run.name, '--no-progress', *extra]


def _reference_run(run: Run) -> str:
    return f'{run.arm.family.reference}_s{run.seed}'


def eval_command(run: Run, runs_dir: Path, plan: EvalPlan, cache_dir: Path) -> List[str]:
    """evaluate.py on the run's best checkpoint; ``--reference`` the family's reference run of the same seed when
    its evaluation exists."""
    cmd = [sys.executable, str(REPO / 'evaluate.py'), '--checkpoint', str(runs_dir / run.name),
           *plan.flags(run.seed, run.arm.baseline is not None),
           '--output', str(runs_dir / run.name / 'eval'), '--cache-dir', str(cache_dir), '--no-progress']
    reference = runs_dir / _reference_run(run) / 'eval' / 'results.json'
    if run.arm.name != run.arm.family.reference and reference.is_file():
        cmd += ['--reference', str(reference)]
    return cmd


def _call(cmd: Sequence[str], log: Callable[[str], None]) -> int:
    log(f'$ {command_text(cmd)}')
    return subprocess.call(list(cmd), cwd=REPO)


def execute_run(study: Study, run: Run, runs_dir: Path, docs: Path, plan: EvalPlan, cache_dir: Path,
                train_extra: Sequence[str], log: Callable[[str], None]) -> Dict[str, Any]:
    """Train (or resume, or skip when ``results.json`` exists), evaluate (unless done) and write the summary."""
    run_dir = runs_dir / run.name
    commands = [command_text(train_command(run, runs_dir, False, train_extra))]
    if not (run_dir / 'results.json').is_file():
        resume = (run_dir / 'last.pt').is_file()
        cmd = train_command(run, runs_dir, resume, train_extra)
        if resume:
            commands.append(command_text(cmd))
        code = _call(cmd, log)
        if code != 0:
            raise StudyError(f'train.py exited with code {code} for {run.name}; its run folder {run_dir} is kept: '
                             'fix the cause and rerun (a partial run resumes from last.pt)')
    results = run_dir / 'eval' / 'results.json'
    timing_file = run_dir / 'eval' / 'study_timing.json'
    cmd = eval_command(run, runs_dir, plan, cache_dir)
    commands.append(command_text(cmd))
    if not (results.is_file() and timing_file.is_file()):
        started = time.perf_counter()
        code = _call(cmd, log)
        if code != 0:
            raise StudyError(f'evaluate.py exited with code {code} for {run.name}; rerun the study to retry')
        timing_file.write_text(json.dumps({'eval_s': time.perf_counter() - started}) + '\n')
    eval_s = json.loads(timing_file.read_text())['eval_s']
    summary = summarize_run(run_dir, results, run.arm.name, run.seed, commands, eval_s=eval_s)
    reference = study.summary_path(docs, _reference_run(run))
    if run.arm.name == run.arm.family.reference:
        summary['corruption']['relative_mce'] = 100.0
    elif reference.is_file():
        errors = json.loads(reference.read_text())['corruption']['errors']
        summary['corruption']['relative_mce'] = relative_ce(summary['corruption']['errors'], errors)['mce']
    maps = sorted((run_dir / 'eval' / 'expert_maps').glob('*.png'))
    if maps and run.seed == run.arm.seeds[0]:  # one map (the deepest MoE layer) per arm, kept small in docs/
        target = study.results_dir(docs) / 'maps' / f'{run.name}.png'
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(maps[-1], target)
        summary['expert_map'] = os.path.relpath(target, docs)
    path = study.summary_path(docs, run.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=1) + '\n')
    log(f'wrote {path}')
    return summary


def run_study(study: Study, runs: Sequence[Run], runs_dir: Path, docs: Path, budget_s: Optional[float],
              plan: Optional[EvalPlan], cache_dir: Path, train_extra: Sequence[str] = (),
              log: Callable[[str], None] = print, clock: Callable[[], float] = time.monotonic,
              execute: Callable[..., Dict[str, Any]] = execute_run) -> List[str]:
    """Run the missing runs in order until the next one would not fit ``budget_s``; returns the runs completed.
    ``plan`` evaluates every run (the smoke test's); None evaluates each with its family's (``Study.plan_for``)."""
    start = clock()
    done = []
    for r in runs:
        if run_status(study, r.name, runs_dir, docs) == 'done':
            continue
        estimate = estimate_seconds(study, r, runs_dir, load_summaries(study, docs))
        elapsed = clock() - start
        if not fits_budget(elapsed, estimate, budget_s):
            log(f'stopping before {r.name}: it needs ~{estimate / 60:.0f} min and {(budget_s - elapsed) / 60:.0f} '
                f'min of the budget are left; commit {study.results_dir(docs)} and continue in the next session')
            break
        log(f'== {r.name} (~{estimate / 60:.0f} min)')
        execute(study, r, runs_dir, docs, plan or study.plan_for(r.arm.family), cache_dir, train_extra, log)
        done.append(r.name)
    return done

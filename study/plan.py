"""Which runs a study has, in what order, how far each is (done / partial / todo) and how long the rest should take;
``run`` uses the same estimates to stop before a run that would not fit the session's budget."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from simoe_vision.evaluation.report import mean_of

from .design import Run, Study, StudyError, arm_config
from .summarize import load_summaries

__all__ = ['estimate_seconds', 'fits_budget', 'plan_runs', 'run_status', 'select_runs']

OVERHEAD_SECONDS = 60.0  # train.py start-up, data loading and its final test-set evaluation
FASHION_MNIST_TRAIN = 60000  # training images before the validation holdout


def select_runs(study: Study, arms: Optional[Sequence[str]] = None,
                seeds: Optional[Sequence[int]] = None) -> List[Run]:
    """The study's runs in priority order, restricted to ``arms`` and ``seeds`` when given.

    Arms keep their declared order, except that each family's main comparison runs seed-major (every seed's
    reference run first, then its comparisons), so that a session cut short leaves complete seeds."""
    unknown = [a for a in arms or () if study.arm(a) is None]
    if unknown:
        raise StudyError(f'unknown arm(s) {", ".join(unknown)}; choose from {", ".join(a.name for a in study.arms)}')
    order = {arm.name: i for i, arm in enumerate(study.arms)}
    groups: Dict[str, List[Run]] = {}
    for arm in study.arms:
        if arms is None or arm.name in arms:
            group = groups.setdefault(arm.family.name if arm.baseline is None else arm.name, [])
            group += [Run(arm, s) for s in arm.seeds if seeds is None or s in seeds]
    return [r for group in groups.values() for r in sorted(group, key=lambda r: (r.seed, order[r.arm.name]))]


def run_status(study: Study, run: str, runs_dir: Path, docs: Path) -> str:
    """'done' (summary written under ``docs``), 'partial' (``last.pt`` in its run folder) or 'todo'."""
    if study.summary_path(docs, run).is_file():
        return 'done'
    if (runs_dir / run / 'last.pt').is_file():
        return 'partial'
    return 'todo'


def _epochs_done(run_dir: Path) -> int:
    path = run_dir / 'metrics.jsonl'
    return sum(1 for line in path.read_text().splitlines() if line.strip()) if path.is_file() else 0


def estimate_seconds(study: Study, run: Run, runs_dir: Path, summaries: Sequence[Dict[str, Any]]) -> float:
    """Expected remaining seconds of a run: epochs left x seconds per epoch + evaluation + ``OVERHEAD_SECONDS``.

    Seconds per epoch and evaluation come from the finished runs of the same arm, else of the same family, else
    from the family's ``images_per_second`` and ``eval_seconds``; a partial run only counts the epochs it has left."""
    config = arm_config(run.arm)
    same_arm = [s for s in summaries if s['arm'] == run.arm.name]
    same_family = [s for s in summaries if (arm := study.arm(s['arm'])) is not None and arm.family == run.arm.family]
    measured = same_arm or same_family
    per_epoch = mean_of(s['timing']['train_s'] / s['epochs'] for s in measured if s['timing'].get('train_s'))
    if per_epoch is None:
        images = config['train_subset'] or FASHION_MNIST_TRAIN - config['val_size']
        per_epoch = images / run.arm.family.images_per_second
    eval_s = mean_of(s['timing']['eval_s'] for s in measured if s['timing'].get('eval_s'))
    remaining = max(config['epochs'] - _epochs_done(runs_dir / run.name), 0)
    return remaining * per_epoch + (eval_s if eval_s is not None else run.arm.family.eval_seconds) + OVERHEAD_SECONDS


def fits_budget(elapsed_s: float, estimate_s: float, budget_s: Optional[float]) -> bool:
    """Whether a run expected to take ``estimate_s`` can start after ``elapsed_s`` within ``budget_s`` (None: no
    budget)."""
    return budget_s is None or elapsed_s + estimate_s <= budget_s


def plan_runs(study: Study, runs: Sequence[Run], runs_dir: Path, docs: Path) -> List[Dict[str, Any]]:
    """One row per run: name, status and estimated remaining seconds (0 when done)."""
    summaries = load_summaries(study, docs)
    rows = []
    for r in runs:
        status = run_status(study, r.name, runs_dir, docs)
        estimate = 0.0 if status == 'done' else estimate_seconds(study, r, runs_dir, summaries)
        rows.append({'run': r.name, 'status': status, 'estimate_s': estimate})
    return rows

"""``python -m study plan|run|report``: the command line of the study driver.

* ``plan`` lists the runs (arm x seed) with their status: *done* (its summary ``docs/<results>/runs/<run>.json`` is
  committed), *partial* (``<runs-dir>/<run>/last.pt`` exists: training is resumed) or *todo*, and the estimated time.
* ``run`` trains, evaluates and summarises the missing runs one after another, stopping before a run that would not
  fit ``--budget-minutes``; the summaries are small JSON files meant to be committed after each session.
* ``report`` regenerates ``docs/<results>.md`` (tables of mean ± std over seeds, plots, expert maps, commands,
  hardware, mechanical conclusions, the runs still missing) from the committed summaries alone: the run folders
  (checkpoints) are never needed again, so a fresh session can continue the study from the repository.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import List, Optional, Sequence

from . import STUDIES
from .design import DEFAULT_STUDY, StudyError
from .plan import plan_runs, select_runs
from .report import write_report
from .run import SMOKE_EVAL, SMOKE_SEEDS, SMOKE_TRAIN, run_study


def _names(value: str) -> List[str]:
    return [v.strip() for v in value.split(',') if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='python -m study', description='Plan, run (resumable) and report a study.')
    p.add_argument('command', choices=('plan', 'run', 'report'))
    p.add_argument('--study', choices=list(STUDIES), default=DEFAULT_STUDY, help='which study (default %(default)s)')
    p.add_argument('--arms', type=_names, default=None, help="comma-separated arms (default: all of the study's)")
    p.add_argument('--seeds', type=lambda v: [int(x) for x in _names(v)], default=None,
                   help="comma-separated seeds (default: each arm's own)")
    p.add_argument('--budget-minutes', type=float, default=None,
                   help='run: do not start a run that would end after this many minutes')
    p.add_argument('--runs-dir', default=None, help="run folders (default: the study's, runs/study for v1)")
    p.add_argument('--docs', default=None, help='folder of the results file and its folder (default docs)')
    p.add_argument('--cache-dir', default='data/cache/corruptions', help='cache of generated corruptions')
    p.add_argument('--smoke', action='store_true',
                   help='run: the whole pipeline with a tiny model and data into a temporary folder (plumbing check)')
    return p


def _print_plan(rows: Sequence[dict]) -> None:
    for row in rows:
        print(f'{row["run"]:32s} {row["status"]:8s} ~{row["estimate_s"] / 60:5.1f} min')
    left = sum(r['estimate_s'] for r in rows)
    print(f'{sum(r["status"] == "done" for r in rows)}/{len(rows)} done; ~{left / 3600:.1f} h of runs left')


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    study = STUDIES[args.study]
    try:
        if args.smoke:
            if args.runs_dir or args.docs:
                raise StudyError('--smoke writes to a temporary folder; drop --runs-dir/--docs')
            root = Path(tempfile.mkdtemp(prefix='simoe-study-smoke-'))
            runs_dir, docs, cache_dir = root / 'runs', root / 'docs', root / 'cache'
            print(f'smoke: writing under {root}')
            arms, plan, extra = args.arms or list(study.smoke_arms), SMOKE_EVAL, SMOKE_TRAIN
        else:
            runs_dir, docs = Path(args.runs_dir or study.runs_dir), Path(args.docs or 'docs')
            cache_dir, arms, plan, extra = Path(args.cache_dir), args.arms, None, []
        runs = select_runs(study, arms, args.seeds or (list(SMOKE_SEEDS) if args.smoke else None))
        if args.command == 'plan':
            _print_plan(plan_runs(study, runs, runs_dir, docs))
        elif args.command == 'run':
            budget = args.budget_minutes * 60 if args.budget_minutes is not None else None
            completed = run_study(study, runs, runs_dir.resolve(), docs, budget, plan, cache_dir.resolve(), extra)
            print(f'completed {len(completed)} run(s): {", ".join(completed) or "none"}')
            print(f'wrote {write_report(study, docs)}')
        else:
            print(f'wrote {write_report(study, docs)}')
    except StudyError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())

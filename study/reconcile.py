"""Issue 17's reconciliation with the minimal reference, declared as data and run train-only (no evaluate.py).

The reference setting is ``configs/reconcile/reference.yaml``; each other setting switches one of the reference's
differences back to the project's default. Every setting is trained with the softmax and the attention router,
seed 0 (the softmax router is skipped where a setting cannot change it: noise placement). Run folders are
``runs/reconcile/<setting>_<router>`` (resumed when interrupted); each finished run leaves a compact summary in
``docs/results/reconcile/<run>.json``, and ``table`` renders the markdown table of docs/results.md from them::

    python -m study.reconcile run [--budget-minutes N] [--settings a,b] [--routers r] [--stop-after E]
    python -m study.reconcile table

``--stop-after E`` trains only the first E epochs of the 6-epoch schedule (the same epochs a full run has; a later
``run`` without it resumes and finishes them); its summary then has the curves so far and no test top-1. Two
``run``s with different ``--routers`` may go side by side (they never share a run).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from .design import REPO, Arm, Family, Run
from .run import train_command

__all__ = ['FAMILY', 'ROUTERS', 'SETTINGS', 'reconcile_runs', 'summarize', 'table']

FAMILY = Family('reconcile', 'V-MoE nano, 49 tokens, the reference setting', 'configs/reconcile/reference.yaml',
                'reference_softmax', images_per_second=100.0, eval_seconds=0.0)
ROUTERS = ('softmax', 'attention')
# (name, what it switches back to the project's default, the train.py settings doing it, routers it can change)
SETTINGS: Tuple[Tuple[str, str, Mapping[str, Any], Tuple[str, ...]], ...] = (
    ('reference', 'the reference setting', {}, ROUTERS),
    ('init', 'experts trunc-normal 0.02', {'model_kwargs': {'expert_init': 'trunc_normal'}}, ROUTERS),
    ('losses', 'importance + load, weight 0.005',
     {'router_kwargs': {'balance_loss': 'vmoe', 'balance_weight': 0.005}}, ROUTERS),
    ('augment', 'flip 0.5, 3 px crop, smoothing 0.1', {'hflip': 0.5, 'crop_padding': 3, 'smoothing': 0.1}, ROUTERS),
    ('noise', 'noise on log P after the graph', {'router_kwargs': {'noise': 'routing'}}, ('attention',)),
    ('clip', 'gradient clipping 1.0', {'clip_grad': 1.0}, ROUTERS),
    ('droppath', 'drop-path 0', {'drop_path': 0.0}, ROUTERS),
)


def _together(rows: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    """The train.py settings of several rows applied at once (their ``*_kwargs`` mappings merged)."""
    merged: Dict[str, Any] = {}
    for values in rows:
        for key, value in values.items():
            merged[key] = {**merged.get(key, {}), **value} if isinstance(value, Mapping) else value
    return merged


# The bisection step, run right after the reference pair and the noise row: every other difference switched back at
# once. If the effect survives it, the noise placement carries it alone (the one-at-a-time rows then only refine).
_BY_NAME = {row[0]: row for row in SETTINGS}
_OTHERS = ('init', 'losses', 'augment', 'clip', 'droppath')
SETTINGS = (_BY_NAME['reference'], _BY_NAME['noise'],
            ('all_but_noise', 'init, losses, augment, clip and drop-path at once',
             _together([_BY_NAME[name][2] for name in _OTHERS]), ROUTERS),
            *(_BY_NAME[name] for name in _OTHERS))
RUNS_DIR = REPO / 'runs' / 'reconcile'
SUMMARIES = REPO / 'docs' / 'results' / 'reconcile'
ROW_KEYS = ('fluctuation', 'entropy', 'gate_entropy', 'margin', 'flip', 'val_top1', 'epoch_time')


def reconcile_runs(settings: Optional[Sequence[str]] = None,
                   routers: Optional[Sequence[str]] = None) -> List[Tuple[str, Run]]:
    """(setting, run) in priority order: the reference pair first, then each difference switched back."""
    chosen = [s for s in SETTINGS if settings is None or s[0] in settings]
    return [(name, Run(Arm(f'{name}_{router}', FAMILY, router, (0,), settings=dict(values)), 0))
            for name, _, values, setting_routers in chosen for router in setting_routers
            if routers is None or router in routers]


def _folder(run: Run) -> Path:
    return RUNS_DIR / run.name


def summarize(run_dir: Path, setting: str, router: str) -> Dict[str, Any]:
    """The compact summary of a finished run: test top-1 and the per-epoch routing columns of its metrics."""
    rows = [json.loads(line) for line in (run_dir / 'metrics.jsonl').read_text().splitlines() if line.strip()]
    path = run_dir / 'results.json'
    results = json.loads(path.read_text()) if path.is_file() else {}
    return {'setting': setting, 'router': router, 'test_top1': results.get('test_top1'),
            'best_val_top1': results.get('best_val_top1'), 'best_epoch': results.get('best_epoch'),
            'epochs': [r['epoch'] for r in rows], **{key: [r.get(key) for r in rows] for key in ROW_KEYS}}


def _summarized(path: Path, stop_after: Optional[int]) -> bool:
    """Whether the summary at ``path`` covers what this invocation would train."""
    if not path.is_file():
        return False
    summary = json.loads(path.read_text())
    return summary['test_top1'] is not None or (stop_after is not None and len(summary['epochs']) >= stop_after)


def _train(run: Run, stop_after: Optional[int]) -> None:
    folder = _folder(run)
    if (folder / 'results.json').is_file():
        return
    resume = (folder / 'last.pt').is_file()
    if folder.is_dir() and not resume:
        shutil.rmtree(folder)  # stopped before its first checkpoint: nothing to keep
    cmd = train_command(run, RUNS_DIR, resume) + ([] if stop_after is None else ['--stop-after', str(stop_after)])
    with (RUNS_DIR / f'{run.arm.name}.log').open('a') as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)


def run(settings: Optional[Sequence[str]], routers: Optional[Sequence[str]], budget_s: Optional[float],
        stop_after: Optional[int] = None) -> List[str]:
    """Train (or resume) and summarise the missing runs in order, until ``budget_s`` is spent."""
    RUNS_DIR.mkdir(parents=True, exist_ok=True)
    SUMMARIES.mkdir(parents=True, exist_ok=True)
    start, done = time.monotonic(), []
    for setting, r in reconcile_runs(settings, routers):
        out = SUMMARIES / f'{r.arm.name}.json'
        if _summarized(out, stop_after):
            continue
        if budget_s is not None and time.monotonic() - start > budget_s:
            break
        _train(r, stop_after)
        out.write_text(json.dumps(summarize(_folder(r), setting, r.arm.router), indent=1) + '\n')
        done.append(r.arm.name)
        print(f'finished {r.arm.name}', flush=True)
    return done


def snapshot() -> List[str]:
    """Summarise every run with at least one finished epoch (finished or not); a later ``run`` still finishes it."""
    SUMMARIES.mkdir(parents=True, exist_ok=True)
    written = []
    for setting, r in reconcile_runs():
        folder = _folder(r)
        if (folder / 'metrics.jsonl').is_file():
            out = SUMMARIES / f'{r.arm.name}.json'
            out.write_text(json.dumps(summarize(folder, setting, r.arm.router), indent=1) + '\n')
            written.append(r.arm.name)
    return written


def _fmt(values: Sequence[Optional[float]], digits: int = 3, start: int = 1) -> str:
    return ' / '.join('–' if v is None else f'{v:.{digits}f}' for v in values[start:])


def table(summaries: Mapping[str, Dict[str, Any]]) -> str:
    """Markdown: per setting and router, fluctuation after epochs 2..E, final-epoch entropies, test top-1."""
    lines = ['| setting (switched back) | router | fluctuation after epoch 2, 3, ... | H(P) | H(G) | margin | flip |'
             ' test top-1 (%) |',
             '|---|---|---|---|---|---|---|---|']
    for name, what, _, routers in SETTINGS:
        for router in ROUTERS:
            s = summaries.get(f'{name}_{router}')
            if s is None:
                if router in routers:
                    lines.append(f'| {name}: {what} | {router} | not run | | | | | |')
                continue
            last = {k: s[k][-1] for k in ('entropy', 'gate_entropy', 'margin', 'flip')}
            cells = ['–' if v is None else f'{v:.2f}' for v in last.values()]
            top1 = (f'{s["test_top1"]:.1f}' if s['test_top1'] is not None else
                    f'(val {s["val_top1"][-1]:.1f} after epoch {s["epochs"][-1]}; running)' if s['epochs'] else '–')
            lines.append(f'| {name}: {what} | {router} | {_fmt(s["fluctuation"])} | ' + ' | '.join(cells)
                         + f' | {top1} |')
    return '\n'.join(lines)


def load() -> Dict[str, Dict[str, Any]]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(SUMMARIES.glob('*.json'))}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog='python -m study.reconcile', description=__doc__.splitlines()[0])
    p.add_argument('command', choices=('run', 'table', 'snapshot'))
    p.add_argument('--settings', type=lambda v: [x for x in v.split(',') if x], default=None)
    p.add_argument('--routers', type=lambda v: [x for x in v.split(',') if x], default=None)
    p.add_argument('--budget-minutes', type=float, default=None, help='start no run after this many minutes')
    p.add_argument('--stop-after', type=int, default=None, help='train only the first E epochs of each run')
    args = p.parse_args(argv)
    if args.command == 'run':
        run(args.settings, args.routers, None if args.budget_minutes is None else args.budget_minutes * 60,
            args.stop_after)
    elif args.command == 'snapshot':
        print(f'summarised {", ".join(snapshot()) or "nothing yet"}')
    print(table(load()))
    return 0


if __name__ == '__main__':
    sys.exit(main())

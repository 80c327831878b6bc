"""What the report compares: the headline metrics read from a run summary (relative mCE recomputed against the
family's reference run of the same seed) and the per-seed paired differences between two arms."""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from simoe_vision.evaluation.report import relative_ce

from .design import Study
from .summarize import FLUCTUATION_WINDOWS

__all__ = ['AGREEMENT_SEVERITY', 'DIGITS', 'Metric', 'headline_metrics', 'paired_deltas']

Summary = Dict[str, Any]
Metric = Tuple[str, Callable[[Summary], Optional[float]]]  # (column title, how to read it from a summary)
AGREEMENT_SEVERITY = '3'
# Decimals per metric key (2 by default): fluctuation and agreement are shares, seconds per epoch whole seconds.
DIGITS = {f'fluct_{name}': 4 for name in FLUCTUATION_WINDOWS} | {'agree': 3, 'load_cv': 3, 'epoch_s': 0}


def _relative_mce(study: Study, summaries: Sequence[Summary]) -> Callable[[Summary], Optional[float]]:
    """mCE of a summary relative to the reference run of its family and seed (None without one)."""
    by_run = {(s['arm'], s['seed']): s for s in summaries}

    def metric(s: Summary) -> Optional[float]:
        arm = study.arm(s['arm'])
        ref = by_run.get((arm.family.reference, s['seed'])) if arm is not None else None
        if ref is None:
            return None
        return relative_ce(s['corruption']['errors'], ref['corruption']['errors'])['mce']
    return metric


def headline_metrics(study: Study, summaries: Sequence[Summary]) -> Dict[str, Metric]:
    """The report's columns by key, in order; one PGD column per planned or evaluated eps."""
    out: Dict[str, Metric] = {
        'test_top1': ('test top-1 (%)', lambda s: s['test_top1']),
        'val_top1': ('val top-1 (%)', lambda s: s['val_top1']),
        'corr_acc': ('mean corr. acc. (%)', lambda s: s['corruption']['mean_accuracy']),
        'mce': ('mCE, unnorm. (%)', lambda s: s['corruption']['mce']),
        'rel_mce': ('mCE vs softmax (%)', _relative_mce(study, summaries)),
    }
    plans = [study.plan_for(family) for family in study.families]
    planned = {f'{e:g}' for plan in plans for e in plan.eps}
    eps = sorted(planned | {e for s in summaries for e in s['adversarial'].get('pgd', {})}, key=float)
    for e in eps:
        out[f'pgd_{e}'] = (f'PGD {e}/255 top-1 (%)', lambda s, e=e: s['adversarial'].get('pgd', {}).get(e))
    if any(plan.autoattack_subset for plan in plans) or any('autoattack' in s['adversarial'] for s in summaries):
        planned_aa = {f'{e:g}' for plan in plans if plan.autoattack_subset for e in plan.autoattack_eps or plan.eps}
        for e in sorted(planned_aa | {e for s in summaries for e in s['adversarial'].get('autoattack', {})}, key=float):
            out[f'aa_{e}'] = (f'AutoAttack {e}/255 top-1 (%)',
                              lambda s, e=e: s['adversarial'].get('autoattack', {}).get(e))
    for name in FLUCTUATION_WINDOWS:
        out[f'fluct_{name}'] = (f'fluctuation {name}', lambda s, n=name: s['fluctuation']['windows'][n].get('mean'))
    out['agree'] = (f'agreement s{AGREEMENT_SEVERITY}',
                    lambda s: s['routing']['agreement'].get(AGREEMENT_SEVERITY, {}).get('mean'))
    out['load_cv'] = ('expert-load CV', lambda s: s['routing']['load_cv_mean'])
    if any('diagnostics' in s['routing'] for s in summaries):  # studies evaluated since the routing diagnostics
        for key, title in (('entropy', 'H(P)'), ('gate_entropy', 'H(G)'), ('margin', 'P margin'),
                           ('flip', 'flip P vs G')):
            out[f'diag_{key}'] = (title, lambda s, k=key: s['routing'].get('diagnostics', {}).get(k))
    out['epoch_s'] = ('s / epoch', lambda s: s['timing']['epoch_s'])
    return out


def paired_deltas(summaries: Sequence[Summary], arm: str, reference: str,
                  metric: Callable[[Summary], Optional[float]]) -> List[float]:
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

"""Results of an evaluation run: ``results.json`` (everything, per checkpoint), ``results.md`` (tables) and a rich
summary table on the terminal. Relative corruption errors against a softmax-router model are computed here, once
every checkpoint has been evaluated.

The table and statistics helpers (``markdown_table``, ``mean_of``, ``mean_std``, ``format_mean_std``,
``relative_ce``) are shared with the study driver (``study/``), which reports the same quantities over seeds."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

from rich.console import Console
from rich.table import Table

from ..engine.checkpoint import atomic_write_text
from ..robustness import mean_corruption_error
from .plots import per_severity

__all__ = ['add_relative_ce', 'format_mean_std', 'load_reference', 'markdown_report', 'markdown_table', 'mean_of',
           'mean_std', 'relative_ce', 'rich_summary', 'write_json']

Results = Dict[str, Dict[str, Any]]
ErrorTable = Mapping[str, Mapping[Any, float]]


def _int_severities(table: ErrorTable) -> Dict[str, Dict[int, float]]:
    """An error table with its severity keys as ints (JSON files store them as strings)."""
    return {c: {int(s): e for s, e in by_s.items()} for c, by_s in table.items()}


def relative_ce(errors: ErrorTable, reference: ErrorTable, corruptions: Optional[Sequence[str]] = None,
                severities: Optional[Sequence[Any]] = None) -> Dict[str, Any]:
    """``{'ce': {c: CE_c}, 'mce': mCE}`` of an error table relative to a reference model's table (100 = same).

    ``corruptions`` defaults to those of ``errors`` and ``severities`` to its first corruption's; severity keys may
    be ints or strings (as read back from a ``results.json`` or a study summary)."""
    table, ref = _int_severities(errors), _int_severities(reference)
    corruptions = list(corruptions if corruptions is not None else table)
    severities = [int(s) for s in severities] if severities is not None else sorted(table[corruptions[0]])
    scored = mean_corruption_error(table, ref, corruptions, severities)
    return {'ce': scored['ce'], 'mce': scored['mce']}


def load_reference(path: str) -> tuple[str, Dict[str, Dict[int, float]]]:
    """(label, error table) of the reference model in an earlier ``results.json``: its softmax-router checkpoint,
    else its first one."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f'--reference {path} does not exist; pass a results.json written by evaluate.py')
    try:
        checkpoints = json.loads(file.read_text())['checkpoints']
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f'--reference {path} is not a results.json written by evaluate.py ({e})') from None
    with_errors = {k: v for k, v in checkpoints.items() if v.get('corruptions', {}).get('errors')}
    if not with_errors:
        raise ValueError(f'--reference {path} holds no corruption results (run it with --suite c)')
    label = next((k for k, v in with_errors.items() if v.get('router') == 'softmax'), next(iter(with_errors)))
    return f'{label} ({path})', _int_severities(with_errors[label]['corruptions']['errors'])


def add_relative_ce(results: Results, reference: Optional[tuple[str, Dict]] = None) -> None:
    """Add ``corruptions['relative'][ref] = {ce, mce}`` to every checkpoint: against ``reference`` (a
    ``load_reference`` pair) and, when one evaluated checkpoint uses the softmax router, against it (others only)."""
    refs = []
    if reference is not None:
        refs.append(reference)
    softmax = next((k for k, v in results.items() if v.get('router') == 'softmax'
                    and v.get('corruptions', {}).get('errors')), None)
    if softmax is not None:
        refs.append((softmax, results[softmax]['corruptions']['errors']))
    for label, result in results.items():
        corr = result.get('corruptions')
        if not corr or not corr.get('errors'):
            continue
        for ref_label, ref_errors in refs:
            if ref_label == label:
                continue
            missing = [c for c in corr['corruptions'] if c not in ref_errors]
            if missing:
                raise ValueError(f'reference {ref_label} has no results for {", ".join(missing)}; evaluate it on the '
                                 'same corruptions')
            corr.setdefault('relative', {})[ref_label] = relative_ce(corr['errors'], ref_errors, corr['corruptions'],
                                                                     corr['severities'])


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(path: Path, meta: Dict[str, Any], results: Results) -> None:
    """``results.json``, atomically: a kill while it is rewritten leaves the previous one."""
    atomic_write_text(path, json.dumps(_jsonable({'meta': meta, 'checkpoints': results}), indent=1) + '\n')


def _f(value: Optional[float], digits: int = 2) -> str:
    return format_mean_std([value], digits)


def mean_of(values: Iterable[Optional[float]]) -> Optional[float]:
    """Mean of the non-missing values; None when there are none."""
    xs = [v for v in values if v is not None]
    return sum(xs) / len(xs) if xs else None


def mean_std(values: Iterable[Optional[float]]) -> tuple[Optional[float], Optional[float], int]:
    """(mean, sample standard deviation (n - 1), n) of the non-missing values; std is None below two values."""
    xs = [v for v in values if v is not None]
    mean = mean_of(xs)
    if mean is None or len(xs) < 2:
        return mean, None, len(xs)
    return mean, math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)), len(xs)


def format_mean_std(values: Iterable[Optional[float]], digits: int = 2, sign: bool = False) -> str:
    """'m ± s' over two or more values (e.g. seeds), 'm' for one, '–' for none; ``sign`` prefixes + to m >= 0."""
    mean, std, _ = mean_std(values)
    if mean is None:
        return '–'
    text = f'{mean:+.{digits}f}' if sign else f'{mean:.{digits}f}'
    return text if std is None else f'{text} ± {std:.{digits}f}'


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> List[str]:
    """The lines of a GitHub-markdown table."""
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join('---' for _ in header) + '|']
    return lines + ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]


def _severities(results: Results) -> List[int]:
    return sorted({int(s) for r in results.values() for s in r.get('corruptions', {}).get('severities', [])})


def _corruption_rows(results: Results) -> tuple[List[str], List[List[str]]]:
    severities = _severities(results)
    refs = sorted({ref for r in results.values() for ref in r.get('corruptions', {}).get('relative', {})})
    header = ['model', 'clean top-1'] + [f's{s} top-1' for s in severities] + ['mean corr. acc', 'mean error (%)']
    header += ['mCE (AlexNet)'] if any('alexnet' in r.get('corruptions', {}) for r in results.values()) else []
    header += [f'rel. mCE vs {ref}' for ref in refs]
    rows = []
    for label, r in results.items():
        corr = r.get('corruptions')
        if not corr:
            continue
        acc = per_severity({c: {s: m['top1'] for s, m in by_s.items()} for c, by_s in corr['cells'].items()})
        row = [label, _f(r.get('clean', {}).get('top1'))] + [_f(acc.get(s)) for s in severities]
        row += [_f(corr['mean_corruption_accuracy']), _f(corr['mce'])]
        if 'mCE (AlexNet)' in header:
            row.append(_f(corr.get('alexnet', {}).get('mce')))
        row += [_f(corr.get('relative', {}).get(ref, {}).get('mce')) for ref in refs]
        rows.append(row)
    return header, rows


def markdown_report(meta: Dict[str, Any], results: Results, figures: Dict[str, str]) -> str:
    """``results.md``: clean, corruptions (per severity, mCE / relative mCE, per-corruption CE), ImageNet-A/R,
    adversarial, routing agreement, expert load; then the figures."""
    out = ['# Evaluation results', '',
           f"Data: {meta['data']} ({meta['num_images']} images{', seeded subset' if meta['eval_subset'] else ''}); "
           f"suites: {', '.join(meta['suites'])}.", '']
    clean = [[k, r['router'], _f(r['clean']['top1']), _f(r['clean']['top5']), _f(r['clean']['nll'], 3),
              _f(r['clean']['ece'], 3)] for k, r in results.items() if 'clean' in r]
    if clean:
        out += ['## Clean', ''] + markdown_table(['model', 'router', 'top-1', 'top-5', 'NLL', 'ECE'], clean) + ['']
    header, rows = _corruption_rows(results)
    if rows:
        source = next(r['corruptions']['source'] for r in results.values() if 'corruptions' in r)
        out += [f'## Corruptions ({source})', '',
                'Top-1 (%) per severity averaged over corruptions; mean error = unnormalised mCE (100 x mean top-1 '
                'error); relative mCE = 100 x mean over corruptions of (error / reference error).', '']
        out += markdown_table(header, rows) + ['']
        corruptions = next(r['corruptions']['corruptions'] for r in results.values() if 'corruptions' in r)
        ce_header = ['corruption'] + [f'{k} error (%)' for k, r in results.items() if 'corruptions' in r]
        refs = [(k, ref) for k, r in results.items() for ref in r.get('corruptions', {}).get('relative', {})]
        ce_header += [f'{k} CE vs {ref}' for k, ref in refs]
        ce_rows = []
        for c in corruptions:
            row = [c] + [_f(100 * r['corruptions']['mean_error'][c]) for r in results.values() if 'corruptions' in r]
            row += [_f(results[k]['corruptions']['relative'][ref]['ce'][c], 3) for k, ref in refs]
            ce_rows.append(row)
        out += ['### Per corruption', ''] + markdown_table(ce_header, ce_rows) + ['']
    ar = [[k] + [_f(r[key]['top1']) if key in r else '–' for key in ('imagenet_a', 'imagenet_r')]
          for k, r in results.items() if 'imagenet_a' in r or 'imagenet_r' in r]
    if ar:
        out += ['## ImageNet-A / ImageNet-R (top-1 %)', '']
        out += markdown_table(['model', 'ImageNet-A', 'ImageNet-R'], ar) + ['']
    adv = [[k, a['attack'].upper(), f"{a['eps']:g}/255", str(a['steps']), _f(a['clean_top1']), _f(a['adv_top1']),
            str(a['num_samples'])] for k, r in results.items() for a in r.get('adversarial', [])]
    if adv:
        out += ['## Adversarial (L∞)', ''] + markdown_table(['model', 'attack', 'eps', 'steps', 'clean top-1',
                                                            'top-1 under attack', 'images'], adv) + ['']
    severities = _severities(results)
    agree = []
    for k, r in results.items():
        table = r.get('routing', {}).get('agreement')
        if not table:
            continue
        layers = list(next(iter(next(iter(table.values())).values())))
        for layer in layers if len(layers) > 2 else layers[:1]:  # 'mean' only when there are several layers
            points = per_severity({c: {s: v[layer] for s, v in by_s.items()} for c, by_s in table.items()})
            agree.append([k, layer] + [_f(points.get(s), 3) for s in severities])
    if agree:
        out += ['## Routing agreement (clean vs corrupted, top-1 expert, mean over corruptions)', '']
        out += markdown_table(['model', 'layer'] + [f's{s}' for s in severities], agree) + ['']
    load = [[k, layer, _f(v['load_cv'], 3), _f(100 * v['dropped_fraction']), _f(v['entropy'], 3),
             _f(v.get('gate_entropy'), 3), _f(v.get('margin'), 3), _f(v.get('flip'), 3),
             ' '.join(f'{x:.2f}' for x in v['load'])]
            for k, r in results.items() for layer, v in r.get('routing', {}).get('layers', {}).items()]
    if load:
        out += ['## Expert load and routing diagnostics (clean images)', '',
                'H(P), H(G): mean entropy (nats) of the routing distribution and of the token\'s own gate; margin: '
                'p1 - p2 of P; flip: share of tokens whose top-1 expert under P differs from under G.', '']
        out += markdown_table(['model', 'layer', 'load CV', 'dropped (%)', 'H(P)', 'H(G)', 'margin', 'flip',
                               'token share per expert'], load) + ['']
    if figures:
        out += ['## Figures', ''] + [f'![{name}]({path})' for name, path in figures.items()] + ['']
    return '\n'.join(out)


def rich_summary(results: Results, console: Console) -> None:
    """One row per checkpoint: clean top-1/ECE, corruptions, each attack's top-1, routing agreement and load CV."""
    attacks = list(dict.fromkeys(f"{a['attack']}@{a['eps']:g}" for r in results.values()
                                 for a in r.get('adversarial', [])))
    alexnet = any('alexnet' in r.get('corruptions', {}) for r in results.values())
    table = Table(title='evaluation summary')
    columns = ['model', 'router', 'top-1', 'ECE', 'corr. acc', 'mean err'] + (['mCE'] if alexnet else [])
    columns += ['rel. mCE'] + attacks + ['agree', 'load CV']
    for column in columns:
        table.add_column(column, justify='left' if column in ('model', 'router') else 'right')
    for label, r in results.items():
        corr = r.get('corruptions', {})
        relative = next(iter(corr.get('relative', {}).values()), {}).get('mce')
        adv = {f"{a['attack']}@{a['eps']:g}": a['adv_top1'] for a in r.get('adversarial', [])}
        routing = r.get('routing', {})
        agreement = [v['mean'] for by_s in routing.get('agreement', {}).values() for v in by_s.values()]
        cvs = [v['load_cv'] for v in routing.get('layers', {}).values()]
        row = [label, r['router'], _f(r.get('clean', {}).get('top1')), _f(r.get('clean', {}).get('ece'), 3),
               _f(corr.get('mean_corruption_accuracy')), _f(corr.get('mce'))]
        row += [_f(corr.get('alexnet', {}).get('mce'))] if alexnet else []
        row += [_f(relative)] + [_f(adv.get(a), 1) for a in attacks]
        row += [_f(mean_of(agreement), 3), _f(mean_of(cvs), 3)]
        table.add_row(*row)
    console.print(table)

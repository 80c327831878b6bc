"""Summary plots (matplotlib, Agg backend): accuracy vs severity and routing agreement vs severity, one line per
checkpoint, averaged over the evaluated corruptions (severity 0 = the clean images). ``line_plot`` and
``pointwise_mean`` also draw the study driver's curves (``study/``), averaged over seeds."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ['line_plot', 'per_severity', 'plot_accuracy', 'plot_agreement', 'pointwise_mean']


def pointwise_mean(curves: Iterable[Mapping[Any, Optional[float]]]) -> Dict[int, float]:
    """Mean over several ``{x: value}`` curves at each x (keys as ints, sorted; missing values skipped)."""
    points: Dict[int, list[float]] = {}
    for curve in curves:
        for x, v in curve.items():
            if v is not None:
                points.setdefault(int(x), []).append(v)
    return {x: sum(v) / len(v) for x, v in sorted(points.items())}


def per_severity(table: Mapping[str, Mapping[Any, float]]) -> Dict[int, float]:
    """Mean over corruptions for each severity: ``{c: {s: v}} -> {s: mean_c v}`` (keys as ints, sorted)."""
    return pointwise_mean(table.values())


def line_plot(series: Mapping[str, Mapping[int, float]], path: Path, xlabel: str, ylabel: str,
              title: str) -> Optional[str]:
    """One line per label (``{label: {x: y}}``) with a tick at every x, saved to ``path`` (its folder is created);
    the path written, or None when no label has a point."""
    series = {label: points for label, points in series.items() if points}
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in series.items():
        xs = sorted(points)
        ax.plot(xs, [points[x] for x in xs], marker='o', label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.margins(y=0.1)
    ax.set_xticks(sorted({x for points in series.values() for x in points}))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def plot_accuracy(results: Dict[str, Dict[str, Any]], path: Path) -> Optional[str]:
    """Top-1 (%) vs severity per checkpoint, from each result's 'corruptions' cells (and 'clean' at 0)."""
    series = {}
    for label, result in results.items():
        cells = result.get('corruptions', {}).get('cells')
        if not cells:
            continue
        points = per_severity({c: {s: m['top1'] for s, m in by_s.items()} for c, by_s in cells.items()})
        if 'clean' in result:
            points[0] = result['clean']['top1']
        series[f"{label} ({result['router']})"] = points
    n = len(next(iter(results.values())).get('corruptions', {}).get('cells', {})) if results else 0
    return line_plot(series, path, 'severity (0 = clean)', 'top-1 accuracy (%)',
                     f'accuracy vs severity (mean over {n} corruptions)')


def plot_agreement(results: Dict[str, Dict[str, Any]], path: Path) -> Optional[str]:
    """Clean-vs-corrupted top-1 routing agreement (mean over MoE layers and corruptions) vs severity."""
    series = {}
    for label, result in results.items():
        table = result.get('routing', {}).get('agreement')
        if not table:
            continue
        points = per_severity({c: {s: v['mean'] for s, v in by_s.items()} for c, by_s in table.items()})
        points[0] = 1.0
        series[f"{label} ({result['router']})"] = points
    return line_plot(series, path, 'severity (0 = clean)', 'same top-1 expert (share of tokens)',
                     'routing agreement, clean vs corrupted\n(mean over MoE layers and corruptions)')

"""Summary plots (matplotlib, Agg backend): accuracy vs severity and routing agreement vs severity, one line per
checkpoint, averaged over the evaluated corruptions (severity 0 = the clean images)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ['per_severity', 'plot_accuracy', 'plot_agreement']


def per_severity(table: Dict[str, Dict[Any, float]]) -> Dict[int, float]:
    """Mean over corruptions for each severity: ``{c: {s: v}} -> {s: mean_c v}`` (keys as ints, sorted)."""
    sums: Dict[int, list[float]] = {}
    for by_severity in table.values():
        for s, v in by_severity.items():
            sums.setdefault(int(s), []).append(v)
    return {s: sum(v) / len(v) for s, v in sorted(sums.items())}


def _line_plot(series: Dict[str, Dict[int, float]], ylabel: str, title: str, path: Path) -> Optional[str]:
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in series.items():
        xs = sorted(points)
        ax.plot(xs, [points[x] for x in xs], marker='o', label=label)
    ax.set_xlabel('severity (0 = clean)')
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.margins(y=0.1)
    ax.set_xticks(sorted({x for points in series.values() for x in points}))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
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
    return _line_plot(series, 'top-1 accuracy (%)', f'accuracy vs severity (mean over {n} corruptions)', path)


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
    return _line_plot(series, 'same top-1 expert (share of tokens)',
                      'routing agreement, clean vs corrupted\n(mean over MoE layers and corruptions)', path)

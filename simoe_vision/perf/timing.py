"""Interleaved timing (ratios measured under the same machine load) and FLOP counts of one step."""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List, Sequence, Tuple

from torch.utils.flop_counter import FlopCounterMode

__all__ = ['count_flops', 'interleaved', 'interleaved_rounds', 'medians', 'paired_ratio_range']


def interleaved_rounds(steps: Dict[str, Callable[[], None]], rounds: int, warmup: int, iters: int = 1
                       ) -> Dict[str, List[float]]:
    """Seconds per call of each step in each of ``rounds`` rounds; every round runs every variant ``iters`` times, so
    round r of two variants was timed under the same machine load (a paired sample)."""
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    times: Dict[str, List[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            start = time.perf_counter()
            for _ in range(iters):
                fn()
            times[name].append((time.perf_counter() - start) / iters)
    return times


def interleaved(steps: Dict[str, Callable[[], None]], rounds: int, warmup: int, iters: int = 1) -> Dict[str, float]:
    """Median seconds per call of each step over :func:`interleaved_rounds`."""
    return medians(interleaved_rounds(steps, rounds, warmup, iters))


def medians(times: Dict[str, List[float]]) -> Dict[str, float]:
    """{variant: median of its per-round seconds}."""
    return {name: statistics.median(ts) for name, ts in times.items()}


def paired_ratio_range(numerator: Sequence[float], denominator: Sequence[float]) -> Tuple[float, float]:
    """The lowest and highest per-round ratio ``numerator[r] / denominator[r]`` of two variants timed in the same
    rounds. The ratio of their medians always lies in this range (the median is monotone), so the range says how far
    one run's noise could move a reported ratio."""
    if not numerator:
        raise ValueError('paired rounds must be non-empty')
    ratios = [n / d for n, d in zip(numerator, denominator, strict=True)]
    return min(ratios), max(ratios)


def count_flops(fn: Callable[[], None]) -> int:
    """FLOPs of one call of ``fn`` as torch's FlopCounterMode counts them (matmuls, convolutions, attention)."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()

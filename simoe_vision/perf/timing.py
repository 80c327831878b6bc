"""Interleaved timing (ratios measured under the same machine load) and FLOP counts of one step."""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List

from torch.utils.flop_counter import FlopCounterMode

__all__ = ['count_flops', 'interleaved']


def interleaved(steps: Dict[str, Callable[[], None]], rounds: int, warmup: int, iters: int = 1) -> Dict[str, float]:
    """Median seconds per call of each step, from ``rounds`` rounds that each run every variant ``iters`` times."""
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
    return {name: statistics.median(ts) for name, ts in times.items()}


def count_flops(fn: Callable[[], None]) -> int:
    """FLOPs of one call of ``fn`` as torch's FlopCounterMode counts them (matmuls, convolutions, attention)."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()

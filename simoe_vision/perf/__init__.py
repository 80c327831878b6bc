"""Benchmark pieces behind benchmark.py: interleaved timing, the MoE-layer suite, adapters for peer MoE layers."""
from .timing import count_flops, interleaved

__all__ = ['count_flops', 'interleaved']

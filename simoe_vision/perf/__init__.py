"""Benchmark pieces behind benchmark.py: interleaved timing, the MoE-layer suite, adapters for peer MoE layers."""
from .timing import count_flops, interleaved, interleaved_rounds, medians, paired_ratio_range

__all__ = ['count_flops', 'interleaved', 'interleaved_rounds', 'medians', 'paired_ratio_range']

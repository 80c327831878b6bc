"""``x @ W[e] + b[e]`` on each expert's run of rows of an expert-sorted matrix: the expert matmuls of the sorted
dispatch, with hand-written gradients so nothing is restacked or copied per expert.

Why a custom autograd function: slicing the (E, in, out) weight per expert (``unbind`` or ``weight[e]``) makes
autograd build the weight gradient from E pieces, a stack (or E zero-padded full-size tensors) each backward pass;
here each expert's gradient is written straight into its slice of one (E, in, out) tensor. Two kernels, chosen by
measurement (2-core CPU with AMX-bf16, forward + backward of the three fc1 shapes of ``benchmark.py --suites layer``,
1 thread): a loop of one GEMM per expert, and ``torch._grouped_mm`` (one call for all experts):

==============================  ===============  ===============  ================
rows x in -> out, E             loop fp32        grouped fp32     grouped / loop bf16
==============================  ===============  ===============  ================
12608 x 384 -> 1536, 8          383 ms           438 ms           81 / 93 ms
16640 x 192 -> 768, 8           128 ms           127 ms           29 / 37 ms
6304 x 384 -> 1536, 32          248 ms           243 ms           95 / 104 ms
==============================  ===============  ===============  ================

so the grouped kernel serves bf16 (and fp16) where torch has it, the loop fp32.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
from torch import Tensor

__all__ = ['grouped_linear', 'uses_grouped_mm']


def uses_grouped_mm(x: Tensor, weight: Tensor) -> bool:
    """Whether :func:`grouped_linear` runs ``torch._grouped_mm`` on ``x`` and ``weight``: low precision, a device that
    has it, and feature sizes whose strides it accepts (multiples of 16 bytes)."""
    if x.dtype not in (torch.bfloat16, torch.float16) or not hasattr(torch, '_grouped_mm'):
        return False
    if any(size * x.element_size() % 16 for size in weight.shape[-2:]):
        return False
    if x.device.type == 'cuda':
        return torch.cuda.get_device_capability(x.device) >= (9, 0)
    return x.device.type == 'cpu'


def _offsets(counts: Sequence[int], device: torch.device) -> Tensor:
    return torch.tensor(counts, device=device, dtype=torch.int64).cumsum(0).to(torch.int32)


def _segment_sum(grad: Tensor, counts: Sequence[int]) -> Tensor:
    """(M, out) rows summed per expert -> (E, 1, out) (zeros for experts with no rows)."""
    return torch.stack([rows.sum(0) for rows in grad.split(list(counts))]).unsqueeze(1)


class _GroupedLinear(torch.autograd.Function):
    """Forward and backward of :func:`grouped_linear`; ``counts`` are the rows of each expert, in order."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, counts: Tuple[int, ...]) -> Tensor:
        grouped = uses_grouped_mm(x, weight)
        ctx.counts, ctx.grouped, ctx.has_bias = counts, grouped, bias is not None
        ctx.save_for_backward(x, weight)
        if grouped:
            out = torch._grouped_mm(x, weight, offs=_offsets(counts, x.device))
            if bias is not None:
                out += bias.squeeze(1).repeat_interleave(torch.tensor(counts, device=x.device), dim=0,
                                                         output_size=x.shape[0])
            return out
        out = x.new_empty(x.shape[0], weight.shape[-1])
        for e, (rows, dest) in enumerate(zip(x.split(list(counts)), out.split(list(counts)), strict=True)):
            if bias is None:
                torch.mm(rows, weight[e], out=dest)
            else:
                torch.addmm(bias[e], rows, weight[e], out=dest)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        x, weight = ctx.saved_tensors
        counts = list(ctx.counts)
        grad = grad.contiguous()
        grad_x = grad_w = None
        if ctx.grouped:
            offs = _offsets(counts, x.device)
            if ctx.needs_input_grad[0]:
                grad_x = torch._grouped_mm(grad, weight.transpose(-2, -1), offs=offs)
            if ctx.needs_input_grad[1]:
                grad_w = torch._grouped_mm(x.t(), grad, offs=offs)
        else:
            if ctx.needs_input_grad[0]:
                grad_x = x.new_empty(x.shape)
                for e, (g, dest) in enumerate(zip(grad.split(counts), grad_x.split(counts), strict=True)):
                    torch.mm(g, weight[e].t(), out=dest)
            if ctx.needs_input_grad[1]:
                grad_w = weight.new_empty(weight.shape)
                for e, (rows, g) in enumerate(zip(x.split(counts), grad.split(counts), strict=True)):
                    torch.mm(rows.t(), g, out=grad_w[e])
        grad_b = _segment_sum(grad, counts) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None


def grouped_linear(x: Tensor, weight: Tensor, bias: Tensor | None, counts: Sequence[int]) -> Tensor:
    """x (M, in) sorted by expert, ``counts[e]`` rows for expert e -> (M, out), row r of expert e: x_r W[e] + b[e].

    ``weight`` (E, in, out), ``bias`` (E, 1, out) or None, all of x's dtype (cast them once before, not per expert).
    """
    return _GroupedLinear.apply(x, weight, bias, tuple(int(c) for c in counts))

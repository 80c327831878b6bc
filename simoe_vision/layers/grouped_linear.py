"""``x @ W[e] + b[e]`` on each expert's run of rows of an expert-sorted matrix: the expert matmuls of the sorted
dispatch, with hand-written gradients so nothing is restacked or copied per expert.

Why a custom autograd function: slicing the (E, in, out) weight per expert (``unbind`` or ``weight[e]``) makes
autograd build the weight gradient from E pieces, a stack (or E zero-padded full-size tensors) each backward pass;
here each expert's gradient is written straight into its slice of one (E, in, out) tensor.

Two kernels: a loop of one GEMM per expert (``addmm``, the bias fused into the GEMM as in ``nn.Linear``) and
``torch._grouped_mm`` (one call for all experts, the bias added per expert after it). Measured on this 2-core CPU
with AMX-bf16 (1 thread, fc1 of the performance issue's shapes, bf16, median of 4, the other core busy):

========================================  ==========  ===============  =====================
rows x in -> out, E; pass                 loop        grouped          grouped + bias
========================================  ==========  ===============  =====================
12599 x 384 -> 1536, 8; forward           48 ms       46-56 ms         99 ms (bias 40-55 ms)
6304 x 384 -> 1536, 32; forward           18 ms       16 ms            -
6304 x 384 -> 1536, 32; weight gradient   23 ms       35 ms            -
========================================  ==========  ===============  =====================

On CPU the loop wins once there is a bias (a bf16 elementwise pass over the (rows, out) output costs as much as the
GEMM) and in the weight gradient, in bf16 and fp32 alike, so CPU runs the loop; the grouped kernel is the CUDA
path (bf16/fp16 on compute capability 9.0+, where it is one launch instead of E), exercised on CPU by the tests.

Row counts in low precision on CPU: oneDNN (behind bf16/fp16 matmuls there) compiles a kernel for every new GEMM
shape, and the per-expert row counts change every step, so each GEMM paid a compilation: fc1 forward above, 12600
rows over 8 experts, 33 ms with the same counts every call, 108 ms with new random counts, 36-40 ms with counts
rounded up to multiples of 64-128. :func:`row_multiple` says how to pad each expert's rows (with zero rows, which
add nothing to any gradient) so the shapes repeat; the sorted dispatch lays its rows out that way.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
from torch import Tensor

__all__ = ['grouped_linear', 'row_multiple', 'uses_grouped_mm']

ROW_MULTIPLE = 32  # per-expert rows are padded to this multiple where row_multiple says so


def uses_grouped_mm(x: Tensor, weight: Tensor) -> bool:
    """Whether :func:`grouped_linear` picks ``torch._grouped_mm`` for ``x`` and ``weight``: bf16/fp16 on a CUDA device
    of compute capability 9.0+ (see the module docstring for why not on CPU), with feature sizes whose strides it
    accepts (multiples of 16 bytes)."""
    return (x.device.type == 'cuda' and x.dtype in (torch.bfloat16, torch.float16) and hasattr(torch, '_grouped_mm')
            and torch.cuda.get_device_capability(x.device) >= (9, 0) and _aligned(x, weight))


def row_multiple(dtype: torch.dtype, device: torch.device) -> int:
    """The multiple to pad each expert's row count to: :data:`ROW_MULTIPLE` for bf16/fp16 on CPU (oneDNN compiles per
    shape), 1 (no padding) elsewhere: fp32 CPU GEMMs (MKL) and CUDA do not compile per shape."""
    return ROW_MULTIPLE if device.type == 'cpu' and dtype in (torch.bfloat16, torch.float16) else 1


def _aligned(x: Tensor, weight: Tensor) -> bool:
    return all(size * x.element_size() % 16 == 0 for size in weight.shape[-2:])


def _offsets(counts: Sequence[int], device: torch.device) -> Tensor:
    return torch.tensor(counts, device=device, dtype=torch.int64).cumsum(0).to(torch.int32)


def _segment_sum(grad: Tensor, counts: Sequence[int]) -> Tensor:
    """(M, out) rows summed per expert -> (E, 1, out) (zeros for experts with no rows)."""
    return torch.stack([rows.sum(0) for rows in grad.split(list(counts))]).unsqueeze(1)


class _GroupedLinear(torch.autograd.Function):
    """Forward and backward of :func:`grouped_linear`; ``counts`` are the rows of each expert, in order."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, counts: Tuple[int, ...], grouped: bool) -> Tensor:
        ctx.counts, ctx.grouped = counts, grouped
        ctx.weight_dtype, ctx.bias_dtype = weight.dtype, None if bias is None else bias.dtype
        weight, bias = (None if t is None else t.to(x.dtype) for t in (weight, bias))  # no copy when already x's
        ctx.save_for_backward(x, weight)
        if grouped:
            out = torch._grouped_mm(x, weight, offs=_offsets(counts, x.device))
            if bias is not None:  # per expert, in place: no (rows, out) tensor of repeated biases
                for e, dest in enumerate(out.split(list(counts))):
                    dest.add_(bias[e])
            return out
        out = x.new_empty(x.shape[0], weight.shape[-1])
        for e, (rows, dest) in enumerate(zip(x.split(list(counts)), out.split(list(counts)), strict=True)):
            if bias is None:
                torch.mm(rows, weight[e], out=dest)
            else:
                torch.addmm(bias[e], rows, weight[e], out=dest)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tuple[Tensor | None, Tensor | None, Tensor | None, None, None]:
        x, weight = ctx.saved_tensors
        counts = list(ctx.counts)
        grad = grad.contiguous()
        grad_x = grad_w = grad_b = None
        if ctx.grouped:
            offs = _offsets(counts, x.device)
            if ctx.needs_input_grad[0]:
                grad_x = torch._grouped_mm(grad, weight.transpose(-2, -1), offs=offs)
            if ctx.needs_input_grad[1]:
                grad_w = torch._grouped_mm(x.t(), grad, offs=offs).to(ctx.weight_dtype)
        else:
            if ctx.needs_input_grad[0]:
                grad_x = x.new_empty(x.shape)
                for e, (g, dest) in enumerate(zip(grad.split(counts), grad_x.split(counts), strict=True)):
                    torch.mm(g, weight[e].t(), out=dest)
            if ctx.needs_input_grad[1]:
                grad_w = weight.new_empty(weight.shape, dtype=ctx.weight_dtype)
                for e, (rows, g) in enumerate(zip(x.split(counts), grad.split(counts), strict=True)):
                    if grad_w.dtype == x.dtype:
                        torch.mm(rows.t(), g, out=grad_w[e])
                    else:  # fp32 master weights under autocast: each expert's product widened while in cache
                        grad_w[e].copy_(torch.mm(rows.t(), g))
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_b = _segment_sum(grad, counts).to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None, None


def grouped_linear(x: Tensor, weight: Tensor, bias: Tensor | None, counts: Sequence[int],
                   grouped: bool | None = None) -> Tensor:
    """x (M, in) sorted by expert, ``counts[e]`` rows for expert e -> (M, out), row r of expert e: x_r W[e] + b[e].

    ``weight`` (E, in, out) and ``bias`` (E, 1, out) or None, of x's dtype or wider: fp32 master weights under
    autocast are cast to x's dtype here, once per call (not once per expert), and their gradients come back in their
    own dtype, each expert's low-precision product widened into its slice (no full-size low-precision gradient, and
    no separate cast pass over it). ``grouped``: force the kernel (True: ``torch._grouped_mm``, False: the loop);
    None picks by :func:`uses_grouped_mm`.
    """
    if grouped is None:
        grouped = uses_grouped_mm(x, weight)
    elif grouped and not (x.dtype in (torch.bfloat16, torch.float16) and _aligned(x, weight)):
        raise ValueError(f'the grouped kernel needs bf16/fp16 and feature sizes of multiples of 16 bytes; got '
                         f'{x.dtype} and weight {tuple(weight.shape)}')
    return _GroupedLinear.apply(x, weight, bias, tuple(int(c) for c in counts), grouped)

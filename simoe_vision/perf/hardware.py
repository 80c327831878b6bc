"""What the machine offers for the precisions we time and train in, so results say which machine gave them and a
bf16 run on a CPU that cannot do bf16 matmuls is refused or flagged instead of silently taking ~30x longer.

bf16 matmuls on CPU go through oneDNN where the CPU has AVX512 (natively with AVX512-BF16 or AMX, emulated with
plain AVX512); without AVX512 torch falls back to a reference loop: measured on a 2-core AMD EPYC VM with AVX2 only
(1 thread), timm's ``Mlp`` train step at 32 x 197 x 384, hidden 1536: 0.84 s in fp32, 27.8 s under bf16 autocast.
"""
from __future__ import annotations

import platform
from pathlib import Path

import torch

__all__ = ['BF16_FALLBACK_HINT', 'bf16_matmul_kernel', 'cpu_name', 'describe_cpu', 'describe_device',
           'has_fast_bf16_matmul']

BF16_FALLBACK_HINT = ('this CPU has no bf16 matmul kernels (on x86: no AVX512), so torch falls back to a reference '
                      'loop, ~30x slower than fp32')


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` reports."""
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def bf16_matmul_kernel() -> str:
    """How this CPU runs bf16 matmuls: 'amx', 'avx512-bf16', 'avx512 (emulated)' (oneDNN kernels) or 'none' (torch's
    reference fallback)."""
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return 'none'
    if torch.cpu._is_amx_tile_supported():
        return 'amx'
    return 'avx512-bf16' if torch.cpu._is_avx512_bf16_supported() else 'avx512 (emulated)'


def has_fast_bf16_matmul(device: torch.device | str = 'cpu') -> bool:
    """Whether bf16 matmuls on ``device`` run on real kernels: any CUDA device that supports bf16, a CPU with oneDNN's
    bf16 kernels (see :func:`bf16_matmul_kernel`)."""
    device = torch.device(device)
    if device.type == 'cuda':
        return torch.cuda.is_bf16_supported()
    return device.type != 'cpu' or bf16_matmul_kernel() != 'none'


def describe_cpu() -> str:
    """For result headers: the model name, torch's vector ISA and the bf16 matmul kernel."""
    return f'{cpu_name()} ({torch.backends.cpu.get_cpu_capability()}, bf16 matmul: {bf16_matmul_kernel()})'


def describe_device(device: torch.device | str) -> str:
    """The machine a job ran on, for run folders (times compare only on the same one): the GPU's name on CUDA, else
    :func:`describe_cpu`."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == 'cuda' else describe_cpu()

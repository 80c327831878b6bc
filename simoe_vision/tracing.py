"""Is a graph of the model being captured? The MoE layers then take their static-shape inference dispatch."""
from __future__ import annotations

import torch

__all__ = ['is_exporting', 'is_capturing']


def is_exporting() -> bool:
    """torch.export (also ONNX with ``dynamo=True``), the TorchScript ONNX exporter or ``torch.jit.trace`` is running:
    a one-off capture, where python decisions on (symbolic) shapes or data would be frozen or rejected."""
    return torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export() or torch.jit.is_tracing()


def is_capturing() -> bool:
    """:func:`is_exporting`, or torch.compile's dynamo is tracing (a graph break costs a compiled graph there)."""
    return is_exporting() or torch.compiler.is_compiling()

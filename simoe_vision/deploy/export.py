"""Export an eval-mode model with a dynamic batch dimension (torch.export, ONNX) and check the file against eager.

Exporting captures the MoE layers' static-shape dispatch (:meth:`~simoe_vision.layers.MoeMlp.uses_static_dispatch`),
which computes the eager outputs; :func:`check_export` measures how close the written file comes on deterministic
images. ONNX goes through the ExportedProgram with torch's default decompositions applied first: letting the ONNX
exporter decompose a Swin-MoE graph with a symbolic batch fails in torch 2.14 (a ``view`` of the window attention's
transposed SDPA output that the decomposed kernel no longer allows).
"""
from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..models import moe_layers

if TYPE_CHECKING:
    import onnxruntime

__all__ = ['FORMATS', 'SUFFIXES', 'DEFAULT_TOLERANCE', 'DeployError', 'example_images', 'export_program',
           'write_export', 'load_runner', 'onnx_session', 'max_differences', 'check_export']

FORMATS = ('onnx', 'export')
SUFFIXES = {'onnx': '.onnx', 'export': '.pt2'}
DEFAULT_TOLERANCE = 1e-4
_EXAMPLE_BATCH = 2  # torch.export specialises a dimension whose example size is 0 or 1
Runner = Callable[[Tensor], Tensor]


class DeployError(ValueError):
    """A model that cannot be exported as asked, or an exported file whose outputs differ from eager."""


def example_images(data_config: Dict, batch: int, seed: int = 0) -> Tensor:
    """``batch`` deterministic images of the model's input size: uniform pixels, normalised as the model expects."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.rand(batch, *data_config['input_size'], generator=generator)
    mean = torch.tensor(data_config['mean']).view(-1, 1, 1)
    std = torch.tensor(data_config['std']).view(-1, 1, 1)
    return (pixels - mean) / std


def export_program(model: nn.Module, example: Tensor) -> torch.export.ExportedProgram:
    """``torch.export.export`` of ``model`` in eval mode, with the batch dimension of its input dynamic."""
    batch = torch.export.Dim('batch', min=1)
    return torch.export.export(model.eval(), (example,), dynamic_shapes=({0: batch},))


def write_export(program: torch.export.ExportedProgram, path: Path, fmt: str) -> None:
    """Write ``program`` to ``path`` as an ONNX model (``fmt='onnx'``; weights inside the file below 2 GB) or as a
    torch.export archive (``'export'``, a ``.pt2`` that ``torch.export.load`` reads)."""
    if fmt == 'export':
        torch.export.save(program, path)
        return
    onnx_ir = logging.getLogger('onnx_ir')
    level = onnx_ir.level
    onnx_ir.setLevel(logging.ERROR)  # it warns of every empty attribute list it types, which the user cannot act on
    try:
        onnx_program = torch.onnx.export(program.run_decompositions(), dynamo=True, input_names=['images'],
                                         output_names=['logits'], verbose=False)
    finally:
        onnx_ir.setLevel(level)
    onnx_program.save(path)


def onnx_session(path: Path, threads: int | None = None) -> onnxruntime.InferenceSession:
    """An onnxruntime CPU session for ``path``; ``threads`` intra-op threads (default: onnxruntime's choice).
    onnxruntime is imported here, so ``--format export`` works without it."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(str(path), options, providers=['CPUExecutionProvider'])


def load_runner(path: Path, fmt: str, threads: int | None = None) -> Runner:
    """A function images -> logits that runs the written file: onnxruntime for ONNX, the loaded program otherwise."""
    if fmt == 'export':
        module = torch.export.load(path).module()

        def run_program(x: Tensor) -> Tensor:
            with torch.no_grad():
                return module(x)
        return run_program
    session = onnx_session(path, threads)
    name = session.get_inputs()[0].name

    def run_onnx(x: Tensor) -> Tensor:
        return torch.from_numpy(np.asarray(session.run(None, {name: x.numpy()})[0]))
    return run_onnx


def max_differences(model: nn.Module, run: Runner, data_config: Dict, batch_sizes: Sequence[int]) -> Dict[int, float]:
    """{batch size: max |run(x) - model(x)|} on deterministic images (another seed per batch size)."""
    out = {}
    model.eval()
    for seed, batch in enumerate(batch_sizes):
        x = example_images(data_config, batch, seed=seed + 1)
        with torch.no_grad():
            expected = model(x)
        out[batch] = float((run(x) - expected).abs().max())
    return out


def _check_exportable(model: nn.Module, fmt: str) -> None:
    prioritized = [name for name, layer in moe_layers(model) if layer.moe.batch_prioritized]
    if fmt == 'onnx' and prioritized:
        raise DeployError('batch_prioritized=True cannot go to ONNX: its stable sort has no ONNX translation in torch '
                          f'2.14 ({prioritized[0]}); use --format export, or a model without Batch Prioritized '
                          'Routing')


def check_export(
        model: nn.Module,
        data_config: Dict,
        path: Path,
        fmt: str,
        batch_sizes: Sequence[int] = (1, 4),
        tolerance: float = DEFAULT_TOLERANCE,
        threads: int | None = None,
) -> Dict[int, float]:
    """Export ``model`` (eval mode, dynamic batch) to ``path`` in ``fmt``, run the file on deterministic images at
    each of ``batch_sizes`` and return the max abs difference to eager per batch size.

    The file is written to a temporary folder beside ``path`` and moved in place only when every difference is
    within ``tolerance``; otherwise :class:`DeployError` and nothing is written.
    """
    if fmt not in FORMATS:
        raise DeployError(f'unknown format {fmt!r}; valid: {", ".join(FORMATS)}')
    _check_exportable(model, fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f'.{path.name}.') as staging:
        staged = Path(staging) / path.name
        write_export(export_program(model, example_images(data_config, _EXAMPLE_BATCH)), staged, fmt)
        diffs = max_differences(model, load_runner(staged, fmt, threads), data_config, batch_sizes)
        worst = max(diffs, key=diffs.get)
        if not diffs[worst] <= tolerance:
            raise DeployError(f'the exported model differs from eager by {diffs[worst]:.3g} at batch {worst} (more '
                              f'than the tolerance {tolerance:g}); {path} was not written')
        for written in Path(staging).iterdir():  # the model, and its external weights file when over 2 GB
            shutil.move(str(written), path.parent / written.name)
    return diffs

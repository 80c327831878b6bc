"""``export.py``: export a trained model to ONNX or a torch.export archive and check the file against eager.

``main(argv)`` loads the model the way evaluate.py does (a run folder or a weights file), writes the file with a
dynamic batch dimension, runs it (onnxruntime / the loaded program) on deterministic images at each ``--batch-sizes``
and prints the max abs difference to eager. Errors a user can fix, and a difference beyond ``--tolerance``, exit with
code 2 and one message (and then nothing is written).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..engine.checkpoint import CheckpointError
from ..engine.config import ConfigError
from ..evaluation.cli import EXIT_USAGE, UsageError, _ints, _json_object, _Parser
from ..evaluation.loading import load_model
from ..routers import ROUTERS
from .export import DEFAULT_TOLERANCE, FORMATS, SUFFIXES, DeployError, check_export

__all__ = ['build_parser', 'main']


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(description='Export a model to ONNX or torch.export (dynamic batch) and check it against eager.',
                allow_abbrev=False)
    p.add_argument('--checkpoint', required=True, metavar='PATH', help='a train.py run folder or a weights file')
    p.add_argument('--format', choices=FORMATS, default='onnx',
                   help='onnx (run with onnxruntime) or export (a torch.export .pt2 archive); default onnx')
    p.add_argument('--output', type=Path, default=None, metavar='FILE',
                   help='the file to write (default: ./<run name>.onnx or .pt2)')
    p.add_argument('--batch-sizes', type=_ints, default=[1, 4], metavar='N,M',
                   help='batch sizes the file is checked at (default 1,4)')
    p.add_argument('--tolerance', type=float, default=DEFAULT_TOLERANCE,
                   help=f'largest accepted max abs difference of the logits to eager (default {DEFAULT_TOLERANCE:g})')
    p.add_argument('--threads', type=int, default=None, help='torch and onnxruntime threads (default: all cores)')
    p.add_argument('--model', help='timm model name (needed for a weights file without config.yaml)')
    p.add_argument('--router', choices=list(ROUTERS), metavar='ROUTER',
                   help=f'router of a weights file without a run config: {", ".join(ROUTERS)}')
    p.add_argument('--model-kwargs', type=_json_object, default=None, metavar='JSON',
                   help='extra model kwargs as a JSON object, e.g. \'{"eval_capacity_factor": "dropless"}\'')
    return p


def _check_args(args: argparse.Namespace) -> None:
    if not args.batch_sizes or min(args.batch_sizes) < 1:
        raise UsageError(f'--batch-sizes must be positive integers, got {args.batch_sizes}')
    if not args.tolerance > 0:
        raise UsageError(f'--tolerance must be > 0, got {args.tolerance:g}')
    if args.threads is not None and args.threads < 1:
        raise UsageError(f'--threads must be >= 1, got {args.threads}')


def run(args: argparse.Namespace) -> None:
    _check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.checkpoint, model=args.model, router=args.router, model_kwargs=args.model_kwargs)
    output = args.output or Path(f'{loaded.label}{SUFFIXES[args.format]}')
    diffs = check_export(loaded.model, loaded.data_config, output, args.format, args.batch_sizes, args.tolerance,
                         args.threads)
    measured = ', '.join(f'{d:.2g} at batch {b}' for b, d in diffs.items())
    print(f'wrote {output} ({args.format}, dynamic batch) from {loaded.checkpoint}: max |file - eager| = {measured} '
          f'(tolerance {args.tolerance:g})')


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``export.py``; returns 0, or 2 with one ``error:`` message for anything the user can fix."""
    try:
        run(build_parser().parse_args(list(sys.argv[1:] if argv is None else argv)))
    except (UsageError, ConfigError, CheckpointError, DeployError, FileNotFoundError, ValueError) as e:
        print(f'error: {e}', file=sys.stderr)
        return EXIT_USAGE
    return 0

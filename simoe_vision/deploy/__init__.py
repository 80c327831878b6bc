"""Deployment behind ``export.py``: torch.export / ONNX export with a dynamic batch, checked against eager."""
from .cli import build_parser, main
from .export import (
    DEFAULT_TOLERANCE,
    FORMATS,
    SUFFIXES,
    DeployError,
    check_export,
    example_images,
    export_program,
    load_runner,
    max_differences,
    onnx_session,
    write_export,
)

__all__ = ['DEFAULT_TOLERANCE', 'FORMATS', 'SUFFIXES', 'DeployError', 'build_parser', 'check_export',
           'example_images', 'export_program', 'load_runner', 'main', 'max_differences', 'onnx_session',
           'write_export']

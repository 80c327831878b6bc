"""Helpers the test files share: the idx encoding of Fashion-MNIST and the tiny train.py settings."""
import gzip
import struct
from pathlib import Path

import numpy as np

# vmoe_test (2 blocks, 1 MoE layer), 4 steps of 16 per epoch on 80 - 16 (val) training images, in-process loading
TINY = ['--model', 'vmoe_test', '--num-experts', '4', '--batch-size', '16', '--val-size', '16', '--probe-size', '8',
        '--workers', '0', '--no-progress', '--warmup-epochs', '0.5']


def idx_bytes(array: np.ndarray) -> bytes:
    """The idx encoding: 0x0000, type 0x08 (ubyte), ndim, big-endian int32 dims, raw bytes."""
    return struct.pack('>HBB', 0, 0x08, array.ndim) + struct.pack(f'>{array.ndim}I', *array.shape) + array.tobytes()


def idx_gz(path: Path, array: np.ndarray) -> None:
    """Write ``array`` idx-encoded and gzipped to ``path``."""
    with gzip.open(path, 'wb') as f:
        f.write(idx_bytes(array))

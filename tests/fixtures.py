"""Helpers the test files share: the idx encoding of Fashion-MNIST, fake datasets and the tiny train.py settings."""
import gzip
import struct
from pathlib import Path

import numpy as np
from PIL import Image

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


def fake_fashion_mnist(root: Path, train: int = 80, test: int = 16) -> Path:
    """A fake Fashion-MNIST in ``root``: random 28x28 images, labels 0..9 in turn."""
    rng = np.random.default_rng(0)
    for prefix, n in (('train', train), ('t10k', test)):
        idx_gz(root / f'{prefix}-images-idx3-ubyte.gz', rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        idx_gz(root / f'{prefix}-labels-idx1-ubyte.gz', (np.arange(n) % 10).astype(np.uint8))
    return root


def png_tree(root: Path, classes, per_class: int = 1, size: int = 24) -> Path:
    """``root/<class>/<i>.png``: random RGB images, ``per_class`` of each class."""
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / name / f'{i}.png')
    return root


def image_folder(root: Path, classes=('cat', 'dog')) -> Path:
    """An ImageNet-style dataset: ``train/`` with 8 images per class (and one unreadable ``train/cat/bad.png``),
    ``val/`` with 2."""
    png_tree(root / 'train', classes, per_class=8)
    png_tree(root / 'val', classes, per_class=2)
    (root / 'train' / classes[0] / 'bad.png').write_bytes(b'not a png at all')
    return root

"""Fashion-MNIST from its four original idx files (gzip-compressed or raw), found on disk; nothing is downloaded.

Search order of ``find_fashion_mnist``: ``data_dir`` itself, ``data_dir/FashionMNIST/raw`` and ``data_dir/raw``
(torchvision's layout), then Debian's ``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist``).
"""
from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
from torch.utils.data import Dataset

__all__ = [
    'DEBIAN_DIR', 'FASHION_MNIST_CLASSES', 'FASHION_MNIST_FILES', 'DatasetNotFoundError', 'FashionMNIST',
    'IdxFormatError', 'find_fashion_mnist', 'read_idx',
]

DEBIAN_DIR = Path('/usr/share/datasets/fashion-mnist')
FASHION_MNIST_FILES = {
    'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
    'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
}
FASHION_MNIST_CLASSES = (
    'T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot',
)
_IDX_UBYTE = 0x08
_GZIP_MAGIC = b'\x1f\x8b'


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is not where it was looked for; the message says what was expected, where, and how to fix it."""


class IdxFormatError(ValueError):
    """An idx file is truncated or malformed; the message names the file."""


def _all_names() -> list[str]:
    return [name for pair in FASHION_MNIST_FILES.values() for name in pair]


def _resolve(directory: Path, name: str) -> Optional[Path]:
    """The file ``name`` or ``name.gz`` in ``directory`` (raw preferred), or None."""
    for candidate in (directory / name, directory / f'{name}.gz'):
        if candidate.is_file():
            return candidate
    return None


def _candidate_dirs(data_dir: Optional[str | Path]) -> list[Path]:
    """An explicit ``data_dir`` is the only place searched (never silently swapped for another copy)."""
    if data_dir is None:
        return [DEBIAN_DIR]
    root = Path(data_dir).expanduser()
    return [root, root / 'FashionMNIST' / 'raw', root / 'raw']


def find_fashion_mnist(data_dir: Optional[str | Path] = None) -> Path:
    """Return the first directory holding all four Fashion-MNIST idx files (each ``.gz`` or uncompressed).

    Raises ``DatasetNotFoundError`` listing the expected files, every directory searched and the two fixes.
    """
    searched = _candidate_dirs(data_dir)
    for directory in searched:
        if all(_resolve(directory, name) is not None for name in _all_names()):
            return directory
    names = ', '.join(f'{n}[.gz]' for n in _all_names())
    looked = '\n'.join(f'  - {d}' for d in searched)
    raise DatasetNotFoundError(
        f'Fashion-MNIST not found. Expected the four idx files {names} in one directory. Looked in:\n{looked}\n'
        'Fix: install Debian\'s package (`apt-get install dataset-fashion-mnist`, as root), or pass '
        '`--data-dir DIR` where DIR holds the four files (directly or as DIR/FashionMNIST/raw/, torchvision\'s layout).'
    )


def read_idx(path: str | Path, ndim: Optional[int] = None) -> np.ndarray:
    """Read an idx file of unsigned bytes (gzip-compressed or raw) into a uint8 array, checking magic number and size.

    Format: 2 zero bytes, type code 0x08 (ubyte), number of dimensions, then one big-endian int32 per dimension,
    then the data. ``ndim`` (if given) must match the header.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
        if data[:2] == _GZIP_MAGIC:  # by content, not name: torchvision's raw/ also holds unpacked copies
            data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:
        raise IdxFormatError(f'{path}: cannot read ({e}); the file is truncated or not gzip data. '
                             'Replace it with an intact copy.') from e
    if len(data) < 4:
        raise IdxFormatError(f'{path}: {len(data)} bytes, too short for an idx header (truncated file)')
    zero, dtype, dims = struct.unpack('>HBB', data[:4])
    if zero != 0 or dtype != _IDX_UBYTE:
        raise IdxFormatError(f'{path}: bad idx magic number 0x{data[:4].hex()}; expected 0x0000 08 0N '
                             '(unsigned-byte idx file)')
    if ndim is not None and dims != ndim:
        raise IdxFormatError(f'{path}: idx file has {dims} dimensions, expected {ndim}')
    header = 4 + 4 * dims
    if len(data) < header:
        raise IdxFormatError(f'{path}: header truncated ({len(data)} of {header} bytes)')
    shape = struct.unpack(f'>{dims}I', data[4:header])
    expected = int(np.prod(shape, dtype=np.int64))
    if len(data) - header != expected:
        raise IdxFormatError(f'{path}: header says shape {shape} = {expected} bytes of data, file has '
                             f'{len(data) - header} (truncated or corrupt)')
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape).copy()


class FashionMNIST(Dataset):
    """Fashion-MNIST ``split`` ('train': 60000, 'test': 10000 images) read from the idx files.

    ``root`` is searched with ``find_fashion_mnist`` (None: Debian's package). ``images`` is (N, 28, 28) uint8,
    ``targets`` (N,) int64; ``dataset[i]`` is ``(transform(image), target)``, the image an HxW uint8 array.
    """

    classes = FASHION_MNIST_CLASSES

    def __init__(self, root: Optional[str | Path] = None, split: str = 'train',
                 transform: Optional[Callable[[np.ndarray], Any]] = None) -> None:
        if split not in FASHION_MNIST_FILES:
            raise ValueError(f'unknown Fashion-MNIST split {split!r}; choose one of {tuple(FASHION_MNIST_FILES)}')
        self.root = find_fashion_mnist(root)
        self.split = split
        self.transform = transform
        image_file, label_file = (_resolve(self.root, name) for name in FASHION_MNIST_FILES[split])
        self.images = read_idx(image_file, ndim=3)
        labels = read_idx(label_file, ndim=1)
        if len(self.images) != len(labels):
            raise IdxFormatError(f'{image_file} has {len(self.images)} images but {label_file} has {len(labels)} '
                                 'labels; the two files do not belong together')
        if labels.size and labels.max() >= len(self.classes):
            raise IdxFormatError(f'{label_file}: label {labels.max()} out of range 0..{len(self.classes) - 1}')
        self.targets = labels.astype(np.int64)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])

    def __repr__(self) -> str:
        return f'{type(self).__name__}(split={self.split!r}, n={len(self)}, root={str(self.root)!r})'



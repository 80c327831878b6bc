"""ImageNet-style class folders that survive unreadable images.

A corrupt, truncated or zero-byte file makes ``RobustImageFolder.__getitem__`` return None (counted, one warning per
file, pointing at the file) and ``collate_skip_bad`` drops it from the batch, so one bad JPEG never ends an epoch.
``strict=True`` raises ``CorruptImageError`` naming the file instead. ``check_split_classes`` makes sure a dataset's
train/ and val/ hold the same class folders (the labels are their sorted names).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import default_collate
from torchvision.datasets import ImageFolder

from .fashion_mnist import DatasetNotFoundError

__all__ = ['IMAGEFOLDER_LAYOUT', 'ClassFoldersMismatchError', 'CorruptImageError', 'RobustImageFolder',
           'check_split_classes', 'class_folders', 'collate_skip_bad', 'imagefolder_split']

IMAGEFOLDER_LAYOUT = '<root>/train/<wnid>/*.JPEG and <root>/val/<wnid>/*'


class CorruptImageError(OSError):
    """An image file cannot be decoded (strict mode); the message names the file."""


class ClassFoldersMismatchError(ValueError):
    """The train/ and val/ folders of a dataset hold different class folders; the message names them."""


def _load_image(path: str) -> Image.Image:
    with open(path, 'rb') as f:
        image = Image.open(f)
        return image.convert('RGB')


class RobustImageFolder(ImageFolder):
    """``torchvision.datasets.ImageFolder`` over ``<split dir>/<class>/<image>`` that skips unreadable images.

    ``num_bad`` counts the bad files met by this process (DataLoader workers keep their own counts: use the
    ``num_skipped`` that ``collate_skip_bad`` returns for totals). ``strict=True`` raises ``CorruptImageError``.
    """

    def __init__(self, root: str | Path, transform: Optional[Callable[[Image.Image], Any]] = None,
                 strict: bool = False) -> None:
        root = Path(root).expanduser()
        if not root.is_dir():
            raise DatasetNotFoundError(f'image folder {root} does not exist. Expected layout: {IMAGEFOLDER_LAYOUT}')
        try:
            super().__init__(str(root), transform=transform, loader=_load_image)
        except FileNotFoundError as e:
            raise DatasetNotFoundError(f'image folder {root} holds no class folders with images ({e}). '
                                       f'Expected layout: {IMAGEFOLDER_LAYOUT}') from None
        self.strict = strict
        self.num_bad = 0
        self._warned: set[str] = set()

    def __getitem__(self, index: int) -> Optional[tuple[Any, int]]:
        path, target = self.samples[index]
        try:
            image = self.loader(path)
        except (OSError, ValueError, UnidentifiedImageError, SyntaxError) as e:
            if self.strict:
                raise CorruptImageError(f'cannot decode image {path}: {e}') from e
            self.num_bad += 1
            if path not in self._warned:
                self._warned.add(path)
                # reported at the image itself, not at whichever torch frame called __getitem__
                warnings.warn_explicit(f'skipping unreadable image {path}: {e}', RuntimeWarning, path, 0)
            return None
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, target


def imagefolder_split(root: str | Path, split: str) -> Path:
    """``<root>/<split>`` for split 'train' or 'val'; a clear ``DatasetNotFoundError`` if it is missing."""
    if split not in ('train', 'val'):
        raise ValueError(f"unknown image-folder split {split!r}; choose 'train' or 'val'")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetNotFoundError(f'dataset root {root} does not exist. Expected layout: {IMAGEFOLDER_LAYOUT}')
    folder = root / split
    if not folder.is_dir():
        raise DatasetNotFoundError(f'{folder} is missing. Expected layout: {IMAGEFOLDER_LAYOUT}')
    return folder


def class_folders(folder: str | Path) -> list[str]:
    """The class folder names under ``folder`` in label order (sorted, as ``ImageFolder`` numbers them)."""
    return sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())


def _names(names: list[str], limit: int = 10) -> str:
    return ', '.join(names[:limit]) + (f' (+{len(names) - limit} more)' if len(names) > limit else '')


def check_split_classes(root: str | Path) -> None:
    """Raise one ``ClassFoldersMismatchError`` naming the differing class folders if ``<root>/train`` and
    ``<root>/val`` do not hold the same ones (a val/ missing a class would shift every later label)."""
    train, val = Path(root).expanduser() / 'train', Path(root).expanduser() / 'val'
    if not (train.is_dir() and val.is_dir()):
        return  # a missing split is reported when it is loaded
    train_names, val_names = class_folders(train), class_folders(val)
    if not train_names or not val_names or train_names == val_names:
        return  # so is an empty one
    only_train = [n for n in train_names if n not in set(val_names)]
    only_val = [n for n in val_names if n not in set(train_names)]
    parts = [f'only in train/: {_names(only_train)}' if only_train else '',
             f'only in val/: {_names(only_val)}' if only_val else '']
    differences = '; '.join(p for p in parts if p)
    raise ClassFoldersMismatchError(f'the class folders of {train} and {val} differ ({differences}); both need the '
                                    'same class folders (labels are their sorted names)')


def collate_skip_bad(batch: Sequence[Optional[tuple[Any, int]]]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Collate ``(image, target)`` pairs, dropping the None entries of unreadable images.

    Returns ``(images, targets, num_skipped)``. If every item was bad, ``images`` and ``targets`` are empty
    (0 rows): a training loop should skip such a batch.
    """
    good = [item for item in batch if item is not None]
    num_skipped = len(batch) - len(good)
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.int64), num_skipped
    images, targets = default_collate(good)
    return images, targets, num_skipped

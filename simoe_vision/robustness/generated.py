"""Generated ImageNet-C-style corruptions for any uint8 image array (Fashion-MNIST-C, an ImageNet-val subset).

Built with ``imagecorruptions-imaug`` (import name ``imagecorruptions``), 15 corruptions x 5 severities, once, then
cached on disk as one ``<corruption>/<severity>.npy`` per cell plus ``manifest.json`` (recipe: package version,
seed, grayscale handling; SHA-256 of the source images and of every cell file). A cell whose file is missing,
truncated or altered, or a cache whose recipe or source images changed, is rebuilt, never silently reused.

Determinism: the package draws from numpy's global RNG (and two corruptions from an explicit ``seed`` argument).
Every image is seeded from ``(seed, corruption, severity, image index)``, so a cell's bytes depend neither on the
order cells are built in, nor on what ran before, nor on chunking or worker count. numpy's global RNG state is
restored afterwards.

Small and grayscale images: the package's ``corrupt()`` refuses images under 32 px, but every one of the 19
corruption functions runs at 28 px and at 16 px at all 5 severities (measured; below 16 px ``spatter`` warns), so
the functions are called directly at the native size: no up/down-sampling blur is added to every image. A
grayscale image is stacked to 3 channels (what ``corrupt()`` does itself), corrupted, and converted back with
PIL's ITU-R 601-2 luma (exact for the many corruptions that keep the channels equal). Independent per-channel
noise (gaussian, shot, impulse) is attenuated by that average: its std drops to ~0.67x of the RGB value.
The corruption parameters are ImageNet's (tuned for 224 px): on 28 px Fashion-MNIST, defocus and glass blur leave
little of a garment by severity 2 and motion blur's kernel (up to 41 px) outruns the image at severities 4-5, so
Fashion-MNIST-C severities are not ImageNet-C's; compare models with each other (CE relative to the softmax-router
model), not with ImageNet-C numbers. numba compiles ``glass_blur``'s kernel on its first use in each process (seconds).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zlib
from concurrent.futures import ProcessPoolExecutor
from importlib.metadata import version as _package_version
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch.utils.data import Dataset

from .imagenet_c import CORRUPTIONS, EXTRA_CORRUPTIONS, SEVERITIES

__all__ = [
    'CorruptedArrayDataset', 'CorruptionCache', 'MIN_IMAGE_SIZE', 'build_corruptions', 'corrupt_image',
    'corrupt_images', 'image_seed', 'prepare_images',
]

MIN_IMAGE_SIZE = 16
CACHE_FORMAT = 1
_EXPLICIT_SEED = ('glass_blur', 'impulse_noise')  # these ignore numpy's global RNG and take a seed argument


def _corruption_functions() -> dict:
    from imagecorruptions import corruption_dict
    return corruption_dict


def image_seed(seed: int, corruption: str, severity: int, index: int) -> int:
    """The 32-bit seed of one image of one cell; independent of build order, chunking and workers."""
    words = [seed, zlib.crc32(corruption.encode()), severity, index]
    return int(np.random.SeedSequence(words).generate_state(1)[0])


def _check_images(images: np.ndarray) -> None:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise ValueError(f'images must be a uint8 numpy array, got {type(images).__name__} '
                         f'{getattr(images, "dtype", "")}')
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3)):
        raise ValueError(f'images must be (N, H, W) grayscale or (N, H, W, 1|3) channels-last, got {images.shape}')
    if min(images.shape[1:3]) < MIN_IMAGE_SIZE:
        raise ValueError(f'images must be at least {MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE} px (smallest size at which all '
                         f'corruptions were checked), got {images.shape[1]}x{images.shape[2]}; upscale them first')


def _check_cell(corruption: str, severity: int) -> None:
    if corruption not in CORRUPTIONS + EXTRA_CORRUPTIONS:
        raise ValueError(f'unknown corruption {corruption!r}; choose from {CORRUPTIONS + EXTRA_CORRUPTIONS}')
    if severity not in SEVERITIES:
        raise ValueError(f'severity must be one of {SEVERITIES}, got {severity!r}')


def corrupt_image(image: np.ndarray, corruption: str, severity: int, seed: int) -> np.ndarray:
    """Corrupt one uint8 image (H, W), (H, W, 1) or (H, W, 3); same shape and dtype out, deterministic in ``seed``.

    Seeds (and thereby overwrites) numpy's global RNG; ``corrupt_images`` saves and restores it.
    """
    gray = image.ndim == 2 or image.shape[-1] == 1
    rgb = np.repeat(image.reshape(image.shape[0], image.shape[1], 1), 3, axis=2) if gray else image
    np.random.seed(seed)
    kwargs = {'seed': seed} if corruption in _EXPLICIT_SEED else {}
    out = np.uint8(_corruption_functions()[corruption](Image.fromarray(rgb), severity, **kwargs))
    if gray:
        out = np.asarray(Image.fromarray(out).convert('L')).reshape(image.shape)
    return out


def corrupt_images(
        images: np.ndarray,
        corruption: str,
        severity: int,
        seed: int = 0,
        start_index: int = 0,
) -> np.ndarray:
    """Corrupt a uint8 batch (N, H, W) or (N, H, W, C); image i is seeded as index ``start_index + i``."""
    _check_images(images)
    _check_cell(corruption, severity)
    state = np.random.get_state()
    try:
        out = np.empty_like(images)
        for i, image in enumerate(images):
            out[i] = corrupt_image(image, corruption, severity, image_seed(seed, corruption, severity, start_index + i))
    finally:
        np.random.set_state(state)
    return out


def prepare_images(
        dataset: Dataset,
        size: int = 224,
        limit: Optional[int] = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Stack a dataset of (PIL image, target) into uint8 (N, size, size, 3) + int64 targets, with ImageNet-C's
    preprocessing (resize the shorter side to ``size * 256 / 224``, center-crop ``size``), ready to corrupt.

    E.g. ``prepare_images(ImageFolder('imagenet/val'), limit=5000)`` for an ImageNet-val subset (take the subset
    with ``torch.utils.data.Subset`` to choose which images).
    """
    from torchvision import transforms
    tf = transforms.Compose([transforms.Resize(round(size * 256 / 224)), transforms.CenterCrop(size)])
    n = len(dataset) if limit is None else min(limit, len(dataset))
    images = np.empty((n, size, size, 3), np.uint8)
    targets = np.empty(n, np.int64)
    for i in range(n):
        image, targets[i] = dataset[i]
        images[i] = np.asarray(tf(image.convert('RGB')))
    return images, targets


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def _sha256_array(images: np.ndarray) -> str:
    digest = hashlib.sha256(f'{images.shape}{images.dtype}'.encode())
    digest.update(memoryview(np.ascontiguousarray(images)).cast('B'))
    return digest.hexdigest()


def _atomic_write_json(path: str, obj: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix='.tmp')
    with os.fdopen(fd, 'w') as f:
        json.dump(obj, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


class CorruptedArrayDataset(Dataset):
    """uint8 images (N, H, W) or (N, H, W, C) + integer targets as a torch dataset.

    Items are ``(transform(PIL image), target)``; without a transform, a float tensor (C, H, W) in [0, 1].
    """

    def __init__(self, images: np.ndarray, targets: Sequence[int], transform: Optional[Callable] = None):
        if len(images) != len(targets):
            raise ValueError(f'{len(images)} images but {len(targets)} targets')
        self.images = images
        self.targets = torch.as_tensor(np.asarray(targets), dtype=torch.long)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image = np.asarray(self.images[index])
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        pil = Image.fromarray(image)
        if self.transform is not None:
            return self.transform(pil), int(self.targets[index])
        tensor = torch.from_numpy(image.copy()).float().div_(255)
        tensor = tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)
        return tensor, int(self.targets[index])


class CorruptionCache:
    """A built cache: ``load(corruption, severity)`` gives the uint8 array, ``dataset(...)`` a torch dataset.

    ``built`` and ``reused`` list the ``'<corruption>/<severity>'`` cells this ``build_corruptions`` call computed
    and took from disk.
    """

    def __init__(self, cache_dir: str, manifest: dict, built: list[str], reused: list[str]):
        self.cache_dir = cache_dir
        self.manifest = manifest
        self.built = built
        self.reused = reused

    @property
    def cells(self) -> list[str]:
        """The cells this handle serves: the ones built or verified by the call that returned it."""
        return sorted(self.built + self.reused)

    def path(self, corruption: str, severity: int) -> str:
        return os.path.join(self.cache_dir, corruption, f'{severity}.npy')

    def load(self, corruption: str, severity: int, mmap: bool = True) -> np.ndarray:
        """The corrupted images of one cell (memory-mapped read-only by default)."""
        key = f'{corruption}/{severity}'
        if key not in self.cells:
            raise KeyError(f'cell {key} was not built or verified by this build_corruptions call '
                           f'({self.cache_dir!r}); cells: {self.cells}')
        return np.load(self.path(corruption, severity), mmap_mode='r' if mmap else None)

    def dataset(
            self,
            corruption: str,
            severity: int,
            targets: Sequence[int],
            transform: Optional[Callable] = None,
    ) -> CorruptedArrayDataset:
        return CorruptedArrayDataset(self.load(corruption, severity), targets, transform)


def _recipe(seed: int, images: np.ndarray) -> dict:
    return {
        'format': CACHE_FORMAT,
        'package': 'imagecorruptions-imaug',
        'package_version': _package_version('imagecorruptions-imaug'),
        'seed': seed,
        'seeding': 'per image: SeedSequence([seed, crc32(corruption), severity, index])',
        'grayscale': 'stack to RGB, corrupt, PIL luma (ITU-R 601-2)',
        'source_sha256': _sha256_array(images),
        'source_shape': list(images.shape),
    }


def _read_manifest(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or not isinstance(manifest.get('entries'), dict):
        return None
    return manifest


def _cell_is_valid(path: str, expected_sha: Optional[str], shape: tuple) -> bool:
    if expected_sha is None or not os.path.isfile(path) or _sha256_file(path) != expected_sha:
        return False
    try:
        array = np.load(path, mmap_mode='r')
    except (OSError, ValueError):
        return False
    return array.shape == shape and array.dtype == np.uint8


def _chunks(n: int, chunk_size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, chunk_size):
        yield start, min(start + chunk_size, n)


def _fill_cell(
        path: str,
        images: np.ndarray,
        corruption: str,
        severity: int,
        seed: int,
        chunk_size: int,
        executor: Optional[ProcessPoolExecutor],
        advance: Callable[[int], None],
) -> None:
    """Write one cell's corrupted images to a new ``.npy`` at ``path``, chunk by chunk."""
    out = np.lib.format.open_memmap(path, mode='w+', dtype=np.uint8, shape=images.shape)
    spans = list(_chunks(len(images), chunk_size))
    if executor is None:
        results = (corrupt_images(images[a:b], corruption, severity, seed, a) for a, b in spans)
    else:
        n = len(spans)
        results = executor.map(corrupt_images, [images[a:b] for a, b in spans], [corruption] * n, [severity] * n,
                               [seed] * n, [a for a, _ in spans])
    for (a, b), chunk in zip(spans, results, strict=True):
        out[a:b] = chunk
        advance(b - a)
    out.flush()
    del out


def build_corruptions(
        images: np.ndarray,
        cache_dir: str,
        corruptions: Sequence[str] = CORRUPTIONS,
        severities: Sequence[int] = SEVERITIES,
        seed: int = 0,
        chunk_size: int = 256,
        num_workers: int = 0,
        progress: bool = True,
) -> CorruptionCache:
    """Build (or reuse) the corrupted copies of ``images`` for every (corruption, severity) under ``cache_dir``.

    ``images``: uint8 (N, H, W) grayscale or (N, H, W, 1|3), at least 16 px. Cells already on disk with a matching
    recipe, source hash and file hash are reused; everything else is (re)computed, with a rich progress bar, in
    ``num_workers`` processes (0: in this process). Results do not depend on ``chunk_size`` or ``num_workers``.
    Concurrent builders of one cache (e.g. every torchrun rank) stay correct but duplicate the work: build on one
    rank, then barrier.
    """
    _check_images(images)
    for c in corruptions:
        for s in severities:
            _check_cell(c, s)
    os.makedirs(cache_dir, exist_ok=True)
    manifest_path = os.path.join(cache_dir, 'manifest.json')
    recipe = _recipe(seed, images)
    manifest = _read_manifest(manifest_path)
    if manifest is None or manifest.get('recipe') != recipe:
        manifest = {'recipe': recipe, 'entries': {}}
    cache = CorruptionCache(cache_dir, manifest, built=[], reused=[])
    todo = []
    for c in corruptions:
        for s in severities:
            key = f'{c}/{s}'
            if _cell_is_valid(cache.path(c, s), manifest['entries'].get(key), images.shape):
                cache.reused.append(key)
            else:
                manifest['entries'].pop(key, None)
                todo.append((c, s))
    _atomic_write_json(manifest_path, manifest)
    if not todo:
        return cache

    columns = (TextColumn('[bold]{task.description}'), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    executor = ProcessPoolExecutor(num_workers) if num_workers > 0 else None
    try:
        with Progress(*columns, disable=not progress) as bar:
            task = bar.add_task('corrupting', total=len(todo) * len(images))
            for c, s in todo:
                bar.update(task, description=f'{c} s{s}')
                path = cache.path(c, s)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix='.partial.npy')  # unique per process
                os.close(fd)
                try:
                    _fill_cell(tmp, images, c, s, seed, chunk_size, executor, lambda n: bar.advance(task, n))
                except BaseException:
                    os.remove(tmp)
                    raise
                os.replace(tmp, path)
                manifest['entries'][f'{c}/{s}'] = _sha256_file(path)
                _atomic_write_json(manifest_path, manifest)
                cache.built.append(f'{c}/{s}')
    finally:
        if executor is not None:
            executor.shutdown()
    return cache

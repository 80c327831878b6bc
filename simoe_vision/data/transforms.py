"""Training and evaluation transforms (albumentations 2.0.8) for numpy uint8 arrays and PIL images.

Every transform returns a CHW float32 tensor with exactly ``in_chans`` channels, normalised with ``mean``/``std``.
Small-image models (input side <= ``SMALL_INPUT_MAX`` = 64 px): an image that fits inside the input (Fashion-MNIST's
28 px for a 32 px model) is zero-padded to the input size by default instead of being upsampled: padding keeps every
pixel exact (no interpolation blur) and Fashion-MNIST's background is already 0, so the border looks like more
background. All other cases (every image for a 224 px model, however small) follow timm's recipes: random-resized
crop for training, resize by ``crop_pct`` + center crop for evaluation.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from PIL import Image

__all__ = [
    'FASHION_MNIST_MEAN', 'FASHION_MNIST_STD', 'SMALL_INPUT_MAX', 'ImageTransform', 'eval_transforms', 'to_uint8_array',
    'train_transforms',
]

# Per-pixel mean and std of the 60000 Fashion-MNIST training images at 28x28, pixel values scaled to [0, 1]
# (computed once from train-images-idx3-ubyte.gz: mean 0.28604, std 0.35302). They are applied after zero-padding
# to 32 px, as is usual for these constants; the padded border then normalises to -0.2860/0.3530 = -0.810.
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
# Inputs up to this side length are small-image models (28-32 px datasets): images that fit are padded, not resized.
SMALL_INPUT_MAX = 64

_INTERPOLATION = {
    'nearest': cv2.INTER_NEAREST,
    'bilinear': cv2.INTER_LINEAR,
    'bicubic': cv2.INTER_CUBIC,
    'area': cv2.INTER_AREA,
    'lanczos': cv2.INTER_LANCZOS4,
}
_SMALL_MODES = ('pad', 'resize')


def to_uint8_array(image: Any, in_chans: int) -> np.ndarray:
    """Convert a PIL image or a uint8 HxW / HxWxC array to a contiguous HxWx``in_chans`` uint8 array.

    Grayscale is repeated to 3 channels for an RGB model; RGB is reduced to luma (ITU-R 601-2, as PIL's ``'L'``)
    for a 1-channel model; an alpha channel is dropped.
    """
    if isinstance(image, Image.Image):
        image = image.convert('L' if in_chans == 1 else 'RGB')
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(f'expected a uint8 image array, got dtype {array.dtype}; convert it with .astype(np.uint8)')
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ValueError(f'expected an image of shape HxW or HxWxC with C in (1, 3, 4), got {array.shape}')
    if array.shape[2] == 4:
        array = array[:, :, :3]
    channels = array.shape[2]
    if channels == 1 and in_chans == 3:
        array = np.repeat(array, 3, axis=2)
    elif channels == 3 and in_chans == 1:
        array = cv2.cvtColor(np.ascontiguousarray(array), cv2.COLOR_RGB2GRAY)[:, :, None]
    return np.ascontiguousarray(array)


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    if len(size) == 3:  # timm's (C, H, W) input_size
        size = size[1:]
    if len(size) != 2:
        raise ValueError(f'image size must be an int, (H, W) or (C, H, W), got {size}')
    return int(size[0]), int(size[1])


def _norm_stats(values: Sequence[float] | float, in_chans: int, name: str) -> tuple[float, ...]:
    values = (float(values),) if isinstance(values, (int, float)) else tuple(float(v) for v in values)
    if len(values) == 1:
        return values * in_chans
    if len(values) != in_chans:
        raise ValueError(f'{name} has {len(values)} values but in_chans={in_chans}; give 1 or {in_chans} values')
    return values


def _interpolation(name: str) -> int:
    if name not in _INTERPOLATION:
        raise ValueError(f'unknown interpolation {name!r}; choose one of {sorted(_INTERPOLATION)}')
    return _INTERPOLATION[name]


class ImageTransform:
    """Convert channels, pick the small- or large-image pipeline by the input's size, return a CHW float tensor.

    ``small`` runs on images no larger than ``size`` in both sides when ``size`` is a small-image input
    (<= ``SMALL_INPUT_MAX``), ``large`` on all others. ``reseed`` gives both albumentations pipelines a fresh random
    state (DataLoader workers call it, see ``loaders.seed_worker``).
    """

    def __init__(self, size: tuple[int, int], in_chans: int, small: A.Compose, large: A.Compose) -> None:
        if in_chans not in (1, 3):
            raise ValueError(f'in_chans must be 1 or 3, got {in_chans}')
        self.size = size
        self.in_chans = in_chans
        self.small = small
        self.large = large
        self.small_input = max(size) <= SMALL_INPUT_MAX

    def reseed(self, seed: int) -> None:
        self.small.set_random_seed(seed)
        self.large.set_random_seed(seed + 1)

    def __call__(self, image: Any) -> torch.Tensor:
        array = to_uint8_array(image, self.in_chans)
        is_small = self.small_input and array.shape[0] <= self.size[0] and array.shape[1] <= self.size[1]
        out = (self.small if is_small else self.large)(image=array)['image']
        return out.float()

    def __repr__(self) -> str:
        return f'{type(self).__name__}(size={self.size}, in_chans={self.in_chans},\n small={self.small},\n' \
               f' large={self.large})'


def _finish(mean: tuple[float, ...], std: tuple[float, ...]) -> list[A.BasicTransform]:
    return [A.Normalize(mean=mean, std=std, max_pixel_value=255.0), ToTensorV2()]


def _compose(transforms: list[A.BasicTransform]) -> A.Compose:
    """An albumentations pipeline for the image target alone: the mask/bbox shape check is skipped (a third of the
    per-image cost of a 28 px training transform)."""
    return A.Compose(transforms, is_check_shapes=False)


def _pad_to(height: int, width: int) -> A.BasicTransform:
    return A.PadIfNeeded(min_height=height, min_width=width, position='center', border_mode=cv2.BORDER_CONSTANT,
                         fill=0)


def _fit_small(size: tuple[int, int], small_mode: str, interpolation: int) -> A.BasicTransform:
    if small_mode not in _SMALL_MODES:
        raise ValueError(f'unknown small_mode {small_mode!r}; choose one of {_SMALL_MODES}')
    if small_mode == 'resize':
        return A.Resize(size[0], size[1], interpolation=interpolation)
    return _pad_to(size[0], size[1])


def train_transforms(
        img_size: int | Sequence[int],
        in_chans: int,
        mean: Sequence[float] | float,
        std: Sequence[float] | float,
        *,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        color_jitter: float = 0.0,
        crop_padding: int | None = None,
        interpolation: str = 'bicubic',
        small_mode: str = 'pad',
) -> ImageTransform:
    """Training augmentation.

    Small images (both sides <= ``img_size`` <= 64, e.g. Fashion-MNIST at 32): fit to the input
    (``small_mode='pad'``: centre zero-pad 28 -> 32; ``'resize'``: resize), then the CIFAR recipe: zero-pad by
    ``crop_padding`` (default ``img_size // 8`` = 4 px at 32) and random-crop back, horizontal flip. Other images
    (ImageNet, or any image for a model wider than 64 px): timm's random-resized crop with ``scale``/``ratio``,
    horizontal flip. ``color_jitter`` > 0 adds brightness/contrast/saturation jitter of that strength (as timm's
    ``--color-jitter``); it needs RGB output (``in_chans=3``).
    """
    size = _pair(img_size)
    mean, std = _norm_stats(mean, in_chans, 'mean'), _norm_stats(std, in_chans, 'std')
    interp = _interpolation(interpolation)
    if not 0.0 <= hflip <= 1.0:
        raise ValueError(f'hflip is a probability in [0, 1], got {hflip}')
    if color_jitter < 0:
        raise ValueError(f'color_jitter must be >= 0, got {color_jitter}')
    if color_jitter > 0 and in_chans != 3:
        raise ValueError(f'color_jitter={color_jitter} needs RGB output (in_chans=3), got in_chans={in_chans}; '
                         'set color_jitter=0 for grayscale models')
    pad = max(1, min(size) // 8) if crop_padding is None else crop_padding
    if pad < 0:
        raise ValueError(f'crop_padding must be >= 0, got {pad}')
    jitter = [A.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter, hue=0.0, p=1.0)] \
        if color_jitter > 0 else []
    flip = [A.HorizontalFlip(p=hflip)] if hflip > 0 else []
    fit = [] if small_mode == 'pad' else [_fit_small(size, small_mode, interp)]
    if small_mode == 'pad' or pad:  # one centred zero-pad both fits the image (28 -> 32 px) and adds the crop margin
        fit.append(_pad_to(size[0] + 2 * pad, size[1] + 2 * pad))
    crop = [A.RandomCrop(size[0], size[1])] if pad else []
    small = _compose([*fit, *crop, *flip, *jitter, *_finish(mean, std)])
    large = _compose([
        A.RandomResizedCrop(size=size, scale=scale, ratio=ratio, interpolation=interp),
        *flip, *jitter, *_finish(mean, std),
    ])
    return ImageTransform(size, in_chans, small, large)


def eval_transforms(data_config: dict[str, Any], *, small_mode: str = 'pad') -> ImageTransform:
    """Evaluation transform from timm's ``resolve_data_config`` dict.

    Uses ``input_size`` (C, H, W), ``mean``, ``std``, ``interpolation``, ``crop_pct`` (default 0.875) and
    ``crop_mode`` (``'center'``, default: resize the short side to ``size / crop_pct`` then center crop;
    ``'squash'``: resize both sides to ``size / crop_pct`` then center crop; ``'border'``: resize the long side to
    ``size`` and zero-pad), as timm's eval transform does. For a small-image input (<= 64 px), images no larger than
    the input are fitted without a crop (``small_mode='pad'``: centre zero-pad, matching ``train_transforms``;
    ``'resize'``). ImageNet-C's 224-px images pass unchanged with ``crop_pct=1.0``.
    """
    missing = [k for k in ('input_size', 'mean', 'std') if k not in data_config]
    if missing:
        raise ValueError(f'data_config lacks {missing}; build it with timm.data.resolve_data_config(model=model)')
    in_chans = int(data_config['input_size'][0])
    size = _pair(data_config['input_size'])
    mean = _norm_stats(data_config['mean'], in_chans, 'mean')
    std = _norm_stats(data_config['std'], in_chans, 'std')
    interp = _interpolation(data_config.get('interpolation', 'bicubic'))
    crop_pct = float(data_config.get('crop_pct') or 0.875)
    crop_mode = data_config.get('crop_mode') or 'center'
    if not 0 < crop_pct <= 1:
        raise ValueError(f'crop_pct must be in (0, 1], got {crop_pct}')
    scale_h, scale_w = math.floor(size[0] / crop_pct), math.floor(size[1] / crop_pct)
    if crop_mode == 'center':
        fit = [A.SmallestMaxSize(max_size=min(scale_h, scale_w), interpolation=interp)]
    elif crop_mode == 'squash':
        fit = [A.Resize(scale_h, scale_w, interpolation=interp)]
    elif crop_mode == 'border':
        fit = [A.LongestMaxSize(max_size=min(scale_h, scale_w), interpolation=interp)]
    else:
        raise ValueError(f"unknown crop_mode {crop_mode!r}; choose 'center', 'squash' or 'border'")
    large = _compose([
        *fit,
        A.CenterCrop(size[0], size[1], pad_if_needed=True, border_mode=cv2.BORDER_CONSTANT, fill=0),
        *_finish(mean, std),
    ])
    small = _compose([_fit_small(size, small_mode, interp), *_finish(mean, std)])
    return ImageTransform(size, in_chans, small, large)

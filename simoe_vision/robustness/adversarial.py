"""White-box L-inf robustness: FGSM, PGD and the standard AutoAttack (torchattacks) in pixel space, top-1 accuracy
under attack.

torchattacks clamps to [0, 1], so the attack must see pixels, not normalised tensors: the model is wrapped with its
normalisation (``PixelSpaceModel``), and the loader's normalised images are mapped back to pixels first. ``eps``
and the step size are in 1/255 units (``eps=4`` is 4/255). The model runs in eval mode, where MoE layers do not attach
their balancing loss to the backward pass, so the attacker maximises the task loss only.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence, Union

import torch
import torchattacks
from torch import Tensor, nn

__all__ = ['ATTACKS', 'PixelSpaceModel', 'adversarial_accuracy', 'make_attack']

ATTACKS = ('fgsm', 'pgd', 'autoattack')


def _channel_stats(values: Union[float, Sequence[float]], name: str) -> Tensor:
    t = torch.as_tensor(values, dtype=torch.float32).flatten()
    if t.numel() == 0 or (name == 'std' and (t <= 0).any()):
        raise ValueError(f'{name} must be one value or one per channel{" (all > 0)" if name == "std" else ""}, '
                         f'got {values}')
    return t.view(1, -1, 1, 1)


class PixelSpaceModel(nn.Module):
    """``model((x - mean) / std)``: a model that takes [0, 1] pixels, for attacks that clamp to the pixel box.

    ``mean``/``std`` hold one value (broadcast to every channel: 1-channel Fashion-MNIST) or one per channel.
    """

    def __init__(self, model: nn.Module, mean: Union[float, Sequence[float]], std: Union[float, Sequence[float]]):
        super().__init__()
        self.model = model
        self.register_buffer('mean', _channel_stats(mean, 'mean'), persistent=False)
        self.register_buffer('std', _channel_stats(std, 'std'), persistent=False)
        if self.mean.shape[1] != self.std.shape[1] and 1 not in (self.mean.shape[1], self.std.shape[1]):
            raise ValueError(f'mean has {self.mean.shape[1]} channels but std has {self.std.shape[1]}')

    def check_channels(self, x: Tensor) -> None:
        stats = max(self.mean.shape[1], self.std.shape[1])
        if x.ndim != 4 or stats not in (1, x.shape[1]):
            raise ValueError(f'inputs of shape {tuple(x.shape)} do not match normalisation with {stats} channels; '
                             'pass the mean/std of the data config the loader was built with')

    def normalize(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def to_pixels(self, x: Tensor) -> Tensor:
        """Undo the normalisation of a loader's images: back to [0, 1] (clamped against rounding)."""
        self.check_channels(x)
        return (x * self.std + self.mean).clamp_(0.0, 1.0)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(self.normalize(x))


def _check_attack(attack: str) -> None:
    if attack not in ATTACKS:
        raise ValueError(f'unknown attack {attack!r}; choose one of {ATTACKS}')


def make_attack(
        model: nn.Module,
        attack: str = 'pgd',
        eps: float = 4.0,
        alpha: Optional[float] = None,
        steps: int = 10,
        random_start: bool = True,
        num_classes: int = 10,
        seed: int = 0,
) -> torchattacks.attack.Attack:
    """A torchattacks L-inf attack on a pixel-space model. ``eps``/``alpha`` in 1/255 units; PGD's default step size
    is Madry et al.'s ``2.5 * eps / steps``. FGSM takes one step of size ``eps`` (``alpha``/``steps`` unused).
    'autoattack' is Croce & Hein's standard L-inf ensemble (APGD-CE, APGD-T, FAB-T, Square; its own step counts,
    ``seed``), which needs ``num_classes``."""
    _check_attack(attack)
    if eps < 0:
        raise ValueError(f'eps must be >= 0 (in 1/255 units), got {eps}')
    if attack == 'fgsm':
        return torchattacks.FGSM(model, eps=eps / 255)
    if attack == 'autoattack':
        return torchattacks.AutoAttack(model, norm='Linf', eps=eps / 255, version='standard', n_classes=num_classes,
                                       seed=seed)
    if steps < 1:
        raise ValueError(f'PGD needs steps >= 1, got {steps}')
    alpha = 2.5 * eps / steps if alpha is None else alpha
    return torchattacks.PGD(model, eps=eps / 255, alpha=alpha / 255, steps=steps, random_start=random_start)


def adversarial_accuracy(
        model: nn.Module,
        loader: Iterable,
        mean: Union[float, Sequence[float]],
        std: Union[float, Sequence[float]],
        attack: str = 'pgd',
        eps: float = 4.0,
        alpha: Optional[float] = None,
        steps: int = 10,
        random_start: bool = True,
        device: Union[torch.device, str] = 'cpu',
        seed: int = 0,
        max_samples: Optional[int] = None,
) -> dict:
    """Top-1 (%) on clean inputs and under an L-inf FGSM/PGD attack, over the same samples.

    ``loader`` yields (images, targets) normalised with ``mean``/``std`` (the same loader as clean evaluation). The
    model runs in eval mode (restored afterwards); the random start is drawn from a forked torch RNG seeded with
    ``seed``, so results repeat and the caller's RNG is untouched. ``max_samples`` caps the cost on CPU.
    """
    _check_attack(attack)  # before any work: the attack itself is built on the first batch (it needs the class count)
    device = torch.device(device)
    pixel_model = PixelSpaceModel(model, mean, std).to(device)
    attacker = None
    was_training = model.training
    model.eval()
    clean = robust = count = 0
    fork_devices = [device] if device.type == 'cuda' else []
    try:
        with torch.random.fork_rng(devices=fork_devices):
            torch.manual_seed(seed)
            for images, targets in loader:
                if max_samples is not None and count >= max_samples:
                    break
                if max_samples is not None:
                    images, targets = images[:max_samples - count], targets[:max_samples - count]
                pixels = pixel_model.to_pixels(images.to(device))
                targets = targets.to(device)
                with torch.no_grad():
                    logits = pixel_model(pixels)
                clean += int(logits.argmax(-1).eq(targets).sum())
                if attacker is None:  # AutoAttack needs the class count: the model's output width
                    attacker = make_attack(pixel_model, attack, eps=eps, alpha=alpha, steps=steps,
                                           random_start=random_start, num_classes=logits.shape[-1], seed=seed)
                    attacker.set_device(device)
                adv = attacker(pixels, targets)
                with torch.no_grad():
                    robust += int(pixel_model(adv).argmax(-1).eq(targets).sum())
                count += targets.numel()
    finally:
        model.train(was_training)
    if not count:
        raise ValueError('no samples were attacked: is the loader empty?')
    return {'clean_top1': 100.0 * clean / count, 'adv_top1': 100.0 * robust / count, 'num_samples': count,
            'attack': attack, 'eps': eps}

"""Routing metrics as pure functions over top-1 expert indices and routing probabilities (DESIGN.md section 5)."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor

from ..routers.diagnostics import entropy

__all__ = ['changed_share', 'fluctuation_curve', 'last_fluctuation_epoch', 'window_mean', 'routing_agreement',
           'load_cv', 'routing_entropy', 'FluctuationTracker']


def changed_share(previous: Tensor, current: Tensor) -> float:
    """Share of tokens whose top-1 expert differs between two recordings of the same inputs."""
    if previous.shape != current.shape:
        raise ValueError(f'top-1 recordings differ in shape: {tuple(previous.shape)} vs {tuple(current.shape)}')
    return (previous != current).float().mean().item()


def routing_agreement(clean: Tensor, corrupted: Tensor) -> float:
    """Share of tokens routed to the same top-1 expert on the clean and the corrupted image."""
    return 1.0 - changed_share(clean, corrupted)


def fluctuation_curve(history: Tensor) -> Tensor:
    """Routing fluctuation (StableMoE) from per-epoch top-1 recordings (epochs, ...tokens): entry t-1 is the share
    of tokens whose top-1 changed between recording t-1 and t; length epochs - 1."""
    if history.shape[0] < 2:
        return history.new_zeros(0, dtype=torch.float32)
    return (history[1:] != history[:-1]).flatten(1).float().mean(dim=1)


def last_fluctuation_epoch(history: Tensor) -> Tensor:
    """For each token, the last recording index t >= 1 at which its top-1 differed from t - 1 (0: never changed)."""
    changed = history[1:] != history[:-1]
    steps = torch.arange(1, history.shape[0], device=history.device).view(-1, *([1] * (history.dim() - 1)))
    return (changed * steps).amax(dim=0) if changed.shape[0] else torch.zeros_like(history[0], dtype=torch.long)


def window_mean(values: Sequence[Optional[float]], epochs: Sequence[int], total_epochs: int, start: float,
                end: float) -> Optional[float]:
    """Mean of a per-epoch curve over the part ``(start, end]`` of training (fractions of ``total_epochs``).

    A curve value at epoch e (e.g. the fluctuation between the ends of epochs e-1 and e) belongs to the part of
    training ending at e / total_epochs, so the window keeps the e with ``start < e / total_epochs <= end``: over 10
    epochs, 40-90 % is epochs 5..9 (the changes from the end of epoch 4 to the end of epoch 9) and the last 30 % is
    8..10. Missing values (None) are skipped; None when the window holds no value.
    """
    chosen = [v for v, e in zip(values, epochs, strict=True) if start < e / total_epochs <= end and v is not None]
    return sum(chosen) / len(chosen) if chosen else None


def load_cv(load: Tensor) -> float:
    """Coefficient of variation (population std / mean) of per-expert token shares; 0 is perfectly balanced."""
    load = load.float()
    return (load.std(unbiased=False) / load.mean().clamp_min(1e-12)).item()


def routing_entropy(probs: Tensor) -> float:
    """Mean over tokens of the entropy (nats) of the routing distribution (tokens, E)."""
    return entropy(probs).item()


class FluctuationTracker:
    """Keeps every epoch's top-1 experts of a fixed probe set, per MoE layer, and derives fluctuation from them.

    ``update(epoch, top1)`` takes {layer name: (images, tokens) top-1 indices}. State is plain tensors/lists so it
    travels in a ``weights_only`` checkpoint.
    """

    def __init__(self) -> None:
        self.epochs: List[int] = []
        self.history: Dict[str, List[Tensor]] = {}

    def update(self, epoch: int, top1: Dict[str, Tensor]) -> Dict[str, float]:
        """Record one epoch; returns this epoch's fluctuation per layer and their 'mean' (empty at the first)."""
        if self.history and set(top1) != set(self.history):
            raise ValueError(f'MoE layers changed between epochs: {sorted(self.history)} vs {sorted(top1)}')
        for name, indices in top1.items():
            self.history.setdefault(name, []).append(indices.detach().to('cpu', torch.int16))
        self.epochs.append(int(epoch))
        return self.latest()

    def latest(self) -> Dict[str, float]:
        if len(self.epochs) < 2:
            return {}
        out = {name: changed_share(h[-2], h[-1]) for name, h in self.history.items()}
        out['mean'] = sum(out.values()) / len(self.history)
        return out

    def curves(self) -> Dict[str, List[float]]:
        """Per layer (and 'mean'), the fluctuation at each recorded epoch after the first."""
        out = {name: fluctuation_curve(torch.stack(h)).tolist() for name, h in self.history.items()}
        if out:
            out['mean'] = torch.tensor(list(out.values())).mean(dim=0).tolist()
        return out

    def last_fluctuation_epochs(self) -> Tensor:
        """For every probe token of every layer, the epoch of its last top-1 change (first epoch: never changed)."""
        if not self.history:
            return torch.zeros(0, dtype=torch.long)
        steps = torch.cat([last_fluctuation_epoch(torch.stack(h)).flatten() for h in self.history.values()])
        return torch.tensor(self.epochs)[steps]

    def state_dict(self) -> Dict[str, object]:
        return {'epochs': list(self.epochs), 'history': {k: torch.stack(v) for k, v in self.history.items()}}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        self.epochs = [int(e) for e in state['epochs']]
        self.history = {k: list(v.unbind(0)) for k, v in state['history'].items()}

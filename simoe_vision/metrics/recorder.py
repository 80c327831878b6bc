"""Records what a model's MoE layers decide, through forward hooks attached for the duration of a ``with`` block."""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn as nn
from torch import Tensor

from ..layers import MoeMlp
from ..routers.diagnostics import DIAGNOSTICS
from .routing import load_cv

__all__ = ['RoutingRecorder']


class RoutingRecorder:
    """Collects, per MoE layer, each image's top-1 expert per token and running routing statistics.

    ``with RoutingRecorder(model) as rec: model(x)`` then ``rec.top1()`` -> {layer: (images, tokens) int16} and
    ``rec.summary()`` -> {layer: {load, load_cv, dropped_fraction, entropy, gate_entropy, margin, flip}} (the
    routing diagnostics of :mod:`simoe_vision.routers.diagnostics`, where the router reports them). The model's
    ``forward`` is untouched.
    """

    def __init__(self, model: nn.Module, keep_top1: bool = True) -> None:
        self.layers = {name: m for name, m in model.named_modules() if isinstance(m, MoeMlp)}
        if not self.layers:
            raise ValueError(f'{type(model).__name__} has no MoE layers to record')
        self.keep_top1 = keep_top1
        self._handles: List = []
        self.reset()

    def reset(self) -> None:
        self._top1: Dict[str, List[Tensor]] = {name: [] for name in self.layers}
        self._sums: Dict[str, Dict[str, Tensor]] = {}
        self._tokens: Dict[str, int] = {name: 0 for name in self.layers}

    def __enter__(self) -> RoutingRecorder:
        for name, layer in self.layers.items():
            self._handles.append(layer.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str):
        def hook(module: MoeMlp, args, output: Tensor) -> None:
            routing = module.last_routing
            if routing is None:
                raise RuntimeError(f"{name} kept no routing record: the static dispatch (eval_dispatch='static', or "
                                   "a captured graph) computes no routing statistics; record with 'sorted'")
            batch, tokens = output.shape[:2]
            count = batch * tokens
            if self.keep_top1:
                self._top1[name].append(routing.indices[:, 0].reshape(batch, tokens).to('cpu', torch.int16))
            stats = routing.stats
            sums = self._sums.setdefault(name, {})
            for key in ('load', 'dropped_fraction', *DIAGNOSTICS):
                if key in stats:
                    sums[key] = sums.get(key, 0) + stats[key].detach().double().cpu() * count
            self._tokens[name] += count
        return hook

    def top1(self) -> Dict[str, Tensor]:
        """{layer: (images, tokens)} top-1 experts of everything recorded since the last reset."""
        return {name: torch.cat(parts) for name, parts in self._top1.items() if parts}

    def totals(self) -> Dict[str, Dict[str, Tensor]]:
        """Token-weighted sums and token counts (for reducing over processes before :meth:`summary`)."""
        return {name: dict(self._sums[name], tokens=torch.tensor(float(self._tokens[name]), dtype=torch.float64))
                for name in self._sums}

    @staticmethod
    def summarize(totals: Dict[str, Dict[str, Tensor]]) -> Dict[str, Dict[str, object]]:
        """Per layer: mean expert load (token share per expert), its CV, dropped share and the token-mean routing
        diagnostics (entropy of P, of G, top-1 margin of P, top-1 flip share; those the router reported)."""
        out = {}
        for name, sums in totals.items():
            n = sums['tokens'].clamp_min(1)
            load = (sums['load'] / n).float()
            out[name] = {'load': load.tolist(), 'load_cv': load_cv(load),
                         'dropped_fraction': float(sums['dropped_fraction'] / n),
                         **{key: float(sums[key] / n) for key in DIAGNOSTICS if key in sums}}
        return out

    def summary(self) -> Dict[str, Dict[str, object]]:
        return self.summarize(self.totals())

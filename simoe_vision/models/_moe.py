"""What V-MoE and Swin-MoE share: MoE layout parsing, the model mixin (aux loss, MoE layer listing) and sparse
upcycling from dense timm checkpoints."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor

from ..layers import MoeMlp

__all__ = ['EXPERT_INITS', 'MoeModelMixin', 'parse_moe_layout', 'moe_layers', 'init_experts', 'upcycle_state_dict',
           'count_params']

Layout = Union[str, Sequence[int]]
# Expert weight inits: timm's ViT init (trunc-normal, std 0.02; what Experts does itself) or N(0, 1 / fan_in).
EXPERT_INITS = ('trunc_normal', 'fan_in')


def parse_moe_layout(layout: Layout, depth: int) -> List[int]:
    """Blocks that get a MoE MLP: 'every2' (1, 3, 5, ...: V-MoE), 'last2' (the last two odd blocks) or a list."""
    if isinstance(layout, str):
        odd = list(range(1, depth, 2))
        if layout == 'every2':
            return odd
        if layout == 'last2':
            return odd[-2:]
        raise ValueError(f"unknown moe_layout {layout!r}; valid: 'every2', 'last2', or a list of block indices")
    indices = sorted(set(int(i) for i in layout))
    bad = [i for i in indices if not 0 <= i < depth]
    if bad:
        raise ValueError(f'moe_layout block indices {bad} out of range for a model of depth {depth}')
    return indices


def moe_layers(model: nn.Module) -> List[Tuple[str, MoeMlp]]:
    """All MoE MLPs of a model, as (qualified name, module), in forward order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoeMlp)]


def init_experts(model: nn.Module, scheme: str) -> None:
    """Re-initialise every MoE layer's expert weights: 'trunc_normal' keeps them (timm's std 0.02, biases 0);
    'fan_in' draws N(0, 1 / fan_in) (fan_in = d for fc1, the hidden width for fc2), LeCun-normal."""
    if scheme not in EXPERT_INITS:
        raise ValueError(f'unknown expert_init {scheme!r}; valid: {", ".join(EXPERT_INITS)}')
    if scheme == 'fan_in':
        with torch.no_grad():
            for _, mlp in moe_layers(model):
                for weight in (mlp.experts.fc1_weight, mlp.experts.fc2_weight):
                    weight.normal_(0.0, weight.shape[1] ** -0.5)


class MoeModelMixin:
    """Adds the MoE accessors to a timm model class."""

    def moe_layers(self) -> List[Tuple[str, MoeMlp]]:
        return moe_layers(self)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        """The base model's set plus the expert biases: they are (E, 1, hidden), so timm's optimizer factory, which
        exempts 1-D parameters and ``*.bias``, would otherwise decay them."""
        names = set(super().no_weight_decay())
        for name, mlp in moe_layers(self):
            names |= {f'{name}.experts.{b}' for b in ('fc1_bias', 'fc2_bias') if getattr(mlp.experts, b) is not None}
        return names

    def set_aux_loss_scale(self, scale: float) -> None:
        """Scale the aux-loss gradient of every MoE layer by what the loop multiplies its task loss by (``1 / N``
        for N accumulation steps, a GradScaler's current scale): the balance weight then stays the configured one.
        The same setting is the model kwarg ``aux_loss_scale`` (e.g. timm's ``--model-kwargs aux_loss_scale=0.5``)."""
        self.moe_config.aux_loss_scale = float(scale)
        for _, layer in moe_layers(self):
            layer.moe.aux_loss_scale = float(scale)

    def aux_loss(self) -> Optional[Tensor]:
        """Sum of the MoE layers' aux losses from the last forward, detached (for logging; it already reached the
        gradient through the layers' backward pass)."""
        losses = [m.aux_loss() for _, m in moe_layers(self) if m.aux_loss() is not None]
        return torch.stack(losses).sum() if losses else None


def upcycle_state_dict(dense_state_dict: Dict[str, Tensor], model: nn.Module) -> Dict[str, Tensor]:
    """Sparse upcycling: a full state dict for ``model`` (a MoE model) from a dense timm checkpoint of the same
    architecture, copying each replaced MLP into every expert. Router weights keep ``model``'s own init."""
    state = dict(model.state_dict())
    moe_names = {name for name, _ in moe_layers(model)}
    for key, value in dense_state_dict.items():
        prefix, _, leaf = key.rpartition('.')
        mlp_name, _, linear = prefix.rpartition('.')
        if mlp_name in moe_names and linear in ('fc1', 'fc2'):
            target = f'{mlp_name}.experts.{linear}_{leaf}'
            if target not in state:
                raise ValueError(f'dense key {key!r} has no expert counterpart {target!r} (bias setting differs?)')
            expert_value = value.t() if leaf == 'weight' else value.unsqueeze(0)
            state[target] = expert_value.unsqueeze(0).expand_as(state[target]).clone()
        elif key in state:
            if state[key].shape != value.shape:
                raise ValueError(f'shape mismatch for {key!r}: dense {tuple(value.shape)} vs model '
                                 f'{tuple(state[key].shape)}; build the MoE model with the dense architecture')
            state[key] = value
        else:
            raise ValueError(f'dense key {key!r} does not exist in the MoE model; is it the same architecture?')
    return state


def count_params(model: nn.Module) -> Tuple[int, int]:
    """(total parameters, parameters active per token): each MoE layer's experts count k/E of their size. Experts
    held by other processes (expert parallelism) count as well: the numbers are the whole model's."""
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for _, m in moe_layers(model):
        per_expert = sum(p.numel() for p in m.experts.parameters(recurse=False)) // m.experts.num_experts
        total += per_expert * (m.num_experts - m.experts.num_experts)
        inactive += per_expert * (m.num_experts - m.top_k)
    return total, total - inactive

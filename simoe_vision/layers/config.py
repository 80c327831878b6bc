"""The MoE settings, defined once: every MoE layer and model takes them as keyword arguments."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Dict, Mapping, Optional, Tuple, Union

from ..routers import check_router_name

__all__ = ['DROPLESS', 'CAPACITY_GROUPS', 'EVAL_DISPATCHES', 'MoeConfig']

# The spelling of "no capacity limit": a string, because timm.create_model drops every None-valued kwarg (and YAML,
# k=v flags and timm's --model-kwargs all carry a string unchanged).
DROPLESS = 'dropless'
CAPACITY_GROUPS = ('image', 'batch')
# 'sorted': kept pairs sorted by expert, no padding (the fastest eager); 'static': fixed capacity buffers, no host sync
# and no data-dependent shapes (what export, tracing and torch.compile always use in eval mode).
EVAL_DISPATCHES = ('sorted', 'static')
CapacityFactor = Union[float, str]


def _check_capacity_factor(name: str, value: Any) -> CapacityFactor:
    if value is None:
        raise ValueError(f"{name}=None is not accepted (timm.create_model silently drops None-valued kwargs, which "
                         f"would keep the default capacity); for no capacity limit use {name}='{DROPLESS}'")
    if value == DROPLESS:
        return DROPLESS
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a number > 0 or '{DROPLESS}', got {value!r}")
    return float(value)


@dataclass
class MoeConfig:
    """The MoE settings of a layer (and of every MoE layer of a model).

    Attributes:
        num_experts, top_k: E experts per layer, k per token.
        router: a registered router name (see :mod:`simoe_vision.routers`); ``router_kwargs`` go to it.
        capacity_factor / eval_capacity_factor: per-expert capacity ``ceil(k T cf / E)`` in training / eval, or
            ``'dropless'`` (every routed token is processed). Dropped (token, expert) pairs contribute nothing; the
            block's residual carries them.
        capacity_group: tokens that share capacity: 'image' (default; a sample's output never depends on its batch)
            or 'batch'.
        batch_prioritized: Batch Prioritized Routing: tokens with the highest routing probability claim slots first.
        eval_dispatch: how eval mode dispatches: 'sorted' (default) or 'static' (fixed per-expert capacity buffers,
            the same outputs; no aux losses or routing stats are computed). Exporting, tracing and torch.compile
            always use 'static' in eval mode.
        aux_loss_scale: factor on the aux-loss gradient riding the layer's backward pass; set it to what the loop
            multiplies its task loss by (``1 / N`` for N accumulation steps, a GradScaler's scale), so the balance
            weight stays the configured one. ``set_aux_loss_scale`` on a model changes it between steps.
        expert_parallel_size: EP; > 1 shards each layer's experts over the processes of an expert-parallel group
            (E / EP per process; needs torch.distributed with a world size divisible by EP; see
            :mod:`simoe_vision.layers.expert_parallel`). Routing and capacity stay on the tokens' process.
    """

    num_experts: int = 8
    top_k: int = 2
    router: str = 'softmax'
    router_kwargs: Dict[str, Any] = field(default_factory=dict)
    capacity_factor: CapacityFactor = 1.25
    eval_capacity_factor: CapacityFactor = 2.0
    capacity_group: str = 'image'
    batch_prioritized: bool = False
    eval_dispatch: str = 'sorted'
    aux_loss_scale: float = 1.0
    expert_parallel_size: int = 1

    def __post_init__(self) -> None:
        check_router_name(self.router)
        self.router_kwargs = dict(self.router_kwargs or {})
        self.capacity_factor = _check_capacity_factor('capacity_factor', self.capacity_factor)
        self.eval_capacity_factor = _check_capacity_factor('eval_capacity_factor', self.eval_capacity_factor)
        if self.capacity_group not in CAPACITY_GROUPS:
            raise ValueError(f'capacity_group must be one of {", ".join(CAPACITY_GROUPS)}, '
                             f'got {self.capacity_group!r}')
        if self.eval_dispatch not in EVAL_DISPATCHES:
            raise ValueError(f'eval_dispatch must be one of {", ".join(EVAL_DISPATCHES)}, got {self.eval_dispatch!r}')
        self.aux_loss_scale = float(self.aux_loss_scale)
        ep = self.expert_parallel_size
        if isinstance(ep, bool) or not isinstance(ep, int) or ep < 1:
            raise ValueError(f'expert_parallel_size must be a positive integer, got {ep!r}')
        if self.num_experts % ep:
            raise ValueError(f'num_experts={self.num_experts} is not divisible by expert_parallel_size={ep}')

    @classmethod
    def names(cls) -> Tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def split(cls, kwargs: Mapping[str, Any]) -> Tuple[MoeConfig, Dict[str, Any]]:
        """(the MoE settings among ``kwargs``, the other kwargs): how a model separates its MoE kwargs."""
        names = cls.names()
        return cls(**{k: v for k, v in kwargs.items() if k in names}), {k: v for k, v in kwargs.items()
                                                                       if k not in names}

    def capacity(self, training: bool) -> Optional[float]:
        """The capacity factor in force, or None when dropless."""
        cf = self.capacity_factor if training else self.eval_capacity_factor
        return None if cf == DROPLESS else cf

"""A bank of E two-layer MLP experts held as batched weight tensors."""
from __future__ import annotations

from typing import Sequence, Tuple, Type, Union

import torch
import torch.nn as nn
from timm.layers import to_2tuple
from torch import Tensor

from .grouped_linear import grouped_linear

__all__ = ['Experts']


class Experts(nn.Module):
    """E independent ``fc1 -> act -> drop -> norm -> fc2 -> drop`` MLPs (timm ``Mlp`` per expert).

    Weights are (E, in, hidden) and (E, hidden, out). :meth:`forward` runs all experts in one batched matmul over
    equal-size buffers; :meth:`forward_grouped` runs each expert on its own run of rows of an expert-sorted matrix
    (no padding; what :class:`~simoe_vision.layers.MoeMlp` uses). ``norm_layer`` (if any) is shared by the experts.
    """

    def __init__(
            self,
            num_experts: int,
            in_features: int,
            hidden_features: int,
            out_features: int,
            act_layer: Type[nn.Module] = nn.GELU,
            norm_layer: Type[nn.Module] | None = None,
            bias: Union[bool, Tuple[bool, bool]] = True,
            drop: Union[float, Tuple[float, float]] = 0.0,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        bias = to_2tuple(bias)
        drop = to_2tuple(drop)
        self.num_experts = num_experts
        self.fc1_weight = nn.Parameter(torch.empty(num_experts, in_features, hidden_features, **dd))
        self.fc1_bias = nn.Parameter(torch.zeros(num_experts, 1, hidden_features, **dd)) if bias[0] else None
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop[0])
        self.norm = norm_layer(hidden_features, **dd) if norm_layer is not None else nn.Identity()
        self.fc2_weight = nn.Parameter(torch.empty(num_experts, hidden_features, out_features, **dd))
        self.fc2_bias = nn.Parameter(torch.zeros(num_experts, 1, out_features, **dd)) if bias[1] else None
        self.drop2 = nn.Dropout(drop[1])
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """timm's ViT init for Linear layers: truncated normal (std 0.02) weights, zero biases."""
        for w in (self.fc1_weight, self.fc2_weight):
            nn.init.trunc_normal_(w, std=0.02)
        for b in (self.fc1_bias, self.fc2_bias):
            if b is not None:
                nn.init.zeros_(b)

    def extra_repr(self) -> str:
        e, i, h = self.fc1_weight.shape
        return f'num_experts={e}, in_features={i}, hidden_features={h}, out_features={self.fc2_weight.shape[-1]}'

    @staticmethod
    def _linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """x @ weight (+ bias), batched (3-D: bmm) or for one expert (2-D: mm)."""
        if x.dim() == 2:
            return torch.mm(x, weight) if bias is None else torch.addmm(bias, x, weight)
        return torch.bmm(x, weight) if bias is None else torch.baddbmm(bias, x, weight)

    def forward(self, x: Tensor) -> Tensor:
        """x (E, M, in) -> (E, M, out): expert e applied to its M buffered tokens."""
        x = self._linear(x, self.fc1_weight, self.fc1_bias)
        x = self.norm(self.drop1(self.act(x)))
        return self.drop2(self._linear(x, self.fc2_weight, self.fc2_bias))

    def compute_dtype(self, device: torch.device) -> torch.dtype:
        """The dtype the expert GEMMs run in: the autocast dtype where autocast is on, else the weights' dtype."""
        autocast = torch.is_autocast_enabled(device.type)
        return torch.get_autocast_dtype(device.type) if autocast else self.fc1_weight.dtype

    def forward_grouped(self, x: Tensor, counts: Sequence[int]) -> Tensor:
        """x (M, in) sorted by expert, the first ``counts[0]`` rows for expert 0 and so on -> (M, out).

        One GEMM per expert and layer on exactly its rows (:func:`grouped_linear`). Under autocast the matmuls run
        in the autocast dtype with autocast off: :func:`grouped_linear` casts the weights once per call and returns
        their gradients in fp32.
        """
        if len(counts) != self.num_experts or sum(counts) != x.shape[0]:
            raise ValueError(f'counts must give the rows of each of the {self.num_experts} experts and sum to '
                             f'{x.shape[0]}; got {list(counts)}')
        device, dtype = x.device.type, self.compute_dtype(x.device)
        with torch.autocast(device, enabled=False):
            h = grouped_linear(x.to(dtype), self.fc1_weight, self.fc1_bias, counts)
        h = self.norm(self.drop1(self.act(h)))
        with torch.autocast(device, enabled=False):
            return self.drop2(grouped_linear(h.to(dtype), self.fc2_weight, self.fc2_bias, counts))

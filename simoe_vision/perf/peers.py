"""Adapters for the MoE layers a user could pick instead of ours, built for the layer benchmark: each maps x (B, N, d)
to (B, N, d) with top-k routing over E experts, in train mode, so ``layer(x).backward(grad)`` is one train step.

* deepspeed: capacity factor or dropless. Capacity ``ceil(k S cf / E)`` (at least 4) over the whole batch (S = B N);
  dropless pads every expert's buffer to the busiest expert's count.
* st_moe: capacity factor only. Capacity ``int(N cf / E)`` per sample (at least 4, at most N), no factor k: we pass
  ``k cf`` so it gets our ``k N cf / E`` slots.
* torchtitan: dropless only; SwiGLU grouped-mm experts that compute in bf16 (:func:`_build_torchtitan`).

The peer packages are imported inside :func:`build_peer` / :func:`peer_status` only, so this module imports without
any of them (``pip install -r requirements-bench.txt`` adds them).
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import math
import os
import sys
import warnings
from functools import partial
from types import ModuleType
from typing import Callable

import torch
import torch.nn as nn
from torch import Tensor

from ..layers.moe_mlp import attach_aux_loss

__all__ = ['PEER_NAMES', 'PeerUnavailable', 'build_peer', 'peer_status']

PEER_NAMES: tuple[str, ...] = ('deepspeed', 'st_moe', 'torchtitan')
INSTALL_HINT = 'pip install -r requirements-bench.txt'
NOT_INSTALLED = f'not installed ({INSTALL_HINT})'
# DeepSpeed returns its balancing loss unweighted; a user weights it, commonly by Switch Transformer's 0.01.
DEEPSPEED_AUX_WEIGHT = 0.01

# peer -> (its distribution on PyPI, the modules build_peer imports, top-level package first)
_PACKAGES: dict[str, tuple[str, tuple[str, ...]]] = {
    'deepspeed': ('deepspeed', ('deepspeed', 'deepspeed.moe.layer')),
    'st_moe': ('st-moe-pytorch', ('st_moe_pytorch',)),
    'torchtitan': ('torchtitan', ('torchtitan', 'torchtitan.models.common.moe')),
}


class PeerUnavailable(RuntimeError):
    """A peer's package is missing (or fails to import); ``hint`` says how to install it."""

    def __init__(self, name: str, hint: str) -> None:
        super().__init__(f'{name}: {hint}')
        self.name = name
        self.hint = hint


def _import_peer(name: str) -> ModuleType:
    """Import the peer's modules (the top-level package first, so a ``sys.modules[pkg] = None`` block always
    shows) and return the last."""
    if (name == 'deepspeed' and 'DS_ACCELERATOR' not in os.environ and 'deepspeed' not in sys.modules
            and importlib.util.find_spec('deepspeed') is not None and not torch.cuda.is_available()):
        # Else its first import probes for accelerators and warns "Setting accelerator to CPU".
        os.environ['DS_ACCELERATOR'] = 'cpu'
    module = None
    with warnings.catch_warnings():
        # st-moe-pytorch's beartype decorators warn about typing.Tuple hints (PEP 585) when the module loads.
        warnings.simplefilter('ignore', DeprecationWarning)
        for module_name in _PACKAGES[name][1]:
            module = importlib.import_module(module_name)
    return module


def _version(name: str, module: ModuleType) -> str:
    try:
        return importlib.metadata.version(_PACKAGES[name][0])
    except importlib.metadata.PackageNotFoundError:
        return str(getattr(module, '__version__', 'unknown version'))


def peer_status() -> dict[str, str]:
    """Each peer's installed version, or how to install it (this imports the installed peers)."""
    status = {}
    for name in PEER_NAMES:
        try:
            status[name] = _version(name, _import_peer(name))
        except ImportError:
            status[name] = NOT_INSTALLED
        except Exception as exc:  # an installed package that breaks on import: say so instead of crashing the report
            status[name] = f'unusable ({type(exc).__name__}: {str(exc).splitlines()[0]}; {INSTALL_HINT})'
    return status


def _mlp(dim: int, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class _DeepSpeedMoe(nn.Module):
    """``deepspeed.moe.layer.MoE`` returning only its output; the weighted aux loss rides the output's backward
    (:func:`attach_aux_loss`, as ours does), so the step trains its gate as a user's loss would."""

    def __init__(self, moe: nn.Module, aux_weight: float) -> None:
        super().__init__()
        self.moe = moe
        self.aux_weight = aux_weight

    def forward(self, x: Tensor) -> Tensor:
        out, aux_loss, _ = self.moe(x)
        # DeepSpeed keeps the loss on the module; left in the graph, it makes copy.deepcopy of the layer fail.
        self.moe.deepspeed_moe.l_aux = aux_loss.detach()
        return attach_aux_loss(out, aux_loss, self.aux_weight)


def _build_deepspeed(layer: ModuleType, dim: int, hidden: int, num_experts: int, top_k: int,
                     capacity_factor: float | None) -> nn.Module:
    """DeepSpeed-MoE, ep_size 1: no process group needed (its collectives run only for an expert group of more than
    one rank, and none is set), so we start none and torch.distributed stays as the caller left it. Its experts
    are E deep copies of one GELU MLP (so they start equal, as for any user); top-2 takes the true second choice
    (``top2_2nd_expert_sampling=False``; the shipped default samples it with Gumbel noise)."""
    cf = 1.0 if capacity_factor is None else capacity_factor
    moe = layer.MoE(hidden_size=dim, expert=_mlp(dim, hidden), num_experts=num_experts, ep_size=1, k=top_k,
                    capacity_factor=cf, eval_capacity_factor=cf, drop_tokens=capacity_factor is not None,
                    top2_2nd_expert_sampling=False)
    return _DeepSpeedMoe(moe, DEEPSPEED_AUX_WEIGHT)


class _StMoe(nn.Module):
    """st-moe-pytorch's ``MoE`` returning only its output; its weighted aux losses (balance + router z) ride the
    output's backward."""

    def __init__(self, moe: nn.Module) -> None:
        super().__init__()
        self.moe = moe

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype in (torch.bfloat16, torch.float16) and not torch.is_autocast_enabled(x.device.type):
            # Its dispatch tensors are fp32 whatever the weights, and its einsum will not mix them with bf16 tokens:
            # with bf16 weights it only runs under autocast, as a user would have to run it.
            with torch.autocast(x.device.type, dtype=x.dtype):
                result = self.moe(x)
        else:
            result = self.moe(x)
        return attach_aux_loss(result.outputs, result.total_aux_loss)


def _build_st_moe(st_moe: ModuleType, dim: int, hidden: int, num_experts: int, top_k: int,
                  capacity_factor: float | None) -> nn.Module:
    """st-moe-pytorch with GELU MLP experts (its default expert is a GEGLU of width ``2/3 * mult * d``: the same
    FLOPs, another activation), plain top-k (``threshold=0``: the shipped 0.2 sends a token to its 2nd expert only
    with probability ``min(1, g2 / 0.2)``; the buffers, so the FLOPs, are the same)."""
    assert capacity_factor is not None
    cf = capacity_factor * top_k  # st-moe's slots are N cf / E per sample; ours k N cf / E
    experts = nn.ModuleList([_mlp(dim, hidden) for _ in range(num_experts)])
    moe = st_moe.MoE(dim, num_experts=num_experts, gating_top_n=top_k, capacity_factor_train=cf,
                     capacity_factor_eval=cf, threshold_train=0.0, threshold_eval=0.0, experts=experts)
    return _StMoe(moe)


def swiglu_hidden(hidden: int) -> int:
    """The SwiGLU width whose 3 matrices cost what a GELU MLP's 2 of width ``hidden`` do: 2/3 of it, rounded to a
    multiple of 8 (torch._grouped_mm wants 16-byte bf16 strides)."""
    return max(8, round(hidden * 2 / 3 / 8) * 8)


def _build_torchtitan(moe: ModuleType, dim: int, hidden: int, num_experts: int, top_k: int,
                      capacity_factor: float | None) -> nn.Module:
    """torchtitan's MoE as its MoE models ship it: softmax router with renormalised top-k (Qwen3's), grouped-mm
    SwiGLU experts of width :func:`swiglu_hidden` (FLOPs of our GELU MLP), the local (EP 1) dispatcher, no shared
    expert. Its experts always cast weights and tokens to bf16 for the grouped mm (so fp32 runs compute in bf16);
    its balancing is aux-loss-free (an optimizer hook updates an expert bias), so no aux loss joins the graph."""
    from torchtitan.models.common.linear import Linear
    from torchtitan.models.common.token_dispatcher import LocalTokenDispatcher

    width = swiglu_hidden(hidden)

    def uniform(fan_in: int) -> Callable[[Tensor], Tensor]:  # nn.Linear's default init, as our experts get
        bound = 1 / math.sqrt(fan_in)
        return partial(nn.init.uniform_, a=-bound, b=bound)

    config = moe.MoE.Config(
        num_experts=num_experts,
        router=moe.TokenChoiceTopKRouter.Config(
            num_experts=num_experts, gate=Linear.Config(in_features=dim, out_features=num_experts), top_k=top_k,
            score_func='softmax', route_norm=True),
        routed_experts=moe.RoutedExperts.Config(
            inner_experts=moe.GroupedExperts.Config(
                dim=dim, hidden_dim=width, num_experts=num_experts,
                param_init={'w1_EFD': uniform(dim), 'w3_EFD': uniform(dim), 'w2_EDF': uniform(width)}),
            token_dispatcher=LocalTokenDispatcher.Config(num_experts=num_experts, top_k=top_k)))
    layer = config.build()
    layer.init_states()  # the parameters are torch.empty until then
    # Its router asks for float32 autocast to keep the gate in fp32, which CPU autocast refuses (the gate then runs
    # in the input's dtype) with this warning on every call.
    warnings.filterwarnings('ignore', message='In CPU autocast, but the target dtype is not supported',
                            category=UserWarning, module=r'torchtitan\.')
    return layer


def _check_mode(name: str, dim: int, top_k: int, capacity_factor: float | None) -> None:
    """ValueError when the peer lacks the asked mode (checked before importing it)."""
    if name == 'st_moe' and capacity_factor is None:
        raise ValueError('st_moe has no dropless mode (its expert buffers have a fixed capacity per sample)')
    if name == 'st_moe' and top_k < 2:
        raise ValueError(f'st_moe routes every token to 2 or more experts, got top_k={top_k}')
    if name == 'torchtitan' and capacity_factor is not None:
        raise ValueError('torchtitan is dropless only (its capacity factor belongs to the GPU HybridEP dispatcher)')
    if name == 'torchtitan' and dim % 8:
        raise ValueError(f'torchtitan needs dim divisible by 8 (torch._grouped_mm wants 16-byte strides), got {dim}')


_BUILDERS = {'deepspeed': _build_deepspeed, 'st_moe': _build_st_moe, 'torchtitan': _build_torchtitan}


def build_peer(name: str, dim: int, hidden: int, num_experts: int, top_k: int,
               capacity_factor: float | None) -> torch.nn.Module:
    """The peer's MoE MLP (d -> hidden -> d experts, top-k of ``num_experts``) in train mode with fp32 weights, drawn
    from torch's global RNG (seed it first). ``capacity_factor=None`` asks for dropless routing.

    Raises ValueError for an unknown peer or a mode it lacks, PeerUnavailable when its package is missing.
    """
    if name not in _BUILDERS:
        raise ValueError(f'unknown peer {name!r}; the peers are {", ".join(PEER_NAMES)}')
    if capacity_factor is not None and not capacity_factor > 0:
        raise ValueError(f'capacity_factor must be > 0 or None (dropless), got {capacity_factor!r}')
    if not 1 <= top_k <= num_experts:
        raise ValueError(f'top_k must be in 1..num_experts={num_experts}, got {top_k}')
    _check_mode(name, dim, top_k, capacity_factor)
    try:
        module = _import_peer(name)
    except ImportError as exc:
        raise PeerUnavailable(name, f'{NOT_INSTALLED}: {exc}') from exc
    except Exception as exc:  # installed but broken on import
        raise PeerUnavailable(name, f'fails to import ({type(exc).__name__}: {exc}); {INSTALL_HINT}') from exc
    return _BUILDERS[name](module, dim, hidden, num_experts, top_k, capacity_factor).train()

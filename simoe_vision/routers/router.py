"""Routers: gate -> (graph propagation) -> noisy top-k selection -> auxiliary losses.

The three routers differ only in how the per-token gate distribution ``G = softmax(x W_g)`` becomes the routing
distribution ``P``: the softmax router uses ``P = G``; the graph routers propagate it over a token graph
(``P = A G`` for ``mix='probs'``, ``P = softmax(A h)`` for ``mix='logits'``, blended with G by ``alpha``).
Everything after ``P`` (selection, losses) is shared.

Noise placement (``noise=``, training only, std ``noise_std``): 'routing' (default) adds it to ``log P`` after the
graph; 'gate' adds it to each token's gate log-probabilities before the graph (the token draws its own noisy choice,
then its neighbours' choices are followed) and selects on the P computed from the noisy gates without further noise.
For the softmax router (``P = G``) the two placements are the same computation.

Which probabilities the auxiliary losses see (``loss_probs=``):

* 'selection' (default, the project's original numbers): importance CV^2 on the probabilities the top-k was taken
  from (noisy in training); the load term is also computed where no noise is applied (eval: clean scores as both).
* 'clean' (as V-MoE defines them): importance CV^2 on the *clean* P, the distribution the selection is based on
  before noise, so the balance pressure acts on what the router would choose, not on one noise draw; no load term
  where no noise is applied (eval).

The load loss always uses the noise actually applied: with 'routing' noise its clean/noisy scores are ``log P`` and
``log P + noise``; with 'gate' noise they are the gate log-probabilities ``log G`` and ``log G + noise`` (the V-MoE
load loss of each token's own noisy gate; it does not see the graph, whose effect on load the importance term on P
covers). The std is ``noise_std`` in both.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Dict, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .diagnostics import routing_diagnostics
from .graph import TokenGraph, TokenLayout, similarity_graph
from .losses import expert_counts, importance_loss, load_loss, switch_balance_loss, z_loss

__all__ = ['GRAPH_SOURCES', 'NOISE_PLACEMENTS', 'LOSS_PROBS', 'RoutingOutput', 'Router', 'SoftmaxRouter',
           'GraphRouter', 'SimilarityRouter', 'AttentionRouter', 'expert_softmax', 'select_top_k']

# What a router reads besides its tokens: nothing, a graph it builds from the tokens, or its block's attention.
GRAPH_SOURCES = ('none', 'tokens', 'attention')

_BALANCE_LOSSES = ('vmoe', 'importance', 'switch', 'none')
_DEFAULT_BALANCE_WEIGHT = {'vmoe': 0.005, 'importance': 0.005, 'switch': 0.01, 'none': 0.0}
NOISE_PLACEMENTS = ('routing', 'gate')
LOSS_PROBS = ('selection', 'clean')


@dataclass
class RoutingOutput:
    """What a router decided for T = B*N tokens routed to E experts, k per token."""

    indices: Tensor  # (T, k) long: the chosen experts, distinct per token, best first
    weights: Tensor  # (T, k) combine weights: the selection probabilities at the chosen experts
    probs: Tensor  # (T, E) the distribution the selection used (noisy in training)
    aux_loss: Tensor  # scalar, already weighted
    stats: Dict[str, Tensor] = field(default_factory=dict)  # detached, for logging and metrics


def expert_softmax(scores: Tensor) -> Tensor:
    """Softmax over the last (expert) dimension. Rows shorter than 16 are written out (``exp(s - max) / sum``):
    torch's CPU kernel does them element by element, ~5x slower (E = 8, 8320 tokens, fp32, 1 thread: 1.26 vs 0.24 ms
    a call; a router step takes three). From 16 experts on, and off the CPU, torch's own kernel is used."""
    if scores.shape[-1] >= 16 or scores.device.type != 'cpu':
        return scores.softmax(dim=-1)
    exp = (scores - scores.amax(dim=-1, keepdim=True)).exp()
    return exp / exp.sum(dim=-1, keepdim=True)


def log_probs(probs: Tensor) -> Tensor:
    """``log probs`` with zeros clamped to the smallest normal float (finite scores for top-k and the load loss)."""
    return probs.clamp_min(torch.finfo(probs.dtype).tiny).log()


def add_noise(scores: Tensor, noise_std: float, generator: torch.Generator | None = None) -> Tensor:
    """``scores + noise_std * N(0, 1)``, one draw per entry."""
    # randn_like, not randn(shape): a symbolic shape under torch.compile's dynamic shapes must stay symbolic
    noise = torch.randn_like(scores) if generator is None else torch.randn(
        scores.shape, generator=generator, device=scores.device, dtype=scores.dtype)
    return scores + noise_std * noise


def select_top_k(
        probs: Tensor,
        top_k: int,
        noise_std: float = 0.0,
        renormalize: bool = False,
        generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Noisy top-k over routing probabilities (T, E).

    The noise is added to ``log probs``; for the softmax router this is exactly V-MoE's noise on the gate logits.
    Returns ``(indices, weights, selection_probs, clean_scores, noisy_scores)``.
    """
    scores = log_probs(probs)
    if noise_std > 0:
        noisy = add_noise(scores, noise_std, generator)
        probs = expert_softmax(noisy)
    else:
        noisy = scores
    weights, indices = probs.topk(top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return indices, weights, probs, scores, noisy


class Router(nn.Module):
    """Softmax top-k router (V-MoE); the graph routers extend :meth:`routing_probs`.

    Args:
        dim: token width d.
        num_experts: E.
        top_k: experts per token, 1 <= k <= E.
        noise_std: std of the selection noise in training; ``None`` means V-MoE's ``1 / E``, 0 disables it.
        renormalize: make each token's k combine weights sum to 1 (V-MoE: off).
        balance_loss: 'vmoe' (importance + load), 'importance' (importance only), 'switch' (E * sum f_e P_e), or
            'none'.
        balance_weight: weight of each balance term; ``None`` means 0.005 for 'vmoe'/'importance', 0.01 for 'switch'.
        z_loss_weight: weight of the router z-loss on the gate logits (0 = off).
        noise: where the selection noise goes, 'routing' (on log P) or 'gate' (on log G, before the graph).
        loss_probs: which probabilities the V-MoE losses see, 'selection' or 'clean'; see the module docstring.

    ``graph`` (class attribute) declares the token graph the router reads (one of :data:`GRAPH_SOURCES`); the MoE
    blocks pass it accordingly.
    """

    graph: ClassVar[str] = 'none'

    def __init__(
            self,
            dim: int,
            num_experts: int,
            top_k: int = 2,
            noise_std: float | None = None,
            renormalize: bool = False,
            balance_loss: str = 'vmoe',
            balance_weight: float | None = None,
            z_loss_weight: float = 0.0,
            noise: str = 'routing',
            loss_probs: str = 'selection',
    ) -> None:
        super().__init__()
        if not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f'num_experts must be a positive integer, got {num_experts!r}')
        if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
            raise ValueError(f'top_k must be an integer in [1, num_experts={num_experts}], got {top_k!r}')
        if noise_std is not None and noise_std < 0:
            raise ValueError(f'noise_std must be >= 0, got {noise_std!r}')
        if balance_loss not in _BALANCE_LOSSES:
            raise ValueError(f'unknown balance_loss {balance_loss!r}; valid: {", ".join(_BALANCE_LOSSES)}')
        if noise not in NOISE_PLACEMENTS:
            raise ValueError(f'unknown noise placement {noise!r}; valid: {", ".join(NOISE_PLACEMENTS)}')
        if loss_probs not in LOSS_PROBS:
            raise ValueError(f'unknown loss_probs {loss_probs!r}; valid: {", ".join(LOSS_PROBS)}')
        self.dim = dim
        self.num_experts = num_experts
        self.top_k = top_k
        self.noise_std = 1.0 / num_experts if noise_std is None else float(noise_std)
        self.renormalize = renormalize
        self.balance_loss = balance_loss
        self.balance_weight = _DEFAULT_BALANCE_WEIGHT[balance_loss] if balance_weight is None else balance_weight
        self.z_loss_weight = z_loss_weight
        self.noise = noise
        self.loss_probs = loss_probs
        self.gate = nn.Linear(dim, num_experts, bias=False)
        nn.init.trunc_normal_(self.gate.weight, std=0.02)

    def extra_repr(self) -> str:
        return (f'num_experts={self.num_experts}, top_k={self.top_k}, noise_std={self.noise_std:g}, '
                f'balance_loss={self.balance_loss}, noise={self.noise}, loss_probs={self.loss_probs}')

    def routing_probs(
            self, logits: Tensor, x: Tensor, graph: TokenGraph | None, layout: TokenLayout) -> Tensor:
        """P (B, N, E) from the gate logits; the softmax router uses the gate alone."""
        if graph is not None:
            raise ValueError(f'{type(self).__name__} takes no graph; use the attention or similarity router')
        return expert_softmax(logits)

    def forward(
            self,
            x: Tensor,
            graph: Union[TokenGraph, Tensor, None] = None,
            layout: TokenLayout | None = None,
            *,
            with_losses: bool = True,
    ) -> RoutingOutput:
        """Route tokens x (B, N, d). ``graph``/``layout``: see :class:`AttentionRouter`/:class:`SimilarityRouter`.

        ``with_losses=False`` selects only: no aux losses and no stats (``aux_loss`` is zero, ``stats`` empty). For the
        static inference dispatch, which has no use for them and must not run their data-dependent ops.
        """
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f'router input must be (B, N, {self.dim}); got shape {tuple(x.shape)}')
        layout = layout or TokenLayout()
        if isinstance(graph, Tensor):
            graph = TokenGraph(probs=graph, layout=layout)
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float()
            logits = F.linear(x, self.gate.weight.float())
            noise_std = self.noise_std if self.training else 0.0
            probs = self.routing_probs(logits, x, graph, layout).flatten(0, 1)
            if self.noise == 'gate' and noise_std > 0:
                # The noisy gate log-probs stand in for the logits: softmax and A-mixing in logit space are invariant
                # to the per-token shift log G - h, so P(noisy) is the same function of h + noise.
                scores = log_probs(expert_softmax(logits))
                noisy = add_noise(scores, noise_std)
                noisy_probs = self.routing_probs(noisy, x, graph, layout).flatten(0, 1)
                indices, weights, sel_probs, _, _ = select_top_k(noisy_probs, self.top_k, 0.0, self.renormalize)
                scores, noisy = scores.flatten(0, 1), noisy.flatten(0, 1)
            else:
                indices, weights, sel_probs, scores, noisy = select_top_k(
                    probs, self.top_k, noise_std, self.renormalize)
            if not with_losses:
                return RoutingOutput(indices=indices, weights=weights, probs=sel_probs,
                                     aux_loss=logits.new_zeros(()))
            return self._finish(logits.flatten(0, 1), probs, indices, weights, sel_probs, scores, noisy, noise_std)

    def _finish(self, logits: Tensor, probs: Tensor, indices: Tensor, weights: Tensor, sel_probs: Tensor,
                scores: Tensor, noisy: Tensor, noise_std: float) -> RoutingOutput:
        """Aux losses and stats. ``probs``: clean P; ``sel_probs``: what the top-k was taken from; ``scores`` /
        ``noisy``: the clean and noisy scores the applied noise (std ``noise_std``, 0 in eval) acted on."""
        zero = logits.new_zeros(())
        losses = {'importance_loss': zero, 'load_loss': zero, 'switch_loss': zero, 'z_loss': zero}
        clean = self.loss_probs == 'clean'
        if self.balance_loss in ('vmoe', 'importance'):
            losses['importance_loss'] = importance_loss(probs if clean else sel_probs)
        if self.balance_loss == 'vmoe' and (noise_std > 0 if clean else self.noise_std > 0):
            losses['load_loss'] = load_loss(scores, noisy, self.noise_std, self.top_k)
        elif self.balance_loss == 'switch':
            losses['switch_loss'] = switch_balance_loss(sel_probs, indices)
        if self.z_loss_weight > 0:
            losses['z_loss'] = z_loss(logits)
        aux = (self.balance_weight * (losses['importance_loss'] + losses['load_loss'] + losses['switch_loss'])
               + self.z_loss_weight * losses['z_loss'])
        with torch.no_grad():
            load = expert_counts(indices, self.num_experts).float() / indices.numel()
            diagnostics = routing_diagnostics(expert_softmax(logits), probs)
        stats = {name: value.detach() for name, value in losses.items()}
        stats.update(load=load, importance=sel_probs.detach().mean(dim=0), **diagnostics)
        return RoutingOutput(indices=indices, weights=weights, probs=sel_probs, aux_loss=aux, stats=stats)


SoftmaxRouter = Router


class GraphRouter(Router):
    """A router whose P propagates the gate over a token graph; see the module docstring.

    Args (besides :class:`Router`'s):
        mix: 'probs' (``P = A G``, the marginal of "pick a neighbour, follow its choice") or 'logits'
            (``P = softmax(A h)``).
        alpha: blend with the token's own gate, in the space ``mix`` names: ``(1 - alpha) G + alpha A G`` or
            ``softmax((1 - alpha) h + alpha A h)``; 0 gives the softmax router, 1 (default) the pure graph router.
        detach_graph: stop gradients flowing into the graph (the similarity features or the attention q/k).
        fused: propagate through q/k with scaled_dot_product_attention (O(N E) memory) instead of the dense graph.
    """

    def __init__(self, dim: int, num_experts: int, top_k: int = 2, *, mix: str = 'probs', alpha: float = 1.0,
                 detach_graph: bool = False, fused: bool = True, **kwargs) -> None:
        super().__init__(dim, num_experts, top_k, **kwargs)
        if mix not in ('probs', 'logits'):
            raise ValueError(f"mix must be 'probs' or 'logits', got {mix!r}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f'alpha must be in [0, 1], got {alpha!r}')
        self.mix = mix
        self.alpha = alpha
        self.detach_graph = detach_graph
        self.fused = fused

    def extra_repr(self) -> str:
        return f'{super().extra_repr()}, mix={self.mix}, alpha={self.alpha:g}, detach_graph={self.detach_graph}'

    def build_graph(self, x: Tensor, graph: TokenGraph | None, layout: TokenLayout) -> TokenGraph:
        raise NotImplementedError

    def routing_probs(
            self, logits: Tensor, x: Tensor, graph: TokenGraph | None, layout: TokenLayout) -> Tensor:
        token_graph = self.build_graph(x, graph, layout)
        if self.detach_graph:
            token_graph = token_graph.detach()
        a = self.alpha
        if self.mix == 'probs':
            gates = expert_softmax(logits)
            return (1.0 - a) * gates + a * token_graph.propagate(gates, fused=self.fused)
        return expert_softmax((1.0 - a) * logits + a * token_graph.propagate(logits, fused=self.fused))


class SimilarityRouter(GraphRouter):
    """Similarity-aware router: ``A = S = row_softmax(sim(x_i, x_j) / tau)`` over the tokens of a group.

    Args (besides :class:`GraphRouter`'s):
        tau: temperature, > 0 (default 0.1).
        learnable_tau: learn tau (as log tau), initialised at ``tau``.
        similarity: 'cosine' (default) or 'dot' (scaled dot product, ``x_i . x_j / sqrt(d)``).
        proj_dim: if set, a learned low-rank projection d -> proj_dim applied before the similarity.

    ``layout`` in forward restricts the graph to groups of tokens (e.g. Swin windows); default: all of an image.
    """

    graph: ClassVar[str] = 'tokens'

    def __init__(self, dim: int, num_experts: int, top_k: int = 2, *, tau: float = 0.1, learnable_tau: bool = False,
                 similarity: str = 'cosine', proj_dim: int | None = None, **kwargs) -> None:
        super().__init__(dim, num_experts, top_k, **kwargs)
        if not tau > 0:
            raise ValueError(f'tau must be > 0, got {tau!r}')
        if similarity not in ('cosine', 'dot'):
            raise ValueError(f"similarity must be 'cosine' or 'dot', got {similarity!r}")
        if proj_dim is not None and (not isinstance(proj_dim, int) or proj_dim < 1):
            raise ValueError(f'proj_dim must be a positive integer or None, got {proj_dim!r}')
        self.similarity = similarity
        self.log_tau = nn.Parameter(torch.tensor(math.log(tau))) if learnable_tau else None
        self.tau = tau
        self.proj = None
        if proj_dim is not None:
            self.proj = nn.Linear(dim, proj_dim, bias=False)
            nn.init.trunc_normal_(self.proj.weight, std=dim ** -0.5)

    def extra_repr(self) -> str:
        return f'{super().extra_repr()}, tau={self.tau:g}, learnable_tau={self.log_tau is not None}'

    def build_graph(self, x: Tensor, graph: TokenGraph | None, layout: TokenLayout) -> TokenGraph:
        if graph is not None:
            raise ValueError('the similarity router builds its graph from the tokens; pass layout=, not graph=')
        if self.proj is not None:
            x = F.linear(x, self.proj.weight.float())
        tau = self.log_tau.float().exp() if self.log_tau is not None else self.tau
        return similarity_graph(x, tau, self.similarity, layout)


class AttentionRouter(GraphRouter):
    """Attention-aware router: ``A`` = the head-mean of the same block's attention probabilities.

    ``graph`` must be given: a :class:`TokenGraph` (dense probs or the block's q/k/scale/bias) or a dense tensor of
    row-stochastic attention probabilities, (B, H, N, N) or (B, N, N), in the coordinates of ``layout``.

    Args (besides :class:`GraphRouter`'s):
        graph_temperature: divides the attention logits before the head mean (``q k^T scale / T``); < 1 sharpens
            the graph. 1 (default) uses the block's attention as it is.
    """

    graph: ClassVar[str] = 'attention'

    def __init__(self, dim: int, num_experts: int, top_k: int = 2, *, graph_temperature: float = 1.0,
                 **kwargs) -> None:
        super().__init__(dim, num_experts, top_k, **kwargs)
        if not graph_temperature > 0:
            raise ValueError(f'graph_temperature must be > 0, got {graph_temperature!r}')
        self.graph_temperature = float(graph_temperature)

    def extra_repr(self) -> str:
        return f'{super().extra_repr()}, graph_temperature={self.graph_temperature:g}'

    def build_graph(self, x: Tensor, graph: TokenGraph | None, layout: TokenLayout) -> TokenGraph:
        if graph is None:
            raise ValueError(
                "the attention router needs the block's attention graph (graph=...); it works inside a MoE "
                'block (simoe_vision models) that passes its attention, or choose router="similarity"')
        return graph.with_temperature(self.graph_temperature)

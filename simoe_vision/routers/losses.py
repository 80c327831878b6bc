"""Auxiliary router losses as pure functions over flattened tokens.

Conventions: ``probs`` and ``scores`` are (T, E) for T tokens and E experts. Coefficients of variation use the
*population* variance (divide by E, as google-research/vmoe's ``jnp.std``), not the unbiased one Tutel uses.

What the routers feed them (``Router(loss_probs=..., noise=...)``; P is the routing distribution, G the token's gate):

* importance: ``loss_probs='clean'`` (V-MoE) gives the clean P, the distribution the selection is based on (for the
  graph routers ``A G`` / ``softmax(A h)``, not G: the balance that matters is that of what is routed);
  ``'selection'`` (default, the original numbers) gives the probabilities the top-k was taken from (noisy in training).
* load: the clean and noisy scores of the noise actually applied, std ``noise_std``: ``log P`` and ``log P + noise``
  with ``noise='routing'``; ``log G`` and ``log G + noise`` with ``noise='gate'`` (the noise acts on the gates there;
  the expected load of the graph-mixed choice has no closed form, and the importance term on P covers the graph).
  With ``loss_probs='clean'`` there is no load term where no noise is applied (eval), as in V-MoE.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ['expert_counts', 'cv_squared', 'importance_loss', 'load_loss', 'switch_balance_loss', 'z_loss']


def expert_counts(indices: Tensor, num_experts: int) -> Tensor:
    """How many of ``indices`` (any shape, values in [0, E)) name each expert, (E,) long.

    ``bincount`` with a fixed length: its output shape does not depend on the data, so torch.compile and
    torch.export trace it without a graph break.
    """
    flat = indices.reshape(-1)
    return flat.new_zeros(num_experts).index_add_(0, flat, torch.ones_like(flat))


def cv_squared(x: Tensor, eps: float = 1e-10) -> Tensor:
    """Squared coefficient of variation of a 1-D tensor, population variance."""
    return x.var(unbiased=False) / (x.mean() ** 2 + eps)


def _normal_cdf(x: Tensor) -> Tensor:
    """The standard normal CDF, bit for bit ``torch.distributions.Normal(0, 1).cdf`` (``torch.special.ndtr`` differs in
    the last bits) but without its argument validation: NaN scores of a diverging run reach the loss, where the
    training loop reports them, instead of failing here."""
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2)))


def importance_loss(probs: Tensor) -> Tensor:
    """V-MoE importance loss: CV^2 of each expert's summed routing probability over the tokens."""
    return cv_squared(probs.sum(dim=0))


def load_loss(clean_scores: Tensor, noisy_scores: Tensor, noise_std: float, top_k: int) -> Tensor:
    """V-MoE load loss: CV^2 of each expert's expected load under the selection noise.

    For token t and expert e, ``P(e selected) = 1 - Phi((threshold_t - clean_scores[t, e]) / noise_std)`` where
    ``threshold_t`` is the k-th largest *noisy* score of token t (the bar e had to clear); its mean over tokens is the
    smooth expected load. ``noise_std`` must be positive.
    """
    if noise_std <= 0:
        raise ValueError(f'load_loss needs a positive noise_std, got {noise_std}')
    threshold = noisy_scores.topk(top_k, dim=-1).values[:, -1:]
    p_selected = 1.0 - _normal_cdf((threshold - clean_scores) / noise_std)
    return cv_squared(p_selected.mean(dim=0))


def switch_balance_loss(probs: Tensor, indices: Tensor) -> Tensor:
    """Switch/GShard balance loss ``E * sum_e f_e * mean_t P[t, e]``; f_e = share of the T*k assignments to e.

    Equals 1 under perfectly uniform routing and grows with imbalance.
    """
    num_experts = probs.shape[-1]
    counts = expert_counts(indices, num_experts).to(probs.dtype)
    fraction = counts / indices.numel()
    return num_experts * (fraction * probs.mean(dim=0)).sum()


def z_loss(logits: Tensor) -> Tensor:
    """ST-MoE router z-loss: mean over tokens of ``logsumexp(logits)^2``; keeps gate logits small."""
    return torch.logsumexp(logits, dim=-1).square().mean()

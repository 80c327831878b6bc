"""Auxiliary losses against values worked out by hand."""
import math

import pytest
import torch

from simoe_vision.routers import cv_squared, importance_loss, load_loss, switch_balance_loss, z_loss

# Gate matrix of 4 tokens x 3 experts used throughout (rows sum to 1).
P = torch.tensor([[.5, .4, .1], [.3, .3, .4], [.1, .2, .7], [.8, .2, .0]])


def test_cv_squared_uses_population_variance():
    # x = [1, 3]: mean 2, population variance 1 (unbiased would be 2) -> CV^2 = 1 / 4.
    assert cv_squared(torch.tensor([1.0, 3.0])).item() == pytest.approx(0.25)


def test_importance_loss_hand_worked():
    # importance = column sums = [1.7, 1.1, 1.2], mean 4/3; deviations 11/30, -7/30, -4/30
    # population var = (121 + 49 + 16) / 900 / 3 = 186 / 2700; CV^2 = (186/2700) / (16/9) = 0.03875.
    assert importance_loss(P).item() == pytest.approx(0.03875, rel=1e-5)


def test_switch_loss_hand_worked_top1():
    # top-1 experts [0, 2, 2, 0] -> f = [1/2, 0, 1/2]; mean P = [.425, .275, .3]
    # loss = 3 * (.5 * .425 + .5 * .3) = 1.0875.
    indices = P.argmax(dim=1, keepdim=True)
    assert indices.flatten().tolist() == [0, 2, 2, 0]
    assert switch_balance_loss(P, indices).item() == pytest.approx(1.0875, rel=1e-6)


def test_switch_loss_hand_worked_top2():
    # assignments [0,1],[2,0],[2,1],[0,1] -> counts [3, 3, 2] / 8; loss = 3 * (3/8*.425 + 3/8*.275 + 2/8*.3) = 1.0125.
    indices = torch.tensor([[0, 1], [2, 0], [2, 1], [0, 1]])
    assert switch_balance_loss(P, indices).item() == pytest.approx(1.0125, rel=1e-6)


def test_switch_loss_is_one_when_uniform():
    probs = torch.full((6, 3), 1 / 3)
    indices = torch.tensor([[0], [1], [2], [0], [1], [2]])
    assert switch_balance_loss(probs, indices).item() == pytest.approx(1.0)


def test_z_loss_hand_worked():
    # logsumexp([0, 0]) = ln 2, logsumexp([ln 3, 0]) = ln 4 = 2 ln 2 -> mean of squares = 2.5 (ln 2)^2.
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    assert z_loss(logits).item() == pytest.approx(2.5 * math.log(2.0) ** 2, rel=1e-6)


def _phi(z):
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def test_load_loss_hand_worked():
    # thresholds (top-1 of the noisy scores): token 0 -> 0.5, token 1 -> 1.0; noise std 1.
    # P(selected) = 1 - Phi(threshold - clean): token 0 -> [1-Phi(.5), 1-Phi(.5)], token 1 -> [1-Phi(0), 1-Phi(1)].
    clean = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    noisy = torch.tensor([[0.5, 0.0], [1.0, 0.0]])
    p0 = ((1 - _phi(.5)) + (1 - _phi(0.0))) / 2
    p1 = ((1 - _phi(.5)) + (1 - _phi(1.0))) / 2
    mean = (p0 + p1) / 2
    expected = ((p0 - mean) ** 2 + (p1 - mean) ** 2) / 2 / mean ** 2
    assert load_loss(clean, noisy, 1.0, 1).item() == pytest.approx(expected, rel=1e-5)


def test_load_loss_needs_noise():
    with pytest.raises(ValueError, match='noise_std'):
        load_loss(P, P, 0.0, 1)

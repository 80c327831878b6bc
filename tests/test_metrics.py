"""Routing metrics against hand-made top-1 index tensors, and the hook recorder on a real model."""
import math

import pytest
import timm
import torch

import simoe_vision  # noqa: F401
from simoe_vision.engine.runner import epoch_row
from simoe_vision.metrics import (
    FluctuationTracker,
    RoutingRecorder,
    changed_share,
    fluctuation_curve,
    last_fluctuation_epoch,
    load_cv,
    routing_agreement,
    routing_entropy,
    window_mean,
)
from simoe_vision.routers.diagnostics import DIAGNOSTICS, routing_diagnostics, top1_flip_share, top1_margin

# 4 probe tokens over 4 epochs. Changes: epoch 0->1 tokens 1, 3 (2/4); 1->2 token 3 (1/4); 2->3 none (0/4).
HISTORY = torch.tensor([[0, 1, 2, 3],
                        [0, 2, 2, 1],
                        [0, 2, 2, 0],
                        [0, 2, 2, 0]])


def test_fluctuation_curve_hand_made():
    assert fluctuation_curve(HISTORY).tolist() == [0.5, 0.25, 0.0]
    assert changed_share(HISTORY[0], HISTORY[1]) == 0.5


def test_last_fluctuation_epoch_hand_made():
    # token 0 never changed -> 0; token 1 last changed at step 1; token 2 never; token 3 last at step 2.
    assert last_fluctuation_epoch(HISTORY).tolist() == [0, 1, 0, 2]


def test_agreement_is_one_on_identical_routing():
    assert routing_agreement(HISTORY[2], HISTORY[3]) == 1.0
    assert routing_agreement(HISTORY[0], HISTORY[1]) == 0.5


def test_window_mean_hand_worked():
    # epochs 2..5 of 10 end at .2 .3 .4 .5 of training; (.3, .5] keeps epochs 4 and 5: (3 + 4) / 2 = 3.5 (epoch 3's
    # change happened between .2 and .3, before the window)
    assert window_mean([1, 2, 3, 4], [2, 3, 4, 5], 10, 0.3, 0.5) == 3.5
    # 4 epochs, curve at epochs 2, 3, 4 (ends at .5, .75, 1): 40-90 % -> (.3 + .2) / 2; last 30 % -> (.2 + .1) / 2
    assert window_mean([0.3, 0.2, 0.1], [2, 3, 4], 4, 0.4, 0.9) == pytest.approx(0.25)
    assert window_mean([0.3, 0.2, 0.1], [2, 3, 4], 4, 0.7, 1.0) == pytest.approx(0.15)
    # 10 epochs, value e / 100 at epoch e: 40-90 % -> epochs 5..9 -> 0.07; last 30 % -> 8, 9, 10 -> 0.09
    epochs = list(range(2, 11))
    assert window_mean([e / 100 for e in epochs], epochs, 10, 0.4, 0.9) == pytest.approx(0.07)
    assert window_mean([e / 100 for e in epochs], epochs, 10, 0.7, 1.0) == pytest.approx(0.09)
    assert window_mean([0.5, None], [2, 3], 4, 0.4, 0.9) == 0.5  # a missing value is skipped
    assert window_mean([0.5], [2], 2, 0.4, 0.9) is None  # the only value ends at 1.0, outside the window


def test_load_cv_and_entropy():
    assert load_cv(torch.tensor([0.25, 0.25, 0.25, 0.25])) == 0.0
    # loads [.5, .5, 0, 0]: mean .25, population std .25 -> CV 1.
    assert load_cv(torch.tensor([0.5, 0.5, 0.0, 0.0])) == pytest.approx(1.0)
    # uniform over 4 experts: entropy ln 4; one-hot: 0.
    assert routing_entropy(torch.tensor([[0.25] * 4, [1.0, 0, 0, 0]])) == pytest.approx(math.log(4) / 2)


def test_tracker_curves_and_state_round_trip():
    tracker = FluctuationTracker()
    assert tracker.update(1, {'a': HISTORY[0].view(2, 2), 'b': HISTORY[0].view(2, 2)}) == {}
    latest = tracker.update(2, {'a': HISTORY[1].view(2, 2), 'b': HISTORY[0].view(2, 2)})
    assert latest == {'a': 0.5, 'b': 0.0, 'mean': 0.25}
    tracker.update(3, {'a': HISTORY[2].view(2, 2), 'b': HISTORY[0].view(2, 2)})
    assert tracker.curves() == {'a': [0.5, 0.25], 'b': [0.0, 0.0], 'mean': [0.25, 0.125]}
    # layer a: tokens last changed at epochs [1 (never), 2, 1 (never), 3]; layer b never -> epoch 1.
    assert tracker.last_fluctuation_epochs().tolist() == [1, 2, 1, 3, 1, 1, 1, 1]
    restored = FluctuationTracker()
    restored.load_state_dict(tracker.state_dict())
    assert restored.curves() == tracker.curves() and restored.epochs == [1, 2, 3]
    with pytest.raises(ValueError, match='MoE layers changed between epochs'):
        tracker.update(4, {'a': HISTORY[0].view(2, 2)})


def test_recorder_collects_with_hooks_and_removes_them():
    model = timm.create_model('vmoe_test', router='similarity', num_classes=3).eval()
    x = torch.randn(5, 3, 32, 32)
    with RoutingRecorder(model) as rec:
        model(x[:2])
        model(x[2:])
    top1 = rec.top1()
    assert list(top1) == ['blocks.1.mlp'] and top1['blocks.1.mlp'].shape == (5, 17)
    with torch.no_grad():
        model(x)
    torch.testing.assert_close(top1['blocks.1.mlp'].long().flatten(), model.blocks[1].mlp.last_routing.indices[:, 0])
    summary = rec.summary()['blocks.1.mlp']
    routing = model.blocks[1].mlp.last_routing  # the same 5 images in one batch (eval routing is per image)
    expected_load = torch.bincount(routing.indices.flatten(), minlength=4).float() / routing.indices.numel()
    torch.testing.assert_close(torch.tensor(summary['load']), expected_load)
    assert summary['load_cv'] == pytest.approx(load_cv(expected_load))
    assert summary['dropped_fraction'] == 0.0  # eval capacity ceil(2 * 17 * 2.0 / 4) = 17 slots: nothing can drop
    assert summary['entropy'] == pytest.approx(routing_entropy(routing.probs), rel=1e-5)
    assert all(not layer._forward_hooks for layer in rec.layers.values())
    with pytest.raises(ValueError, match='has no MoE layers'):
        RoutingRecorder(torch.nn.Linear(2, 2))


def test_routing_diagnostics_hand_worked():
    """Token 0: G = (1/2, 1/2, 0), P = (0.7, 0.2, 0.1); token 1: G = (0, 1, 0), P = (0.5, 0.5, 0) (ties: first)."""
    gates = torch.tensor([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0]])
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.5, 0.0]])
    d = routing_diagnostics(gates, probs)
    h_p0 = -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1))
    assert d['gate_entropy'].item() == pytest.approx((math.log(2) + 0.0) / 2)
    assert d['entropy'].item() == pytest.approx((h_p0 + math.log(2)) / 2)
    assert d['margin'].item() == pytest.approx((0.5 + 0.0) / 2)
    # top-1: G -> (0, 1), P -> (0, 0): token 1 flips
    assert d['flip'].item() == pytest.approx(0.5)
    assert top1_margin(torch.tensor([[0.1, 0.6, 0.3]])).item() == pytest.approx(0.3)
    assert top1_flip_share(gates, gates).item() == 0.0
    assert routing_diagnostics(torch.ones(2, 1), torch.ones(2, 1))['margin'].item() == 1.0


def test_recorder_and_epoch_row_carry_the_diagnostics():
    model = timm.create_model('vmoe_test', router='attention', num_classes=3).eval()
    with RoutingRecorder(model) as rec, torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    layer = rec.summary()['blocks.1.mlp']
    stats = model.blocks[1].mlp.last_routing.stats
    for key in DIAGNOSTICS:
        assert layer[key] == pytest.approx(stats[key].item(), rel=1e-6)
    train = {'routing': rec.totals(), 'train_loss': 1.0, 'aux_loss': 0.0, 'lr': 1e-3, 'images': 2, 'skipped': 0}
    val = {'top1': 50.0, 'top5': 100.0, 'loss': 1.0, 'images': 2, 'skipped': 0}
    row = epoch_row(1, train, val, {}, 1.0)
    for key in DIAGNOSTICS:
        assert row[key] == pytest.approx(layer[key]) and row[f'{key}.blocks.1.mlp'] == layer[key]

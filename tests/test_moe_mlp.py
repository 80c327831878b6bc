"""MoE MLP: capacity dispatch, equivalence with timm's Mlp, gradients, the aux-loss attachment, precision."""
import pytest
import timm
import torch
from timm.layers import Mlp

import simoe_vision  # noqa: F401
from simoe_vision.layers import MoeMlp, assign_slots, attach_aux_loss, expert_capacity
from simoe_vision.routers import TokenGraph

# 4 tokens, 2 experts, top-2; capacity 2. Choices: t0 [0, 1], t1 [0, 1], t2 [1, 0], t3 [0, 1].
CHOICES = torch.tensor([[[0, 1], [0, 1], [1, 0], [0, 1]]])


def test_capacity_formula():
    assert expert_capacity(65, 8, 2, 1.05) == 18  # ceil(2 * 65 * 1.05 / 8) = ceil(17.06)
    assert expert_capacity(4, 8, 1, 0.1) == 1


def test_assign_slots_first_choices_first():
    # First choices in token order: t0->e0 slot 0, t1->e0 slot 1, t2->e1 slot 0, t3->e0 slot 2 (dropped).
    # Then second choices: t0->e1 slot 1, t1->e1 slot 2 (dropped), t2->e0 slot 3 (dropped), t3->e1 slot 3 (dropped).
    positions, keep = assign_slots(CHOICES, 2, capacity=2)
    assert positions[0].tolist() == [[0, 1], [1, 2], [0, 3], [2, 3]]
    assert keep[0].tolist() == [[True, True], [True, False], [True, False], [False, False]]


def test_assign_slots_batch_prioritized():
    # Priorities 0.1, 0.2, 0.3, 0.9 -> order t3, t2, t1, t0.
    # First choices: t3->e0 0, t2->e1 0, t1->e0 1, t0->e0 2 (drop);
    # second choices: t3->e1 1, t2->e0 3 (drop), t1->e1 2 (drop), t0->e1 3 (drop). The low-priority t0 loses both.
    positions, keep = assign_slots(CHOICES, 2, capacity=2, priority=torch.tensor([[0.1, 0.2, 0.3, 0.9]]))
    assert positions[0].tolist() == [[2, 3], [1, 2], [0, 3], [0, 1]]
    assert keep[0].tolist() == [[False, False], [True, False], [True, False], [True, True]]


def test_assign_slots_dropless_and_groups_are_independent():
    positions, keep = assign_slots(CHOICES.repeat(3, 1, 1), 2, capacity=None)
    assert keep.all()
    assert (positions == positions[:1]).all()


def _moe(**kwargs):
    defaults = dict(num_experts=4, top_k=2, router='softmax')
    defaults.update(kwargs)
    return MoeMlp(8, 16, **defaults)


def test_dropless_equals_huge_capacity():
    x = torch.randn(3, 10, 8)
    dropless = _moe(eval_capacity_factor='dropless').eval()
    huge = _moe(eval_capacity_factor=100.0).eval()
    huge.load_state_dict(dropless.state_dict())
    torch.testing.assert_close(dropless(x), huge(x))
    assert dropless.last_routing.stats['dropped_fraction'] == 0


def test_dropped_tokens_get_zero_output():
    # Every token prefers expert 0 (gate bias through a constant feature); capacity 1 per expert, top-1:
    # in each image only the first token is served, the rest drop and output exactly zero.
    moe = _moe(top_k=1, eval_capacity_factor=0.1, router_kwargs={'noise_std': 0.0}).eval()
    moe.router.gate.weight.data.zero_()
    moe.router.gate.weight.data[0, 0] = 10.0
    x = torch.randn(2, 5, 8)
    x[..., 0] = 1.0
    out = moe(x)
    assert out[:, 0].abs().sum() > 0
    assert torch.equal(out[:, 1:], torch.zeros_like(out[:, 1:]))
    assert moe.last_routing.stats['dropped_fraction'].item() == pytest.approx(0.8)


def test_capacity_group_image_makes_samples_independent_of_batch():
    moe = _moe(eval_capacity_factor=1.0).eval()
    x = torch.randn(4, 10, 8)
    torch.testing.assert_close(moe(x)[1:2], moe(x[1:2]))


def test_single_expert_equals_timm_mlp():
    mlp = Mlp(8, 16, 8)
    moe = MoeMlp(8, 16, 8, num_experts=1, top_k=1, capacity_factor='dropless', eval_capacity_factor='dropless')
    moe.experts.fc1_weight.data[0] = mlp.fc1.weight.T
    moe.experts.fc1_bias.data[0, 0] = mlp.fc1.bias
    moe.experts.fc2_weight.data[0] = mlp.fc2.weight.T
    moe.experts.fc2_bias.data[0, 0] = mlp.fc2.bias
    x = torch.randn(3, 5, 8)
    for mode in (True, False):
        torch.testing.assert_close(moe.train(mode)(x), mlp(x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize('router', ['softmax', 'similarity', 'attention'])
def test_gradients_reach_gate_experts_and_graph(router):
    moe = _moe(router=router, capacity_factor='dropless')
    x = torch.randn(2, 6, 8, requires_grad=True)
    q = torch.randn(2, 2, 6, 4, requires_grad=True)
    graph = TokenGraph(q=q, k=q, scale=0.5) if router == 'attention' else None
    moe(x, graph).square().sum().backward()
    assert moe.router.gate.weight.grad.abs().sum() > 0
    used = moe.last_routing.indices.unique()
    for p in (moe.experts.fc1_weight, moe.experts.fc2_weight):
        assert (p.grad[used].flatten(1).abs().sum(1) > 0).all()
    assert x.grad.abs().sum() > 0
    if router == 'attention':
        assert q.grad.abs().sum() > 0


@pytest.mark.parametrize('router', ['softmax', 'similarity'])
@pytest.mark.parametrize('scale', [1.0, 0.5])
def test_attached_aux_loss_gradient_is_task_plus_scaled_aux(router, scale):
    """The gradient a loop gets from its task loss alone = task gradient + scale x aux-loss gradient."""
    x, target = torch.randn(2, 6, 8), torch.randn(2, 6, 8)
    attached = _moe(router=router, aux_loss_scale=scale)
    task_only = _moe(router=router, router_kwargs=dict(balance_loss='none'))
    task_only.load_state_dict(attached.state_dict())
    torch.manual_seed(5)
    (attached(x) - target).square().mean().backward()
    torch.manual_seed(5)
    (task_only(x) - target).square().mean().backward()
    aux = type(attached.router)(8, 4, top_k=2)  # the same router alone: its aux loss and nothing else
    aux.load_state_dict(attached.router.state_dict())
    torch.manual_seed(5)
    aux(x).aux_loss.backward()
    assert attached.aux_loss().item() > 0 and not attached.aux_loss().requires_grad
    torch.testing.assert_close(attached.router.gate.weight.grad,
                               task_only.router.gate.weight.grad + scale * aux.gate.weight.grad)
    torch.testing.assert_close(attached.experts.fc1_weight.grad, task_only.experts.fc1_weight.grad)


def test_set_aux_loss_scale_changes_the_aux_gradient_between_steps():
    model = timm.create_model('vmoe_test', router='similarity')
    x = torch.randn(2, 3, 32, 32)
    grads = []
    for scale in (1.0, 0.25):
        model.set_aux_loss_scale(scale)
        model.zero_grad()
        torch.manual_seed(0)
        (model(x) * 0).sum().backward()  # the task loss contributes nothing: only the aux loss moves the gate
        grads.append(model.blocks[1].mlp.router.gate.weight.grad.clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0] * 0.25)
    assert model.moe_config.aux_loss_scale == 0.25


def test_no_aux_gradient_in_eval_mode():
    """Input gradients in eval mode (adversarial attacks, saliency) carry the task loss only."""
    moe = _moe(router='similarity').eval()
    no_balance = _moe(router='similarity', router_kwargs=dict(balance_loss='none')).eval()
    no_balance.load_state_dict(moe.state_dict())
    x = torch.randn(2, 6, 8)
    grads = []
    for layer in (moe, no_balance):
        xi = x.clone().requires_grad_()
        layer(xi).sum().backward()
        grads.append(xi.grad)
    assert moe.aux_loss() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


def test_attach_is_identity_without_grad():
    out = torch.randn(3)
    with torch.no_grad():
        assert attach_aux_loss(out, torch.tensor(1.0, requires_grad=True)) is out
    assert attach_aux_loss(out, torch.tensor(1.0)) is out


def test_bf16_autocast_keeps_routing_fp32():
    moe = _moe(router='similarity')
    x = torch.randn(2, 6, 8)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = moe(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert moe.last_routing.probs.dtype == torch.float32


@pytest.mark.parametrize('kwargs, message', [
    (dict(capacity_factor=0.0), "capacity_factor must be a number > 0 or 'dropless'"),
    (dict(eval_capacity_factor=-1.0), "eval_capacity_factor must be a number > 0 or 'dropless'"),
    (dict(capacity_group='window'), 'capacity_group must be one of image, batch'),
    (dict(top_k=5), r'top_k must be an integer in \[1, num_experts=4\], got 5'),
    (dict(router='dense'), "unknown router 'dense'"),
])
def test_layer_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _moe(**kwargs)

"""Router contracts, the identities of DESIGN.md section 2, hand-worked graph mixing, and error messages."""
import math

import pytest
import torch

from simoe_vision.routers import ROUTERS, TokenGraph, TokenLayout, create_router, similarity_graph
from simoe_vision.routers.losses import importance_loss, load_loss
from simoe_vision.routers.router import expert_softmax

B, N, D, E = 2, 7, 16, 4


def random_graph(b=B, h=3, n=N):
    return torch.randn(b, h, n, n).softmax(dim=-1)


def route(router, x, graph=None):
    return router(x, graph if router.__class__.__name__ == 'AttentionRouter' else None)


@pytest.mark.parametrize('name', list(ROUTERS))
@pytest.mark.parametrize('top_k', [1, 2])
def test_router_contract(name, top_k):
    router = create_router(name, D, E, top_k=top_k)
    x, graph = torch.randn(B, N, D), random_graph()
    for training in (True, False):
        router.train(training)
        out = route(router, x, graph)
        assert out.indices.shape == (B * N, top_k) and out.indices.dtype == torch.long
        assert out.weights.shape == (B * N, top_k) and out.probs.shape == (B * N, E)
        assert int(out.indices.min()) >= 0 and int(out.indices.max()) < E
        assert all(len(set(row)) == top_k for row in out.indices.tolist())
        torch.testing.assert_close(out.probs.sum(-1), torch.ones(B * N))
        torch.testing.assert_close(out.weights, out.probs.gather(1, out.indices))
        assert out.aux_loss.dim() == 0 and torch.isfinite(out.aux_loss)
        assert all(not v.requires_grad for v in out.stats.values())
        torch.testing.assert_close(out.stats['load'].sum(), torch.tensor(1.0))


@pytest.mark.parametrize('name', list(ROUTERS))
def test_noise_only_in_training(name):
    router = create_router(name, D, E)
    x, graph = torch.randn(B, N, D), random_graph()
    router.eval()
    a, b = route(router, x, graph), route(router, x, graph)
    assert torch.equal(a.probs, b.probs) and torch.equal(a.indices, b.indices)
    router.train()
    c, d = route(router, x, graph), route(router, x, graph)
    assert not torch.equal(c.probs, d.probs)
    quiet = create_router(name, D, E, noise_std=0.0)
    quiet.load_state_dict(router.state_dict())
    torch.testing.assert_close(route(quiet.train(), x, graph).probs, a.probs, rtol=0, atol=0)


def _pair(name, **kwargs):
    """A softmax router and a graph router with the same gate."""
    softmax = create_router('softmax', D, E)
    other = create_router(name, D, E, **kwargs)
    other.gate.weight.data.copy_(softmax.gate.weight)
    return softmax, other


def _assert_same_routing(a, b):
    assert torch.equal(a.indices, b.indices)
    assert torch.equal(a.weights, b.weights)
    assert torch.equal(a.probs, b.probs)
    assert torch.equal(a.aux_loss, b.aux_loss)


@pytest.mark.parametrize('mix', ['probs', 'logits'])
@pytest.mark.parametrize('training', [True, False])
def test_identity_graph_gives_softmax_router(mix, training):
    x = torch.randn(B, N, D)
    softmax, attention = _pair('attention', mix=mix)
    eye = torch.eye(N).expand(B, N, N)
    torch.manual_seed(1)
    ref = softmax.train(training)(x)
    torch.manual_seed(1)
    _assert_same_routing(ref, attention.train(training)(x, eye))
    # cosine similarity / tau with tau -> 0 leaves only the self-loop: S becomes exactly the identity.
    _, similarity = _pair('similarity', mix=mix, tau=1e-6)
    similarity.gate.weight.data.copy_(softmax.gate.weight)
    torch.manual_seed(1)
    _assert_same_routing(ref, similarity.train(training)(x))


@pytest.mark.parametrize('name', ['similarity', 'attention'])
@pytest.mark.parametrize('mix', ['probs', 'logits'])
def test_alpha_zero_gives_softmax_router(name, mix):
    x, graph = torch.randn(B, N, D), random_graph()
    softmax, other = _pair(name, mix=mix, alpha=0.0)
    torch.manual_seed(3)
    ref = softmax.train()(x)
    torch.manual_seed(3)
    _assert_same_routing(ref, route(other.train(), x, graph))


# Three tokens x1 = [1, 0], x2 = [0, 1], x3 = [2, 0]: cosines are 1 between x1 and x3, 0 with x2, 1 with itself.
# With tau = 1 / ln 3, exp(cos / tau) = 3 ** cos, so S's rows are [3, 1, 3] / 7, [1, 3, 1] / 5, [3, 1, 3] / 7.
# Gate W = [[ln 2, 0], [0, ln 3]] gives logits h1 = [ln 2, 0], h2 = [0, ln 3], h3 = [2 ln 2, 0], so
# G1 = [2/3, 1/3], G2 = [1/4, 3/4], G3 = [4/5, 1/5].
X3 = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]]])
TAU3 = 1.0 / math.log(3.0)


def test_expert_softmax_hand_worked():
    # [log 1, log 3] -> [1/4, 3/4]; a shift by 1000 must not overflow (the max is subtracted first)
    scores = torch.tensor([[0.0, math.log(3.0)], [1000.0, 1000.0 + math.log(3.0)]])
    torch.testing.assert_close(expert_softmax(scores), torch.tensor([[0.25, 0.75], [0.25, 0.75]]))


@pytest.mark.parametrize('experts', [1, 2, 8, 15, 16, 32])
def test_expert_softmax_is_torch_softmax(experts):
    # the written-out rows (E < 16) and torch's kernel (E >= 16) agree with torch.softmax, values and gradients
    scores = torch.randn(5, 3, experts, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(expert_softmax(scores), scores.softmax(dim=-1))
    assert torch.autograd.gradcheck(expert_softmax, (scores,))


def _three_token_router(mix):
    router = create_router('similarity', 2, 2, top_k=1, tau=TAU3, mix=mix, noise_std=0.0).eval()
    router.gate.weight.data = torch.tensor([[math.log(2.0), 0.0], [0.0, math.log(3.0)]])
    return router


def test_similarity_graph_three_tokens():
    expected = torch.tensor([[3 / 7, 1 / 7, 3 / 7], [1 / 5, 3 / 5, 1 / 5], [3 / 7, 1 / 7, 3 / 7]])
    torch.testing.assert_close(similarity_graph(X3, TAU3).dense()[0], expected)


def test_similarity_mix_probs_three_tokens():
    # P1 = (3 G1 + G2 + 3 G3) / 7 = ([2, 1] + [1/4, 3/4] + [12/5, 3/5]) / 7 = [93/140, 47/140] = P3
    # P2 = (G1 + 3 G2 + G3) / 5 = ([2/3, 1/3] + [3/4, 9/4] + [4/5, 1/5]) / 5 = [133/300, 167/300]
    out = _three_token_router('probs')(X3)
    expected = torch.tensor([[93 / 140, 47 / 140], [133 / 300, 167 / 300], [93 / 140, 47 / 140]])
    torch.testing.assert_close(out.probs, expected)
    assert out.indices.flatten().tolist() == [0, 1, 0]
    torch.testing.assert_close(out.weights.flatten(), torch.tensor([93 / 140, 167 / 300, 93 / 140]))


def test_similarity_mix_logits_three_tokens():
    # S h: row 1 = (3 h1 + h2 + 3 h3) / 7 = [9 ln 2 / 7, ln 3 / 7]
    #      row 2 = (h1 + 3 h2 + h3) / 5 = [3 ln 2 / 5, 3 ln 3 / 5]
    # P = softmax of those: [2^(9/7), 3^(1/7)] / sum and [2^(3/5), 3^(3/5)] / sum.
    out = _three_token_router('logits')(X3)
    r1 = torch.tensor([2 ** (9 / 7), 3 ** (1 / 7)])
    r2 = torch.tensor([2 ** (3 / 5), 3 ** (3 / 5)])
    expected = torch.stack([r1 / r1.sum(), r2 / r2.sum(), r1 / r1.sum()])
    torch.testing.assert_close(out.probs, expected)


def test_alpha_blend_three_tokens():
    # alpha = 0.5: P = (G + S G) / 2; token 2: ([1/4, 3/4] + [133/300, 167/300]) / 2 = [208/600, 392/600].
    router = _three_token_router('probs')
    router.alpha = 0.5
    torch.testing.assert_close(router(X3).probs[1], torch.tensor([208 / 600, 392 / 600]))


def test_fused_propagation_matches_dense():
    q, k = torch.randn(B, 3, N, 8), torch.randn(B, 3, N, 8)
    bias = torch.randn(3, N, N)
    values = torch.randn(B, N, E).softmax(-1)
    graph = TokenGraph(q=q, k=k, scale=8 ** -0.5, bias=bias)
    dense = graph.dense()
    torch.testing.assert_close(dense.sum(-1), torch.ones(B, N))
    torch.testing.assert_close(graph.propagate(values, fused=True), torch.bmm(dense, values), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(graph.propagate(values, fused=False), torch.bmm(dense, values))


def test_layout_groups_tokens():
    # Two groups of 3 tokens within each image of 6: the graph must stay block-diagonal.
    layout = TokenLayout(partition=lambda t: t.reshape(-1, 3, t.shape[-1]),
                         merge=lambda t: t.reshape(-1, 6, t.shape[-1]))
    x = torch.randn(2, 6, 4)
    values = torch.randn(2, 6, 5)
    graph = similarity_graph(x, 0.5, layout=layout)
    out = graph.propagate(values)
    # Group-wise reference: each block of 3 tokens on its own.
    for g in range(2):
        sl = slice(3 * g, 3 * g + 3)
        ref = similarity_graph(x[:, sl], 0.5).propagate(values[:, sl])
        torch.testing.assert_close(out[:, sl], ref)


@pytest.mark.parametrize('name', ['similarity', 'attention'])
@pytest.mark.parametrize('detach', [False, True])
def test_gradients_reach_gate_and_graph(name, detach):
    kwargs = {'proj_dim': 4, 'learnable_tau': True} if name == 'similarity' else {}
    router = create_router(name, D, E, detach_graph=detach, **kwargs)
    x = torch.randn(B, N, D, requires_grad=True)
    q, k = torch.randn(B, 2, N, 8, requires_grad=True), torch.randn(B, 2, N, 8, requires_grad=True)
    graph = TokenGraph(q=q, k=k, scale=8 ** -0.5) if name == 'attention' else None
    out = router(x, graph)
    (out.weights.square().sum() + out.aux_loss).backward()
    assert router.gate.weight.grad.abs().sum() > 0
    if name == 'similarity':
        graph_params = [router.proj.weight, router.log_tau]
    else:
        graph_params = [q, k]
    for p in graph_params:
        if detach:
            assert p.grad is None
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.parametrize('name', list(ROUTERS))
def test_routing_stays_fp32_under_bf16_autocast(name):
    router = create_router(name, D, E)
    x = torch.randn(B, N, D).bfloat16()
    graph = random_graph().bfloat16()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = route(router, x, graph)
    assert out.probs.dtype == torch.float32 and out.weights.dtype == torch.float32
    assert out.aux_loss.dtype == torch.float32
    torch.testing.assert_close(out.probs.sum(-1), torch.ones(B * N))


def test_similarity_dot_and_cosine_differ_and_are_row_stochastic():
    x = torch.randn(1, 5, 6) * 3
    cos = similarity_graph(x, 1.0, 'cosine').dense()
    dot = similarity_graph(x, 1.0, 'dot').dense()
    expected_dot = (x[0] @ x[0].T / math.sqrt(6)).softmax(-1)
    torch.testing.assert_close(dot[0], expected_dot)
    torch.testing.assert_close(cos.sum(-1), torch.ones(1, 5))


@pytest.mark.parametrize('call, message', [
    (lambda: create_router('sparse', D, E), "unknown router 'sparse'; valid routers: softmax, similarity, attention"),
    (lambda: create_router('softmax', D, E, tau=0.1), "unknown keyword.*tau.*valid: top_k, noise_std"),
    (lambda: create_router('similarity', D, E, temperature=1), "unknown keyword.*temperature.*valid:.*tau"),
    (lambda: create_router('softmax', D, E, top_k=5), r'top_k must be an integer in \[1, num_experts=4\], got 5'),
    (lambda: create_router('similarity', D, E, tau=0.0), 'tau must be > 0, got 0.0'),
    (lambda: create_router('similarity', D, E, tau=-1), 'tau must be > 0, got -1'),
    (lambda: create_router('attention', D, E, mix='mean'), "mix must be 'probs' or 'logits', got 'mean'"),
    (lambda: create_router('attention', D, E, alpha=1.5), r'alpha must be in \[0, 1\], got 1.5'),
    (lambda: create_router('softmax', D, E, noise_std=-1), 'noise_std must be >= 0, got -1'),
    (lambda: create_router('softmax', D, 0), 'num_experts must be a positive integer, got 0'),
    (lambda: create_router('softmax', D, E, balance_loss='gshard'), "unknown balance_loss 'gshard'"),
    (lambda: create_router('softmax', D, E)(torch.randn(N, D)),
     r'router input must be \(B, N, 16\); got shape \(7, 16\)'),
    (lambda: create_router('attention', D, E)(torch.randn(B, N, D)), "attention router needs the block's attention"),
    (lambda: create_router('attention', D, E)(torch.randn(B, N, D), torch.rand(N, N)), r'graph probs must be'),
    (lambda: create_router('attention', D, E)(torch.randn(B, N, D), torch.rand(B, N + 1, N + 1)),
     'graph has 8 nodes per group but the tokens give groups of 7'),
    (lambda: create_router('similarity', D, E)(torch.randn(B, N, D), random_graph()), 'pass layout=, not graph='),
])
def test_errors_name_the_problem(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# Noise placement (issue 17): 'gate' noise goes on each token's gate log-probs before the graph.

def _routed_with_seed(router, x, graph, seed=5):
    torch.manual_seed(seed)
    return route(router, x, graph)


@pytest.mark.parametrize('loss_probs', ['selection', 'clean'])
def test_gate_noise_is_routing_noise_for_the_softmax_router(loss_probs):
    routing = create_router('softmax', D, E, loss_probs=loss_probs).train()
    gate = create_router('softmax', D, E, noise='gate', loss_probs=loss_probs).train()
    gate.load_state_dict(routing.state_dict())
    x = torch.randn(B, N, D)
    a, b = _routed_with_seed(routing, x, None), _routed_with_seed(gate, x, None)
    _assert_same_routing(a, b)
    for key in ('importance_loss', 'load_loss'):
        assert torch.equal(a.stats[key], b.stats[key])


@pytest.mark.parametrize('name', ['similarity', 'attention'])
@pytest.mark.parametrize('mix', ['probs', 'logits'])
def test_noise_placement_is_moot_without_noise(name, mix):
    routing = create_router(name, D, E, noise_std=0.0, mix=mix).train()
    gate = create_router(name, D, E, noise_std=0.0, mix=mix, noise='gate').train()
    gate.load_state_dict(routing.state_dict())
    x, graph = torch.randn(B, N, D), random_graph()
    _assert_same_routing(route(routing, x, graph), route(gate, x, graph))
    # and in eval, whatever noise_std: no noise is applied there
    noisy_routing = create_router(name, D, E, mix=mix).eval()
    noisy_gate = create_router(name, D, E, mix=mix, noise='gate').eval()
    noisy_gate.load_state_dict(noisy_routing.state_dict())
    _assert_same_routing(route(noisy_routing, x, graph), route(noisy_gate, x, graph))


@pytest.mark.parametrize('mix', ['probs', 'logits'])
def test_gate_noise_mixes_the_noisy_gates(mix):
    """P is the graph applied to the noisy gates; the load loss sees log G and log G + noise, std noise_std."""
    router = create_router('attention', D, E, noise='gate', mix=mix, loss_probs='clean').train()
    x, graph = torch.randn(B, N, D), random_graph()
    out = _routed_with_seed(router, x, graph)
    torch.manual_seed(5)
    logits = torch.nn.functional.linear(x, router.gate.weight)
    clean = logits.log_softmax(-1)
    noisy = clean + router.noise_std * torch.randn(B, N, E)
    a = graph.mean(dim=1)
    expected = a @ noisy.softmax(-1) if mix == 'probs' else (a @ noisy).softmax(-1)
    torch.testing.assert_close(out.probs, expected.flatten(0, 1))
    clean_p = a @ clean.softmax(-1) if mix == 'probs' else (a @ clean).softmax(-1)
    torch.testing.assert_close(out.stats['importance_loss'], importance_loss(clean_p.flatten(0, 1)))
    torch.testing.assert_close(out.stats['load_loss'],
                               load_loss(clean.flatten(0, 1), noisy.flatten(0, 1), router.noise_std, 2))


def test_gate_noise_load_loss_hand_worked():
    """Two tokens, two experts, top-1, noise std 1/E = 0.5. Gates h = (0, 0) and (ln 3, 0): log G = (-ln 2, -ln 2)
    and (ln 3/4, ln 1/4). Noise draws (0.5, -0.5) and (0, 0): noisy log G = (-ln 2 + .5, -ln 2 - .5) and unchanged.
    Thresholds (top-1 noisy): -ln 2 + .5 and ln 3/4. P(selected) = 1 - Phi((threshold - clean) / 0.5):
    token 0 -> (1 - Phi(1), 1 - Phi(1)); token 1 -> (1 - Phi(0), 1 - Phi(ln 3 / 0.5))."""
    clean = torch.tensor([[-math.log(2), -math.log(2)], [math.log(0.75), math.log(0.25)]])
    noisy = clean + torch.tensor([[0.5, -0.5], [0.0, 0.0]])
    p = [((1 - _phi(1.0)) + (1 - _phi(0.0))) / 2, ((1 - _phi(1.0)) + (1 - _phi(math.log(3) / 0.5))) / 2]
    mean = sum(p) / 2
    expected = ((p[0] - mean) ** 2 + (p[1] - mean) ** 2) / 2 / mean ** 2
    assert load_loss(clean, noisy, 0.5, 1).item() == pytest.approx(expected, rel=1e-5)


def _phi(z):
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def test_clean_losses_use_clean_probs_and_drop_the_load_term_in_eval():
    router = create_router('similarity', D, E, loss_probs='clean').train()
    legacy = create_router('similarity', D, E).train()
    legacy.load_state_dict(router.state_dict())
    x = torch.randn(B, N, D)
    out, old = _routed_with_seed(router, x, None), _routed_with_seed(legacy, x, None)
    quiet = create_router('similarity', D, E, noise_std=0.0).train()
    quiet.load_state_dict(router.state_dict())
    clean_p = route(quiet, x).probs
    torch.testing.assert_close(out.stats['importance_loss'], importance_loss(clean_p))
    torch.testing.assert_close(old.stats['importance_loss'], importance_loss(old.probs))
    assert torch.equal(out.stats['load_loss'], old.stats['load_loss'])  # same noise, same load term in training
    router.eval()
    legacy.eval()
    assert route(router, x).stats['load_loss'].item() == 0.0
    assert route(legacy, x).stats['load_loss'].item() > 0.0  # the original numbers keep it


def test_importance_only_balance_loss():
    router = create_router('softmax', D, E, balance_loss='importance', balance_weight=0.01).train()
    out = route(router, torch.randn(B, N, D))
    assert out.stats['load_loss'].item() == 0.0
    torch.testing.assert_close(out.aux_loss, 0.01 * out.stats['importance_loss'])


def test_router_reports_the_routing_diagnostics():
    router = create_router('attention', D, E).eval()
    x, graph = torch.randn(B, N, D), random_graph()
    out = route(router, x, graph)
    gates = torch.nn.functional.linear(x, router.gate.weight).softmax(-1).flatten(0, 1)
    torch.testing.assert_close(out.stats['gate_entropy'], -(gates * gates.log()).sum(-1).mean())
    torch.testing.assert_close(out.stats['entropy'], -(out.probs * out.probs.log()).sum(-1).mean())
    flip = (gates.argmax(-1) != out.probs.argmax(-1)).float().mean()
    torch.testing.assert_close(out.stats['flip'], flip)


def test_graph_temperature_sharpens_the_attention_graph():
    q, k = torch.randn(B, 3, N, 8), torch.randn(B, 3, N, 8)
    bias = torch.randn(1, 3, N, N)
    g = TokenGraph(q=q, k=k, scale=0.5, bias=bias)
    logits = torch.einsum('bhnd,bhmd->bhnm', q, k) * 0.5 + bias
    torch.testing.assert_close(g.with_temperature(0.25).dense(), (logits / 0.25).softmax(-1).mean(1))
    dense = TokenGraph(probs=logits.softmax(-1))
    torch.testing.assert_close(dense.with_temperature(0.25).dense(), (logits / 0.25).softmax(-1).mean(1))
    assert g.with_temperature(1.0) is g
    sharp = create_router('attention', D, E, graph_temperature=0.5).eval()
    plain = create_router('attention', D, E).eval()
    sharp.gate.weight.data.copy_(plain.gate.weight)
    x = torch.randn(B, N, D)
    torch.testing.assert_close(route(sharp, x, g).probs, route(plain, x, g.with_temperature(0.5)).probs)
    with pytest.raises(ValueError, match='graph_temperature'):
        create_router('attention', D, E, graph_temperature=0.0)


@pytest.mark.parametrize('kwargs, message', [({'noise': 'after'}, 'noise placement'),
                                             ({'loss_probs': 'noisy'}, 'loss_probs')])
def test_new_settings_refuse_unknown_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        create_router('softmax', D, E, **kwargs)

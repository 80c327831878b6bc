"""Peer MoE adapters (simoe_vision.perf.peers) without the peer packages: status and errors with a peer made
unimportable, and the mode -> peer argument mapping against stand-in packages. Nothing here imports a real peer, so
the tests run the same whether requirements-bench.txt is installed or not."""
import sys
import types
from collections import namedtuple

import pytest
import torch
import torch.nn as nn

from simoe_vision.perf.peers import PEER_NAMES, PeerUnavailable, build_peer, peer_status

NOT_INSTALLED = 'not installed (pip install -r requirements-bench.txt)'
TOP_LEVEL = {'deepspeed': 'deepspeed', 'st_moe': 'st_moe_pytorch', 'torchtitan': 'torchtitan'}
SUPPORTED = [('deepspeed', 1.25), ('deepspeed', None), ('st_moe', 1.25), ('torchtitan', None)]


def _block(monkeypatch, name):
    monkeypatch.setitem(sys.modules, TOP_LEVEL[name], None)  # `import pkg` now raises ImportError


def _stub(monkeypatch, *module_names, **attrs):
    """Stand-in modules (the last gets ``attrs``) that satisfy the adapters' imports."""
    for module_name in module_names:
        module = types.ModuleType(module_name)
        module.__version__ = '0.0-stub'
        monkeypatch.setitem(sys.modules, module_name, module)
    for key, value in attrs.items():
        setattr(module, key, value)
    return module


@pytest.mark.parametrize('name', PEER_NAMES)
def test_peer_status_reports_an_unimportable_peer(monkeypatch, name):
    _block(monkeypatch, name)
    others = {'deepspeed': ('deepspeed', 'deepspeed.moe.layer'), 'st_moe': ('st_moe_pytorch',),
              'torchtitan': ('torchtitan', 'torchtitan.models.common.moe')}
    for other in PEER_NAMES:
        if other != name:
            _stub(monkeypatch, *others[other])
    status = peer_status()
    assert tuple(status) == PEER_NAMES
    assert status[name] == NOT_INSTALLED
    for other in PEER_NAMES:
        if other != name:  # importable: its version (the installed distribution's, else the module's)
            assert isinstance(status[other], str) and status[other] and 'not installed' not in status[other]


@pytest.mark.parametrize('name, capacity_factor', SUPPORTED)
def test_build_peer_without_the_package_raises_peer_unavailable(monkeypatch, name, capacity_factor):
    _block(monkeypatch, name)
    with pytest.raises(PeerUnavailable, match='pip install -r requirements-bench.txt') as info:
        build_peer(name, 16, 32, 4, 2, capacity_factor)
    assert isinstance(info.value, RuntimeError) and info.value.name == name


@pytest.mark.parametrize('args, match', [
    (('fairseq', 16, 32, 4, 2, 1.25), "unknown peer 'fairseq'"),
    (('st_moe', 16, 32, 4, 2, None), 'no dropless mode'),
    (('st_moe', 16, 32, 4, 1, 1.25), 'top_k=1'),
    (('torchtitan', 16, 32, 4, 2, 1.25), 'dropless only'),
    (('torchtitan', 20, 32, 4, 2, None), 'divisible by 8'),
    (('deepspeed', 16, 32, 4, 2, 0.0), 'capacity_factor must be > 0'),
    (('deepspeed', 16, 32, 4, 5, None), 'top_k must be in 1..num_experts=4'),
])
def test_unknown_peer_or_unsupported_mode_is_a_one_line_value_error(monkeypatch, args, match):
    for name in PEER_NAMES:  # raised before any import: the same answer whether the peer is installed or not
        _block(monkeypatch, name)
    with pytest.raises(ValueError, match=match) as info:
        build_peer(*args)
    assert '\n' not in str(info.value)


class _Recorder(nn.Module):
    """Stands in for a peer's MoE class: records its arguments, a linear 'expert' and a gate with an aux loss."""

    def __init__(self, dim, **kwargs):
        super().__init__()
        self.kwargs = kwargs
        self.proj = nn.Linear(dim, dim)
        self.gate = nn.Linear(dim, 4)
        self.deepspeed_moe = types.SimpleNamespace(l_aux=None)

    def forward(self, x):
        return self.proj(x), self.gate(x).square().mean()


class _FakeDeepSpeedMoe(_Recorder):
    def __init__(self, hidden_size, **kwargs):
        super().__init__(hidden_size, **kwargs)

    def forward(self, x):
        out, aux = super().forward(x)
        return out, aux, torch.zeros(4)


class _FakeStMoe(_Recorder):
    def forward(self, x):
        return namedtuple('Ret', 'outputs total_aux_loss')(*super().forward(x))


@pytest.mark.parametrize('name, capacity_factor, expected', [
    ('deepspeed', 1.25, dict(k=2, capacity_factor=1.25, drop_tokens=True, ep_size=1, top2_2nd_expert_sampling=False)),
    ('deepspeed', None, dict(k=2, drop_tokens=False)),
    ('st_moe', 1.25, dict(gating_top_n=2, capacity_factor_train=2.5, threshold_train=0.0)),  # k cf: our slots
])
def test_modes_map_onto_the_peer_arguments(monkeypatch, name, capacity_factor, expected):
    if name == 'deepspeed':
        _stub(monkeypatch, 'deepspeed', 'deepspeed.moe.layer', MoE=_FakeDeepSpeedMoe)
    else:
        _stub(monkeypatch, 'st_moe_pytorch', MoE=_FakeStMoe)
    layer = build_peer(name, 16, 32, 4, 2, capacity_factor)
    assert layer.training
    moe = layer.moe
    assert {key: moe.kwargs[key] for key in expected} == expected
    experts = moe.kwargs['expert'] if name == 'deepspeed' else moe.kwargs['experts'][0]
    assert [type(m) for m in experts] == [nn.Linear, nn.GELU, nn.Linear]  # d -> hidden -> d, GELU
    assert (experts[0].in_features, experts[0].out_features) == (16, 32)
    x = torch.randn(2, 5, 16)
    out = layer(x)
    assert out.shape == x.shape
    out.backward(torch.zeros_like(out))  # a zero task gradient: the gate learns from the aux loss alone
    assert moe.gate.weight.grad.abs().sum() > 0

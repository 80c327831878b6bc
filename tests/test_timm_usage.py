"""The models the way timm users drive them: default cfgs, deepcopy, pickling, ModelEmaV3, torch.compile with
changing batch sizes, dropless through create_model, the aux loss under gradient accumulation, a router registered
from outside the package, and train.py checkpoints that load with the model's own defaults."""
import copy
import io
from typing import ClassVar

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from fixtures import TINY
from timm.utils import ModelEmaV3

import simoe_vision  # noqa: F401  (registers the models)
from simoe_vision.engine import main
from simoe_vision.layers import MoeConfig, MoeMlp
from simoe_vision.models import VisionMoE, moe_layers
from simoe_vision.routers import ROUTERS, GraphRouter, TokenGraph, TokenLayout, register_router

ALL_MODELS = timm.list_models(['vmoe_*', 'swin_moe_*'])
SMALL = [m for m in ALL_MODELS if m.endswith('_test') or '_32' in m]
FAMILIES = ['vmoe_test', 'swin_moe_test']
CASES = [(m, r) for m in FAMILIES for r in ('softmax', 'similarity', 'attention')]


def _batch(model, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *model.pretrained_cfg['input_size'], generator=g)


def _eval_logits(model, x):
    with torch.no_grad():
        return model.eval()(x)


# ------------------------------------------------------------------ default cfgs (timm's test_model_default_cfgs)

@pytest.mark.parametrize('name', ALL_MODELS)
def test_default_cfg(name):
    model = timm.create_model(name)
    cfg = model.pretrained_cfg
    assert len(cfg['input_size']) == 3 and cfg['input_size'][0] == 3
    assert len(cfg['mean']) == 3 and len(cfg['std']) == 3 and 0 < cfg['crop_pct'] <= 1
    first_conv = model.get_submodule(cfg['first_conv'])
    assert isinstance(first_conv, nn.Conv2d) and first_conv.in_channels == 3
    assert tuple(model.patch_embed.img_size) == tuple(cfg['input_size'][1:])
    classifier = model.get_submodule(cfg['classifier'])
    assert isinstance(classifier, nn.Linear) and classifier.out_features == cfg['num_classes'] == model.num_classes
    assert model.get_classifier() is classifier
    if name in SMALL:  # a forward at the cfg's input size; the 224 px ones are covered by test_pinning's slow set
        x = torch.randn(1, *cfg['input_size'])
        assert _eval_logits(model, x).shape == (1, cfg['num_classes'])
        model.reset_classifier(0)
        assert _eval_logits(model, x).shape == (1, model.num_features)


# ------------------------------------------------------------------ copies, pickling, EMA, compile

@pytest.mark.parametrize('name, router', CASES)
def test_deepcopy_is_independent_and_equal(name, router):
    model = timm.create_model(name, router=router)
    x = _batch(model)
    clone = copy.deepcopy(model)
    torch.testing.assert_close(_eval_logits(clone, x), _eval_logits(model, x), rtol=0, atol=0)
    record = [layer.last_routing.indices.clone() for _, layer in moe_layers(model)]
    clone.train()(_batch(model, seed=1))  # the copy's forward leaves the original alone
    layers = moe_layers(model)
    assert all(torch.equal(a, layer.last_routing.indices) for a, (_, layer) in zip(record, layers, strict=True))
    F.cross_entropy(model.train()(x), torch.tensor([0, 1])).backward()  # the original still trains


@pytest.mark.parametrize('name, router', CASES)
def test_pickle_whole_model(name, router):
    model = timm.create_model(name, router=router).eval()
    x = _batch(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(_eval_logits(loaded, x), _eval_logits(model, x), rtol=0, atol=0)


@pytest.mark.parametrize('name, router', CASES)
def test_model_ema_v3_evaluates(name, router):
    """The EMA copy of an attention-routed model used to fail: its blocks' hooks wrote into the original."""
    model = timm.create_model(name, router=router)
    ema = ModelEmaV3(model, decay=0.5)
    x = _batch(model)
    F.cross_entropy(model.train()(x), torch.tensor([0, 1])).backward()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    ema.update(model, step=10)
    ema_logits = _eval_logits(ema.module, x)
    assert torch.isfinite(ema_logits).all()
    assert not torch.allclose(ema_logits, _eval_logits(model, x))  # the EMA really holds other weights


# dynamo traces every router on both families with symbolic batch sizes; the 'eager' backend compiles nothing
# (cheap) but runs the same tracing that failed on randn's symbolic shape. Tracing Swin's two MoE stages takes about
# a minute per mode and shape regime, so the default run keeps its graph router's dynamic training trace (layout +
# window graph) and the slow set has the rest.
COMPILE_CASES = [pytest.param(m, r, marks=pytest.mark.slow if m.startswith('swin') else ()) for m, r in CASES]


def _compiled_train_steps(model, compiled, sizes):
    for n in sizes:  # 8 -> 6 is where dynamo switches to dynamic shapes
        x = _batch(model, n, seed=n)
        F.cross_entropy(compiled.train()(x), torch.arange(n) % 10).backward()


@pytest.mark.parametrize('name, router', COMPILE_CASES)
def test_torch_compile_train_and_eval_with_changing_batch_sizes(name, router):
    torch._dynamo.reset()
    model = timm.create_model(name, router=router)
    compiled = torch.compile(model, backend='eager')
    _compiled_train_steps(model, compiled, (8, 6, 5))
    for n in (8, 6):
        x = _batch(model, n, seed=n)
        with torch.no_grad():
            torch.testing.assert_close(compiled.eval()(x), model.eval()(x), rtol=1e-5, atol=1e-6)


def test_torch_compile_swin_moe_dynamic_training():
    torch._dynamo.reset()
    model = timm.create_model('swin_moe_test', router='attention')
    compiled = torch.compile(model, backend='eager')
    _compiled_train_steps(model, compiled, (8, 6))
    assert [layer.last_routing.indices.shape[0] for _, layer in moe_layers(model)] == [6 * 64, 6 * 16]


@pytest.mark.slow
def test_torch_compile_inductor_train_step():
    torch._dynamo.reset()
    model = timm.create_model('vmoe_test', router='attention')
    compiled = torch.compile(model)
    for n in (8, 6):
        F.cross_entropy(compiled.train()(_batch(model, n)), torch.arange(n) % 10).backward()


# ------------------------------------------------------------------ dropless through timm

def _route_everything_to_expert_0(model):
    for _, layer in moe_layers(model):
        layer.router.gate.weight.data.zero_()
        layer.router.gate.weight.data[0] = 1.0  # with inputs shifted positive, expert 0 wins for every token


@pytest.mark.parametrize('name', FAMILIES)
def test_dropless_survives_create_model(name):
    """Capacity 1.0 with every token on one expert drops most of them; 'dropless' drops none, in train and eval."""
    x = _batch(timm.create_model(name)).abs() + 1.0
    for cf, expect_drops in ((1.0, True), ('dropless', False)):
        model = timm.create_model(name, capacity_factor=cf, eval_capacity_factor=cf,
                                  router_kwargs=dict(noise_std=0.0))
        _route_everything_to_expert_0(model)
        assert all(layer.moe.capacity_factor == cf for _, layer in moe_layers(model))
        for mode in (True, False):
            model.train(mode)(x)
            dropped = [float(layer.last_routing.stats['dropped_fraction']) for _, layer in moe_layers(model)]
            assert all((d > 0.2) if expect_drops else (d == 0.0) for d in dropped), (cf, mode, dropped)


def test_none_capacity_factor_fails_loudly():
    with pytest.raises(ValueError, match="capacity_factor=None is not accepted.*capacity_factor='dropless'"):
        VisionMoE(capacity_factor=None, img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    with pytest.raises(ValueError, match="eval_capacity_factor=None"):
        MoeMlp(8, 16, eval_capacity_factor=None)
    assert MoeConfig(capacity_factor='dropless').capacity(training=True) is None


# ------------------------------------------------------------------ aux loss under gradient accumulation

def _gate_grad(model):
    return torch.cat([layer.router.gate.weight.grad.flatten() for _, layer in moe_layers(model)])


@pytest.mark.parametrize('name', FAMILIES)
def test_aux_loss_keeps_its_weight_under_gradient_accumulation(name):
    """timm's train.py --grad-accum-steps N backpropagates loss / N per micro-batch. With aux_loss_scale = 1 / N the
    aux part of the accumulated gate gradient is the mean of the micro-batches' aux gradients (the configured
    weight); with the default scale it would be N times that."""
    reference = timm.create_model(name, router='similarity')
    micro = [_batch(reference, 2, seed=s) for s in (1, 2)]

    def accumulated(scale, balance='vmoe', task=1.0):
        model = timm.create_model(name, router='similarity', aux_loss_scale=scale,
                                  router_kwargs=dict(balance_loss=balance))
        model.load_state_dict(reference.state_dict())
        for i, x in enumerate(micro):
            torch.manual_seed(i)
            (task * F.cross_entropy(model.train()(x), torch.tensor([0, 1])) / len(micro)).backward()
        return _gate_grad(model)

    task_part = accumulated(0.5, balance='none')
    aux_half = accumulated(0.5) - task_part
    aux_full = accumulated(1.0) - task_part
    aux_alone = accumulated(1.0, task=0.0)  # scale 1: each micro-batch's aux gradient at full weight, summed
    torch.testing.assert_close(aux_half, aux_alone / len(micro), rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(aux_full, aux_alone, rtol=1e-4, atol=1e-8)


# ------------------------------------------------------------------ a router registered from outside the package

@register_router('test_mean_field')
class MeanFieldRouter(GraphRouter):
    """Every token follows the mean gate of its group: a token graph with uniform edges (a test router)."""

    graph: ClassVar[str] = 'tokens'

    def build_graph(self, x: torch.Tensor, graph: TokenGraph | None, layout: TokenLayout) -> TokenGraph:
        groups = layout.to_groups(x)
        uniform = groups.new_full((groups.shape[0], groups.shape[1], groups.shape[1]), 1.0 / groups.shape[1])
        return TokenGraph(probs=uniform, layout=layout)


@pytest.mark.parametrize('name', FAMILIES)
def test_router_registered_outside_trains_both_families(name, fashion_dir, tmp_path):
    assert 'test_mean_field' in ROUTERS
    model = timm.create_model(name, router='test_mean_field', router_kwargs=dict(alpha=0.5))
    x = _batch(model, 4)
    for _, layer in moe_layers(model):
        assert isinstance(layer.router, MeanFieldRouter)
    F.cross_entropy(model.train()(x), torch.arange(4)).backward()
    assert _gate_grad(model).abs().sum() > 0
    args = TINY + ['--model', name, '--router', 'test_mean_field', '--data-dir', fashion_dir, '--epochs', '1',
                   '--output', tmp_path, '--experiment', 'custom']
    assert main([str(a) for a in args]) == 0
    assert (tmp_path / 'custom' / 'results.json').is_file()


# ------------------------------------------------------------------ train.py keeps the model's own defaults

def test_train_py_checkpoint_loads_with_the_models_defaults(fashion_dir, tmp_path):
    """vmoe_test registers 4 experts; train.py must not impose its own number (it used to build 8)."""
    args = ['--model', 'vmoe_test', '--data-dir', fashion_dir, '--epochs', '1', '--batch-size', '16', '--val-size',
            '16', '--probe-size', '8', '--workers', '0', '--no-progress', '--output', tmp_path, '--experiment', 'd']
    assert main([str(a) for a in args]) == 0
    weights = tmp_path / 'd' / 'best.safetensors'
    model = timm.create_model('vmoe_test', in_chans=1, checkpoint_path=str(weights))
    assert model.moe_config.num_experts == 4
    saved = (tmp_path / 'd' / 'config.yaml').read_text()
    assert 'num_experts: 4' in saved and 'router: softmax' in saved  # the settings in force are recorded

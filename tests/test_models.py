"""Registered simoe_vision models through timm: every test model x every router, plus V-MoE specifics."""
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

import simoe_vision  # noqa: F401  (registers the models)
from simoe_vision.models import count_params, moe_layers, parse_moe_layout, upcycle_state_dict
from simoe_vision.routers import ROUTERS

TEST_MODELS = timm.list_models(['vmoe_test*', 'swin_moe_test*'])
CASES = [(m, r) for m in TEST_MODELS for r in ROUTERS]


def _create(name, router, **kwargs):
    return timm.create_model(name, router=router, num_classes=5, **kwargs)


def _batch(model, n=2):
    return torch.randn(n, *model.pretrained_cfg['input_size']), torch.randint(0, 5, (n,))


@pytest.mark.parametrize('name, router', CASES)
def test_forward_backward(name, router):
    model = _create(name, router)
    x, y = _batch(model)
    features = model.forward_features(x)
    logits = model.forward_head(features)
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()
    # The head of a ViT reads only the class token: a feature term makes every routed token matter to the loss.
    (F.cross_entropy(logits, y) + features.square().mean()).backward()
    layers = moe_layers(model)
    assert layers and model.aux_loss() is not None and torch.isfinite(model.aux_loss())
    for _, layer in layers:
        assert layer.router.gate.weight.grad.abs().sum() > 0
        used = layer.last_routing.indices.unique()
        assert (layer.experts.fc1_weight.grad[used].flatten(1).abs().sum(1) > 0).all()
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0
    assert model.get_classifier().weight.grad.abs().sum() > 0


@pytest.mark.parametrize('name, router', CASES)
def test_eval_determinism_and_state_dict_round_trip(name, router):
    model = _create(name, router).eval()
    x, _ = _batch(model, 3)
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(model(x), ref, rtol=0, atol=0)
        clone = _create(name, router).eval()
        clone.load_state_dict(model.state_dict())
        torch.testing.assert_close(clone(x), ref, rtol=0, atol=0)


@pytest.mark.parametrize('name, router', CASES)
def test_gradient_checkpointing_same_logits_aux_and_grads(name, router):
    model = _create(name, router, drop_path_rate=0.1)
    x, y = _batch(model)
    results = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        torch.manual_seed(7)
        logits = model(x)
        F.cross_entropy(logits, y).backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        results.append((logits.detach(), model.aux_loss(), grads))
    (l0, a0, g0), (l1, a1, g1) = results
    torch.testing.assert_close(l0, l1)
    torch.testing.assert_close(a0, a1)
    assert len(g0) == len(g1)
    for a, b in zip(g0, g1, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize('name, router', CASES)
def test_plain_training_loop_gets_balancing_gradient(name, router):
    """A loop that only calls cross_entropy(model(x), y).backward() must still train the router to balance:
    the gate gradient's aux-loss part scales exactly with balance_weight."""
    x, y = None, None
    gate_grads = []
    reference = _create(name, router)
    for weight in (0.0, 0.01, 0.02):
        model = _create(name, router, router_kwargs=dict(balance_weight=weight))
        model.load_state_dict(reference.state_dict())
        if x is None:
            x, y = _batch(model)
        torch.manual_seed(3)
        F.cross_entropy(model(x), y).backward()
        gate_grads.append(torch.cat([m.router.gate.weight.grad.flatten() for _, m in moe_layers(model)]))
    aux_part_1, aux_part_2 = gate_grads[1] - gate_grads[0], gate_grads[2] - gate_grads[0]
    assert aux_part_1.abs().sum() > 0
    torch.testing.assert_close(aux_part_2, 2 * aux_part_1, atol=1e-7, rtol=1e-3)


@pytest.mark.parametrize('name', TEST_MODELS)
def test_model_api(name):
    model = _create(name, 'similarity').eval()
    x, _ = _batch(model)
    features = model.forward_features(x)
    torch.testing.assert_close(model.forward_head(features), model(x))
    assert model.forward_head(features, pre_logits=True).shape[-1] == model.num_features
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    assert isinstance(model.no_weight_decay(), set)
    total, active = count_params(model)
    assert 0 < active < total


@pytest.mark.parametrize('name', TEST_MODELS)
def test_checkpoint_loading_through_timm(name, tmp_path):
    model = _create(name, 'attention').eval()
    path = tmp_path / 'weights.safetensors'
    save_file(model.state_dict(), str(path))
    x, _ = _batch(model)
    with torch.no_grad():
        ref = model(x)
        by_path = timm.create_model(name, router='attention', num_classes=5, checkpoint_path=str(path)).eval()
        torch.testing.assert_close(by_path(x), ref)
        by_cfg = timm.create_model(name, router='attention', num_classes=5, pretrained=True,
                                   pretrained_cfg_overlay=dict(file=str(path), num_classes=5)).eval()
        torch.testing.assert_close(by_cfg(x), ref)


def test_checkpoint_of_other_router_fails_clearly(tmp_path):
    model = _create('vmoe_test', 'similarity', router_kwargs=dict(proj_dim=4))
    path = tmp_path / 'weights.safetensors'
    save_file(model.state_dict(), str(path))
    with pytest.raises(RuntimeError, match='Unexpected key.*router.proj.weight'):
        timm.create_model('vmoe_test', router='softmax', num_classes=5, checkpoint_path=str(path))


def test_attention_router_uses_the_blocks_own_attention():
    """Reference: explicit head-mean attention probabilities of the block times the gate distribution."""
    model = _create('vmoe_test', 'attention', router_kwargs=dict(noise_std=0.0)).eval()
    block = model.blocks[model.moe_block_indices[0]]
    seen = {}
    block.register_forward_pre_hook(lambda m, args: seen.__setitem__('block_in', args[0]))
    block.mlp.register_forward_pre_hook(lambda m, args: seen.__setitem__('mlp_in', args[0]))
    x, _ = _batch(model)
    with torch.no_grad():
        model(x)
        h = block.norm1(seen['block_in'])
        b, n, c = h.shape
        qkv = block.attn.qkv(h).reshape(b, n, 3, block.attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        attn = (qkv[0] @ qkv[1].transpose(-2, -1) * block.attn.scale).softmax(-1).mean(1)
        gates = F.linear(seen['mlp_in'], block.mlp.router.gate.weight).softmax(-1)
        expected = (attn @ gates).flatten(0, 1)
    torch.testing.assert_close(block.mlp.last_routing.probs, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('router', list(ROUTERS))
def test_sparse_upcycling_reproduces_dense_vit(router):
    dense = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
                              num_classes=5).eval()
    moe = _create('vmoe_test', router, router_kwargs=dict(renormalize=True),
                  capacity_factor='dropless', eval_capacity_factor='dropless')
    moe.load_state_dict(upcycle_state_dict(dense.state_dict(), moe))
    moe.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), dense(x), atol=1e-5, rtol=1e-5)


def test_upcycling_rejects_other_architecture():
    dense = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2, num_classes=5)
    with pytest.raises(ValueError, match='shape mismatch.*same dense architecture|shape mismatch'):
        upcycle_state_dict(dense.state_dict(), _create('vmoe_test', 'softmax'))


def test_moe_layouts():
    assert parse_moe_layout('every2', 12) == [1, 3, 5, 7, 9, 11]
    assert parse_moe_layout('last2', 8) == [5, 7]
    assert parse_moe_layout([3, 1, 3], 4) == [1, 3]
    model = timm.create_model('vmoe_paper_s32_224', num_classes=5, img_size=64)
    assert model.moe_block_indices == [5, 7]
    assert [name for name, _ in moe_layers(model)] == ['blocks.5.mlp', 'blocks.7.mlp']
    assert model.blocks[7].mlp.experts.fc1_weight.shape == (8, 512, 2048)


@pytest.mark.parametrize('kwargs, message', [
    (dict(moe_layout='every3'), "unknown moe_layout 'every3'"),
    (dict(moe_layout=[0, 9]), r'moe_layout block indices \[9\] out of range for a model of depth 2'),
    (dict(router='dense'), "unknown router 'dense'; valid routers: softmax, similarity, attention"),
    (dict(router_kwargs=dict(temp=1.0)), 'unknown keyword.*temp'),
    (dict(top_k=5), r'top_k must be an integer in \[1, num_experts=4\], got 5'),
    (dict(stem='resnet'), "unknown stem 'resnet'; valid: patch, conv"),
])
def test_model_kwarg_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        timm.create_model('vmoe_test', **kwargs)


@pytest.mark.parametrize('name', ['vmoe_test', 'swin_moe_test'])
def test_expert_init_fan_in(name):
    """expert_init='fan_in' draws the expert weights N(0, 1/fan_in); the default keeps timm's std 0.02."""
    torch.manual_seed(0)
    fan_in = timm.create_model(name, expert_init='fan_in', num_experts=8, num_classes=3)
    default = timm.create_model(name, num_experts=8, num_classes=3)
    for model, scale in ((fan_in, None), (default, 0.02)):
        for _, mlp in model.moe_layers():
            for w in (mlp.experts.fc1_weight, mlp.experts.fc2_weight):
                expected = w.shape[1] ** -0.5 if scale is None else scale
                assert float(w.std()) == pytest.approx(expected, rel=0.15)
    with pytest.raises(ValueError, match='expert_init'):
        timm.create_model(name, expert_init='xavier')


@pytest.mark.parametrize('patch, grid', [(7, 4), (4, 7)])
def test_conv_stem_token_grid_training_and_round_trips(patch, grid, tmp_path):
    """stem='conv' (through timm.create_model, as a YAML model kwarg would give it): ceil(img / 2^ceil(log2 patch))
    tokens a side, trains (BatchNorm in the stem), and survives deepcopy, state_dict reload and torch.export."""
    import copy
    torch.manual_seed(0)
    model = timm.create_model('vmoe_nano_patch4_32', stem='conv', patch_size=patch, img_size=28, in_chans=1,
                              num_classes=10, global_pool='avg', class_token=False, num_experts=4)
    assert model.patch_embed.grid_size == (grid, grid) and model.patch_embed.num_patches == grid * grid
    x = torch.randn(4, 1, 28, 28)
    F.cross_entropy(model(x), torch.arange(4)).backward()
    assert model.patch_embed.backbone[0].conv.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(copy.deepcopy(model)(x), expected)
        torch.save(model.state_dict(), tmp_path / 'w.pt')
        again = timm.create_model('vmoe_nano_patch4_32', stem='conv', patch_size=patch, img_size=28, in_chans=1,
                                  num_classes=10, global_pool='avg', class_token=False, num_experts=4).eval()
        again.load_state_dict(torch.load(tmp_path / 'w.pt'))
        assert torch.equal(again(x), expected)
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), expected)


@pytest.mark.parametrize('router', ['softmax', 'attention'])
def test_unfused_attention_computes_the_same_model(router):
    """fused_attn=False (explicit attention matmuls, faster on CPU at few tokens) reaches every block, MoE blocks
    included, and gives the fused model's outputs and gradients."""
    outputs = {}
    for fused in (True, False):
        torch.manual_seed(0)
        model = timm.create_model('vmoe_test', router=router, num_classes=5, fused_attn=fused).eval()
        assert all(block.attn.fused_attn is fused for block in model.blocks)
        x = torch.randn(2, *model.pretrained_cfg['input_size'], generator=torch.Generator().manual_seed(1))
        logits = model(x)
        logits.square().sum().backward()
        outputs[fused] = (logits, model.blocks[0].attn.qkv.weight.grad)
    for fused, unfused in zip(outputs[True], outputs[False], strict=True):
        torch.testing.assert_close(unfused, fused, rtol=1e-4, atol=1e-5)

"""Swin-MoE: model plumbing, the windowed routing graphs against brute-force references, upcycling, loading."""
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformer

from simoe_vision.layers import MoeMlp
from simoe_vision.models._moe import upcycle_state_dict
from simoe_vision.models.swin_moe import SwinMoE, SwinMoeBlock, swin_moe_layout

ROUTERS = ('softmax', 'similarity', 'attention')
# swin_moe_test's architecture, for the dense timm twin in the upcycling test
TEST_ARGS = dict(img_size=32, patch_size=4, window_size=2, embed_dim=8, depths=(2, 2), num_heads=(1, 2), mlp_ratio=2.,
                 num_classes=10)


def _data(batch: int = 2, size: int = 32):
    return torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))


def _gates(model: SwinMoE):
    return {name: m.router.gate.weight for name, m in model.moe_layers()}


# ---------------------------------------------------------------- layout


def test_swin_moe_layout_defaults():
    # Swin-T depths (2, 2, 6, 2): stages start at global blocks 0, 2, 4, 10. Stage 3 = blocks 4..9, odd local
    # indices 1, 3, 5 -> 5, 7, 9; stage 4 = block 10..11, local 1 -> 11.
    assert swin_moe_layout('swin_moe', (2, 2, 6, 2)) == [5, 7, 9, 11]
    # Swin-S (2, 2, 18, 2): stage 3 starts at 4 -> 5, 7, ..., 21; stage 4 starts at 22 -> 23.
    assert swin_moe_layout('swin_moe', (2, 2, 18, 2)) == list(range(5, 22, 2)) + [23]
    # two stages (swin_moe_test): both are "the last two": 0+1 and 2+1.
    assert swin_moe_layout('swin_moe', (2, 2)) == [1, 3]
    # shared V-MoE names count over all 12 blocks: odd 1..11, and the last two odd.
    assert swin_moe_layout('every2', (2, 2, 6, 2)) == [1, 3, 5, 7, 9, 11]
    assert swin_moe_layout('last2', (2, 2, 6, 2)) == [9, 11]
    assert swin_moe_layout([3, 0, 3], (2, 2)) == [0, 3]


@pytest.mark.parametrize('layout, match', [
    ('every3', 'unknown moe_layout'),
    ([4], r'out of range'),
    ([], 'selects no block'),
    (3, 'moe_layout must be'),
    ([1.5], 'moe_layout must be'),
])
def test_swin_moe_layout_errors(layout, match):
    with pytest.raises(ValueError, match=match):
        swin_moe_layout(layout, (2, 2))


def test_bad_kwargs_raise_before_building():
    with pytest.raises(ValueError, match='similarity_scope must be one of global, window'):
        timm.create_model('swin_moe_test', similarity_scope='image')
    with pytest.raises(ValueError, match='unknown moe_layout'):
        timm.create_model('swin_moe_test', moe_layout='every3')
    with pytest.raises(ValueError, match=r'out of range'):
        timm.create_model('swin_moe_test', moe_layout=[0, 7])
    with pytest.raises(ValueError, match='unknown router'):
        timm.create_model('swin_moe_test', router='hash')


def test_padding_rejected_for_window_graphs():
    # img 24 / patch 4 -> 6x6, then 3x3 in stage 2: not a multiple of the 2x2 window, so timm would pad it.
    with pytest.raises(ValueError, match=r'feature map 3x3 is not a multiple of the window 2x2'):
        timm.create_model('swin_moe_test', img_size=24, router='attention')
    with pytest.raises(ValueError, match=r"similarity_scope='global'"):
        timm.create_model('swin_moe_test', img_size=24, router='similarity', similarity_scope='window')
    # routers without a window graph accept timm's padding
    for kwargs in (dict(router='softmax'), dict(router='similarity')):
        model = timm.create_model('swin_moe_test', img_size=24, **kwargs).eval()
        assert model(torch.randn(1, 3, 24, 24)).shape == (1, 10)
    # a dynamic size is checked in forward
    model = timm.create_model('swin_moe_test', router='attention', dynamic_img_size=True).eval()
    assert model(torch.randn(1, 3, 16, 16)).shape == (1, 10)
    with pytest.raises(ValueError, match=r'feature map 3x3 is not a multiple'):
        model(torch.randn(1, 3, 24, 24))


# ---------------------------------------------------------------- registry and timm API


def test_registry_and_layout_of_full_size_models():
    names = timm.list_models('swin_moe*')
    assert names == sorted(['swin_moe_nano_patch2_window4_32', 'swin_moe_small_patch4_window7_224',
                            'swin_moe_test', 'swin_moe_tiny_patch4_window7_224'])
    expected = {
        'swin_moe_tiny_patch4_window7_224': ['layers.2.blocks.1', 'layers.2.blocks.3', 'layers.2.blocks.5',
                                             'layers.3.blocks.1'],
        'swin_moe_small_patch4_window7_224': [f'layers.2.blocks.{j}' for j in range(1, 18, 2)] + ['layers.3.blocks.1'],
        'swin_moe_nano_patch2_window4_32': ['layers.2.blocks.1', 'layers.2.blocks.3', 'layers.3.blocks.1'],
        'swin_moe_test': ['layers.0.blocks.1', 'layers.1.blocks.1'],
    }
    for name in names:
        with torch.device('meta'):
            model = timm.create_model(name, router='attention')
        assert [n for n, _ in model.moe_layers()] == [f'{b}.mlp' for b in expected[name]]
        config = timm.data.resolve_data_config({}, model=model)
        assert config['input_size'] == model.pretrained_cfg['input_size']
        assert set(config) >= {'mean', 'std', 'crop_pct', 'interpolation'}


def test_test_model_is_tiny():
    model = timm.create_model('swin_moe_test')
    assert sum(p.numel() for p in model.parameters()) < 15_000


def test_timm_api():
    model = timm.create_model('swin_moe_test', router='attention', in_chans=1).eval()
    x = torch.randn(2, 1, 32, 32)
    features = model.forward_features(x)
    assert features.shape == (2, 4, 4, 16)  # NHWC, 32 / 4 / 2 = 4, 8 * 2 channels
    assert torch.equal(model.forward_head(features), model(x))
    assert model.forward_head(features, pre_logits=True).shape == (2, 16)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    nwd = model.no_weight_decay()
    assert 'layers.1.blocks.1.mlp.experts.fc1_bias' in nwd and 'layers.1.blocks.1.mlp.experts.fc2_bias' in nwd
    assert 'layers.0.blocks.0.attn.relative_position_bias_table' in nwd
    assert 'layers.1.blocks.1.mlp.experts.fc1_weight' not in nwd
    feats = timm.create_model('swin_moe_test', features_only=True, router='attention').eval()(torch.randn(1, 3, 32, 32))
    assert [f.shape for f in feats] == [(1, 8, 8, 8), (1, 4, 4, 16)]  # NHWC, as timm's Swin


def test_non_moe_names_match_timm():
    dense_keys = set(SwinTransformer(**TEST_ARGS).state_dict())
    moe_keys = set(timm.create_model('swin_moe_test', router='attention').state_dict())
    moe_mlp = ('layers.0.blocks.1.mlp.', 'layers.1.blocks.1.mlp.')
    assert {k for k in dense_keys if not k.startswith(moe_mlp)} == {k for k in moe_keys if not k.startswith(moe_mlp)}


# ---------------------------------------------------------------- routing graphs vs brute force


def _window_structure(size, window, shift):
    """Per raster token: window id, (row, col) inside its window and shift-mask region, worked out directly from
    Swin's definition (cyclic shift by -shift, windows tile the shifted map; regions split each axis at
    H - window and H - shift)."""
    (h, w), (wh, ww), (sh, sw) = size, window, shift
    win, pos, region = [], [], []
    for i in range(h):
        for j in range(w):
            si, sj = (i - sh) % h, (j - sw) % w
            win.append((si // wh) * (w // ww) + sj // ww)
            pos.append((si % wh, sj % ww))
            ri = 0 if si < h - wh else (1 if si < h - sh else 2)
            rj = 0 if sj < w - ww else (1 if sj < w - sw else 2)
            region.append(3 * ri + rj if sh or sw else 0)
    return torch.tensor(win), torch.tensor(pos), torch.tensor(region)


def _reference_attention_graph(block: SwinMoeBlock, x: torch.Tensor) -> torch.Tensor:
    """Head-mean window attention probabilities as one (B, N, N) block-diagonal matrix in raster order."""
    batch, h, w, c = x.shape
    attn = block.attn
    heads = attn.num_heads
    q, k, _ = attn.qkv(block.norm1(x).reshape(batch, h * w, c)).reshape(batch, h * w, 3, heads, -1).unbind(2)
    logits = torch.einsum('bnhd,bmhd->bhnm', q, k) * attn.scale
    win, pos, region = _window_structure((h, w), block.window_size, block.shift_size)
    (wh, ww) = block.window_size
    rel = pos[:, None, :] - pos[None, :, :]  # (N, N, 2) row / col offsets
    table_index = (rel[..., 0] + wh - 1) * (2 * ww - 1) + rel[..., 1] + ww - 1
    logits = logits + attn.relative_position_bias_table[table_index].permute(2, 0, 1)
    logits = logits - 100.0 * (region[:, None] != region[None, :])  # timm's shift mask value
    logits = logits.masked_fill(win[:, None] != win[None, :], float('-inf'))
    return logits.softmax(dim=-1).mean(dim=1)


def _reference_similarity_graph(block: SwinMoeBlock, x_mlp: torch.Tensor, tau: float, scope: str) -> torch.Tensor:
    h, w = block.input_resolution
    xn = F.normalize(x_mlp, dim=-1)
    logits = xn @ xn.transpose(1, 2) / tau
    if scope == 'window':
        win, _, region = _window_structure((h, w), block.window_size, block.shift_size)
        logits = logits - 100.0 * (region[:, None] != region[None, :])  # wrapped-around regions: shift mask
        logits = logits.masked_fill(win[:, None] != win[None, :], float('-inf'))
    return logits.softmax(dim=-1)


def _capture(model):
    """Record each MoE block's input and its MLP's input on the next forward."""
    seen = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, SwinMoeBlock):
            for key, target in (('block', module), ('mlp', module.mlp)):
                hook = lambda m, args, k=(name, key): seen.__setitem__(k, args[0])  # noqa: E731
                handles.append(target.register_forward_pre_hook(hook))
    return seen, handles


def _sharpen(model):
    """Random weights far from init, so attention/similarity graphs are far from uniform and gates far from flat."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if 'qkv.weight' in name or 'relative_position_bias_table' in name or 'gate.weight' in name:
                p.normal_(0, 1.0)


@pytest.mark.parametrize('router, router_kwargs, scope', [
    ('attention', {}, 'global'),
    ('attention', dict(fused=False), 'global'),  # the router's dense path over the same q/k/bias
    ('similarity', dict(tau=1.0), 'window'),
    ('similarity', dict(tau=1.0), 'global'),
])
def test_routing_graph_matches_brute_force(router, router_kwargs, scope):
    # every block is a MoE block: blocks 0 / 2 are unshifted, 1 / 3 shifted (8x8 map with 16 windows, 4x4 with 4)
    model = timm.create_model('swin_moe_test', router=router, router_kwargs=router_kwargs, similarity_scope=scope,
                              moe_layout=[0, 1, 2, 3]).eval()
    _sharpen(model)
    seen, handles = _capture(model)
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    for h in handles:
        h.remove()
    shifts = []
    for name, block in model.named_modules():
        if not isinstance(block, SwinMoeBlock):
            continue
        shifts.append(block.shift_size)
        x_mlp = seen[(name, 'mlp')]
        if router == 'attention':
            graph = _reference_attention_graph(block, seen[(name, 'block')])
        else:
            graph = _reference_similarity_graph(block, x_mlp, router_kwargs['tau'], scope)
        gates = (x_mlp @ block.mlp.router.gate.weight.t()).softmax(dim=-1)
        expected = graph @ gates
        probs = block.mlp.last_routing.probs.reshape_as(expected)
        torch.testing.assert_close(probs, expected, rtol=0, atol=1e-5, msg=name)
        assert (probs - gates).abs().max() > 0.05, f'{name}: the graph left the gates unchanged; test too weak'
    assert shifts == [(0, 0), (1, 1), (0, 0), (1, 1)]


def test_window_layout_round_trip_and_order():
    block = timm.create_model('swin_moe_test', router='attention').get_submodule('layers.0.blocks.1')
    x = torch.arange(64.).reshape(1, 64, 1)  # token t carries value t
    windows = block.to_windows(x, (8, 8))
    assert windows.shape == (16, 4, 1)
    # shift 1: the first window of the rolled map holds raster rows 1-2, cols 1-2: tokens 9, 10, 17, 18
    assert windows[0, :, 0].tolist() == [9., 10., 17., 18.]
    # the last window wraps around: rows 7, 0 and cols 7, 0: tokens 63, 56, 7, 0
    assert windows[15, :, 0].tolist() == [63., 56., 7., 0.]
    torch.testing.assert_close(block.from_windows(windows, (8, 8)), x, rtol=0, atol=0)


# ---------------------------------------------------------------- upcycling


@pytest.mark.parametrize('router', ROUTERS)
def test_upcycled_model_equals_dense(router, tmp_path):
    # renormalized top-k over identical experts and no capacity drops: each MoE MLP computes exactly the dense MLP
    dense = SwinTransformer(**TEST_ARGS).eval()
    moe_kwargs = dict(router=router, router_kwargs=dict(renormalize=True), capacity_factor='dropless',
                      eval_capacity_factor='dropless')
    model = timm.create_model('swin_moe_test', **moe_kwargs).eval()
    model.load_state_dict(upcycle_state_dict(dense.state_dict(), model))
    assert all(isinstance(m, MoeMlp) for _, m in model.moe_layers())
    # the same through timm's pretrained loading of a dense checkpoint file
    path = tmp_path / 'dense_swin.pth'
    torch.save(dense.state_dict(), path)
    from_file = timm.create_model('swin_moe_test', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                                  **moe_kwargs).eval()
    x, _ = _data(4)
    with torch.no_grad():
        expected = dense(x)
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(from_file(x), expected, rtol=0, atol=1e-5)

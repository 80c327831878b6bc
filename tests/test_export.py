"""Deployment: the static-shape inference dispatch equals the sorted one; torch.export, ONNX (run in onnxruntime),
torch.compile(fullgraph=True) and torch.jit.trace compute the eager outputs at other batch sizes; export.py.

The default run keeps the eager equivalences, the trace checks, one torch.export and one ONNX export (through
export.py); exporting every family x router is in the slow set (``pytest -m slow tests/test_export.py``).
"""
import warnings

import pytest
import timm
import torch

import simoe_vision  # noqa: F401
from simoe_vision.deploy import check_export, example_images, export_program, load_runner, main
from simoe_vision.layers import MoeConfig, MoeMlp, buffer_rows, row_sources
from simoe_vision.metrics import RoutingRecorder
from simoe_vision.models import moe_layers
from simoe_vision.routers import create_router, graph

FAMILIES = ('vmoe_test', 'swin_moe_test')
ROUTERS = ('softmax', 'similarity', 'attention')
CASES = [(m, r) for m in FAMILIES for r in ROUTERS]
DATA_CONFIG = dict(input_size=(3, 32, 32), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
# eval capacity settings: the default (2.0), drops (0.5), dropless, drops with Batch Prioritized Routing and with the
# capacity shared by the batch
CAPACITY = {
    'default': dict(),
    'drops': dict(eval_capacity_factor=0.5),
    'dropless': dict(eval_capacity_factor='dropless'),
    'prioritized': dict(eval_capacity_factor=0.5, batch_prioritized=True),
    'batch_group': dict(eval_capacity_factor=0.5, capacity_group='batch'),
}
DROPS = {'drops', 'prioritized', 'batch_group'}
# 1 image with dynamic batch checks the size-1 case torch.export specialises unless told; 3 is not the example's 2
BATCHES = (1, 3)


def _model(name, router, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, router=router, **kwargs).eval()


def _images(batch, seed=1):
    return example_images(DATA_CONFIG, batch, seed=seed)


def _eager(model, x):
    with torch.no_grad():
        return model.eval()(x)


def _set_eval_dispatch(model, mode):
    for _, layer in moe_layers(model):
        layer.moe.eval_dispatch = mode


# ------------------------------------------------------------------ the static dispatch, eager

def test_buffer_rows_and_their_sources_by_hand():
    # 4 tokens, 2 experts, top-2, capacity 2 (the slots of tests/test_moe_mlp.py), two identical groups.
    # Kept: t0 e0 slot 0, t1 e0 slot 1, t2 e1 slot 0, t0 e1 slot 1; group 1's rows follow group 0's (offset 2).
    choices = torch.tensor([[0, 1], [0, 1], [1, 0], [0, 1]]).repeat(2, 1, 1)
    rows, keep = buffer_rows(choices, 2, capacity=2)
    assert rows[0].tolist() == [[0, 1], [1, 2], [0, 3], [2, 3]]
    assert (rows[1] == rows[0] + 2).all() and (keep[1] == keep[0]).all()
    assert keep[0].tolist() == [[True, True], [True, False], [True, False], [False, False]]
    sources = row_sources(choices.reshape(-1, 2), rows.reshape(-1, 2), keep.reshape(-1, 2), 2, num_rows=4)
    # 1 + token index (tokens 4..7 are group 1's), 0 = empty
    assert sources.tolist() == [[1, 2, 5, 6], [3, 1, 7, 5]]


def test_row_sources_leave_unfilled_rows_empty():
    choices = torch.tensor([[[0, 1]]])  # one token: one row of each expert filled, the others empty
    rows, keep = buffer_rows(choices, 3, capacity=2)
    assert row_sources(choices[0], rows[0], keep[0], 3, num_rows=2).tolist() == [[1, 0], [1, 0], [0, 0]]


@pytest.mark.parametrize('capacity', list(CAPACITY))
@pytest.mark.parametrize('name, router', CASES)
def test_static_dispatch_equals_sorted(name, router, capacity):
    model = _model(name, router, **CAPACITY[capacity])
    x = _images(3)
    sorted_out = _eager(model, x)
    dropped = [float(layer.last_routing.stats['dropped_fraction']) for _, layer in moe_layers(model)]
    assert all(d > 0 for d in dropped) == (capacity in DROPS), dropped
    _set_eval_dispatch(model, 'static')
    static_out = _eager(model, x)
    assert all(layer.last_routing is None for _, layer in moe_layers(model))  # the static path ran
    torch.testing.assert_close(static_out, sorted_out, rtol=0, atol=1e-5)


def test_static_dispatch_of_one_layer_with_many_experts():
    layer = MoeMlp(24, 48, num_experts=8, top_k=2, router='similarity', eval_capacity_factor=0.75).eval()
    x = torch.randn(4, 50, 24)
    with torch.no_grad():
        expected = layer(x)
        assert layer.last_routing.stats['dropped_fraction'] > 0
        layer.moe.eval_dispatch = 'static'
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-5)


def test_eval_dispatch_is_a_model_kwarg_and_training_keeps_the_sorted_path():
    model = timm.create_model('vmoe_test', eval_dispatch='static')
    assert all(layer.moe.eval_dispatch == 'static' for _, layer in moe_layers(model))
    model.train()(_images(2))
    assert all(layer.last_routing is not None for _, layer in moe_layers(model))  # losses and stats in training
    _eager(model, _images(2))
    assert model.aux_loss() is None  # the static path computes no aux loss
    with pytest.raises(ValueError, match="eval_dispatch must be one of sorted, static, got 'fast'"):
        MoeConfig(eval_dispatch='fast')


def test_router_without_losses_selects_the_same_and_computes_no_losses():
    router = create_router('similarity', 16, 4, z_loss_weight=0.1).eval()
    x = torch.randn(2, 9, 16)
    full, bare = router(x), router(x, with_losses=False)
    for field in ('indices', 'weights', 'probs'):
        assert torch.equal(getattr(full, field), getattr(bare, field))
    assert full.aux_loss > 0 and bare.aux_loss == 0 and bare.stats == {}


def test_routing_recorder_says_the_static_dispatch_keeps_no_record():
    model = _model('vmoe_test', 'softmax', eval_dispatch='static')
    with RoutingRecorder(model), pytest.raises(RuntimeError, match="blocks.1.mlp kept no routing record"):
        _eager(model, _images(2))


# ------------------------------------------------------------------ capture: trace, script, export, compile

@pytest.mark.parametrize('name', FAMILIES)
def test_jit_trace_is_correct_on_a_second_input(name):
    model = _model(name, 'attention', **CAPACITY['drops'])
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # the tracer's warnings about python values: the checks below decide
        traced = torch.jit.trace(model, _images(1, seed=0), check_trace=False)  # batch 1: no size-1 shortcut
    x = _images(5, seed=3)
    torch.testing.assert_close(traced(x), _eager(model, x), rtol=0, atol=1e-5)


def test_jit_trace_and_script_fail_clearly_where_they_would_be_wrong():
    batch_capacity = _model('vmoe_test', 'softmax', **CAPACITY['batch_group'])
    with pytest.raises(RuntimeError, match="freeze the capacity of capacity_group='batch'"):
        torch.jit.trace(batch_capacity, _images(2))
    with pytest.raises(RuntimeError, match='in training mode cannot be exported or traced'):
        torch.jit.trace(_model('vmoe_test', 'softmax').train(), _images(2))
    with pytest.raises(RuntimeError, match='torch.jit.script cannot compile MoE layers'):
        torch.jit.script(_model('vmoe_test', 'softmax'))


def _check_program(model, **kwargs):
    program = export_program(model, _images(2, seed=0))
    for batch in BATCHES:
        x = _images(batch, seed=batch)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x), _eager(model, x), rtol=0, atol=1e-5, **kwargs)


def test_torch_export_with_a_graph_large_enough_for_the_fused_kernel(monkeypatch):
    # Above the threshold eager propagation takes SDPA; an exported graph must not branch on its symbolic batch.
    monkeypatch.setattr(graph, 'DENSE_GRAPH_MAX_ENTRIES', 2 * 2 * 17 * 17)  # batch 2 explicit, batch 3 fused
    _check_program(_model('vmoe_test', 'attention', **CAPACITY['drops']))


@pytest.mark.slow
@pytest.mark.parametrize('name, router', CASES)
def test_torch_export_every_family_and_router(name, router):
    _check_program(_model(name, router, **CAPACITY['drops']))


@pytest.mark.slow
@pytest.mark.parametrize('capacity', ['dropless', 'prioritized', 'batch_group'])
def test_torch_export_capacity_settings(capacity):
    _check_program(_model('swin_moe_test', 'similarity', **CAPACITY[capacity]))


@pytest.mark.slow
@pytest.mark.parametrize('name, router', CASES)
def test_torch_compile_fullgraph_eval(name, router):
    torch._dynamo.reset()
    model = _model(name, router, **CAPACITY['drops'])
    compiled = torch.compile(model, fullgraph=True, backend='eager')
    for batch in (2, *BATCHES):
        x = _images(batch, seed=batch)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), _eager(model, x), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_torch_compile_fullgraph_inductor():
    torch._dynamo.reset()
    model = _model('vmoe_test', 'attention', **CAPACITY['drops'])
    compiled = torch.compile(model, fullgraph=True)
    x = _images(3)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), _eager(model, x), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ ONNX in onnxruntime

@pytest.mark.slow
@pytest.mark.parametrize('name, router', CASES)
def test_onnx_in_onnxruntime_every_family_and_router(name, router, tmp_path):
    model = _model(name, router, **CAPACITY['drops'])
    path = tmp_path / 'model.onnx'
    diffs = check_export(model, DATA_CONFIG, path, 'onnx', batch_sizes=BATCHES, tolerance=1e-5, threads=1)
    assert set(diffs) == set(BATCHES) and max(diffs.values()) <= 1e-5
    run = load_runner(path, 'onnx', threads=1)
    x = _images(6, seed=7)
    torch.testing.assert_close(run(x), _eager(model, x), rtol=0, atol=1e-5)


# ------------------------------------------------------------------ export.py

@pytest.fixture
def weights(tmp_path):
    """A vmoe_test state dict with the attention router (the path ONNX has most to translate: q/k graphs)."""
    path = tmp_path / 'weights.pth'
    torch.save(_model('vmoe_test', 'attention').state_dict(), path)
    return path


def _export(args, capsys):
    code = main([str(a) for a in args])
    return code, capsys.readouterr()


def test_export_py_writes_onnx_and_checks_it_in_onnxruntime(weights, tmp_path, capsys):
    out = tmp_path / 'deploy' / 'model.onnx'
    code, cap = _export(['--checkpoint', weights, '--model', 'vmoe_test', '--router', 'attention', '--output', out,
                         '--model-kwargs', '{"eval_capacity_factor": 0.5}', '--batch-sizes', '1,3',
                         '--threads', '1'], capsys)
    assert code == 0, cap.err
    assert out.is_file() and [p.name for p in out.parent.iterdir()] == ['model.onnx']
    assert 'at batch 1' in cap.out and 'at batch 3' in cap.out
    run = load_runner(out, 'onnx', threads=1)
    model = _model('vmoe_test', 'attention', **CAPACITY['drops'])
    model.load_state_dict(torch.load(weights))
    x = _images(2, seed=9)
    torch.testing.assert_close(run(x), _eager(model, x), rtol=0, atol=1e-5)


def test_export_py_refuses_a_file_that_differs_from_eager(weights, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr('simoe_vision.deploy.export.max_differences', lambda *a, **k: {1: 0.0, 4: 0.5})
    out = tmp_path / 'model.pt2'
    code, cap = _export(['--checkpoint', weights, '--model', 'vmoe_test', '--router', 'attention', '--format',
                         'export', '--output', out], capsys)
    assert code == 2
    assert cap.err.strip() == (f'error: the exported model differs from eager by 0.5 at batch 4 (more than the '
                               f'tolerance 0.0001); {out} was not written')
    assert list(tmp_path.iterdir()) == [weights]


@pytest.mark.parametrize('extra, message', [
    (['--batch-sizes', '0,2'], '--batch-sizes must be positive integers'),
    (['--tolerance', '0'], '--tolerance must be > 0'),
    (['--format', 'tflite'], "invalid choice: 'tflite'"),
    (['--model-kwargs', '{"batch_prioritized": true}'], 'batch_prioritized=True cannot go to ONNX'),
])
def test_export_py_bad_inputs_are_one_line(weights, tmp_path, capsys, extra, message):
    code, cap = _export(['--checkpoint', weights, '--model', 'vmoe_test', '--router', 'attention', '--output',
                         tmp_path / 'm.onnx'] + extra, capsys)
    assert code == 2 and message in cap.err and len(cap.err.strip().splitlines()) == 1
    assert not (tmp_path / 'm.onnx').exists()


def test_export_py_missing_checkpoint(tmp_path, capsys):
    code, cap = _export(['--checkpoint', tmp_path / 'nope', '--model', 'vmoe_test'], capsys)
    assert code == 2 and cap.err.startswith('error: checkpoint') and len(cap.err.strip().splitlines()) == 1


"""Performance paths: fused (O(N)) graph propagation == explicit, the flash kernel is what runs, sorted expert
dispatch == batched experts, bf16 autocast, torch.compile, and a reduced in-process benchmark run."""
import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from simoe_vision.layers import Experts, MoeMlp
from simoe_vision.routers import TokenGraph, graph, similarity_graph

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def always_flash(monkeypatch):
    """Make fused propagation use the flash kernel even for the small graphs of these tests."""
    monkeypatch.setattr(graph, 'DENSE_GRAPH_MAX_ENTRIES', 0)


def _propagate_both(make_graph, values: torch.Tensor, leaves: list[torch.Tensor]):
    """(output, grads of leaves) for the fused and the explicit (dense N x N) propagation."""
    results = []
    for fused in (True, False):
        for t in leaves:
            t.grad = None
        out = make_graph().propagate(values, fused=fused)
        out.square().sum().backward()  # sharper or flatter graphs change it: no cancellation in the tau grad
        results.append((out.detach(), [t.grad.clone() for t in leaves]))
    return results


def _assert_grads_close(fused: list[torch.Tensor], explicit: list[torch.Tensor]) -> None:
    # Gradients are sums over N^2 terms accumulated in another order by the flash kernel: rtol 1e-4 (the learnable
    # tau's gradient, a sum over all B N^2 pairs, differs by ~2e-5 relative); outputs are held to 1e-5.
    for a, b in zip(fused, explicit, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize('kind', ['cosine', 'dot'])
@pytest.mark.parametrize('dim, num_experts', [(24, 8), (8, 32)])  # E < d pads v; E > d pads q/k
@pytest.mark.parametrize('learnable_tau', [False, True])
def test_fused_similarity_equals_explicit(always_flash, kind, dim, num_experts, learnable_tau):
    x = torch.randn(3, 50, dim, requires_grad=True)
    gates = torch.randn(3, 50, num_experts).softmax(-1).requires_grad_()
    tau = torch.tensor(0.1, requires_grad=True) if learnable_tau else 0.1
    leaves = [x, gates] + ([tau] if learnable_tau else [])
    make_graph = lambda: similarity_graph(x, tau, kind)  # noqa: E731
    (fused, fused_grads), (explicit, explicit_grads) = _propagate_both(make_graph, gates, leaves)
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-5)
    _assert_grads_close(fused_grads, explicit_grads)


@pytest.mark.parametrize('mask', ['bias', 'bias+shift_mask', 'bool_like_-inf'])
def test_fused_attention_graph_with_bias_equals_explicit(always_flash, mask):
    # Swin-style: 4 windows of 16 tokens, 3 heads, a per-head relative-position bias and a shift mask that blocks
    # attention between regions (Swin uses -100; -inf must work too, as long as no row is fully masked).
    windows, heads, n, dh = 4, 3, 16, 8
    q = torch.randn(windows, heads, n, dh, requires_grad=True)
    k = torch.randn(windows, heads, n, dh, requires_grad=True)
    bias = torch.randn(1, heads, n, n, requires_grad=True)
    region = (torch.arange(n) >= n // 2).long()
    blocked = (region[:, None] != region[None, :]).view(1, 1, n, n)

    def make_graph() -> TokenGraph:
        if mask == 'bias':
            full_bias = bias
        elif mask == 'bias+shift_mask':
            full_bias = bias + blocked.float() * -100.0
        else:
            full_bias = bias.masked_fill(blocked, float('-inf'))
        return TokenGraph(q=q, k=k, scale=dh ** -0.5, bias=full_bias)

    values = torch.randn(windows, n, 8).softmax(-1).requires_grad_()
    (fused, fused_grads), (explicit, explicit_grads) = _propagate_both(make_graph, values, [q, k, bias, values])
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-5)
    _assert_grads_close(fused_grads, explicit_grads)
    if mask != 'bias':  # the mask really cuts the graph: rows of region 0 get nothing from region 1
        dense = make_graph().dense()
        assert dense[:, : n // 2, n // 2:].max() < 1e-30


def _sdpa_kernels(fn) -> set[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages() if 'scaled_dot_product' in e.key}


@pytest.mark.parametrize('dim, num_experts', [(24, 8), (8, 32)])
def test_fused_propagation_runs_the_flash_kernel_forward_and_backward(always_flash, dim, num_experts):
    # The math fallback would materialise the N x N graph; the flash kernel keeps memory O(N). Without padding to a
    # common head dim, SDPA silently takes the math path.
    x = torch.randn(2, 40, dim, requires_grad=True)
    gates = torch.randn(2, 40, num_experts).softmax(-1)
    kernels = _sdpa_kernels(lambda: similarity_graph(x, 0.1).propagate(gates).sum().backward())
    assert any('flash_attention' in name and 'backward' not in name for name in kernels), kernels
    assert any('flash_attention' in name and 'backward' in name for name in kernels), kernels
    assert not any('math' in name for name in kernels), kernels


def test_small_graphs_propagate_explicitly_large_ones_fused(monkeypatch):
    # 2 graphs x 1 head x 40^2 nodes = 3200 entries: at the limit -> explicit matmul, one below -> flash kernel.
    monkeypatch.setattr(graph, 'DENSE_GRAPH_MAX_ENTRIES', 3200)
    x, gates = torch.randn(2, 40, 8), torch.randn(2, 40, 4).softmax(-1)
    assert _sdpa_kernels(lambda: similarity_graph(x, 0.1).propagate(gates)) == set()
    monkeypatch.setattr(graph, 'DENSE_GRAPH_MAX_ENTRIES', 3199)
    assert any('flash' in k for k in _sdpa_kernels(lambda: similarity_graph(x, 0.1).propagate(gates)))


def test_experts_forward_grouped_equals_batched():
    experts = Experts(3, 6, 10, 5)
    x = torch.randn(3, 4, 6)
    grouped = experts.forward_grouped(x.flatten(0, 1), [4, 4, 4])
    torch.testing.assert_close(grouped, experts(x).flatten(0, 1))
    uneven = experts.forward_grouped(x[:, :2].flatten(0, 1)[:5], [2, 2, 1])  # rows 0-1 -> e0, 2-3 -> e1, 4 -> e2
    torch.testing.assert_close(uneven[4], experts(x[:, :1])[2, 0])
    with pytest.raises(ValueError, match='counts must give the rows of each of the 3 experts and sum to 5'):
        experts.forward_grouped(x.flatten(0, 1)[:5], [2, 2])


@pytest.mark.parametrize('router', ['softmax', 'similarity', 'attention'])
def test_bf16_autocast_forward_backward(router):
    moe = MoeMlp(16, 32, num_experts=4, top_k=2, router=router, capacity_factor='dropless',
                 eval_capacity_factor='dropless')
    x = torch.randn(2, 12, 16, requires_grad=True)
    q = torch.randn(2, 2, 12, 8)
    graph = TokenGraph(q=q, k=q, scale=8 ** -0.5) if router == 'attention' else None
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = moe.eval()(x, graph)
    reference = moe(x, graph)
    assert out.dtype == torch.bfloat16 and moe.last_routing.probs.dtype == torch.float32
    torch.testing.assert_close(out.float(), reference, atol=2e-2, rtol=5e-2)  # bf16 keeps ~3 significant digits
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = moe.train()(x, graph)
    out.float().square().sum().backward()
    for p in (x, moe.router.gate.weight, moe.experts.fc1_weight, moe.experts.fc2_weight):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_torch_compile_tiny_moe_matches_eager():
    # aot_eager traces with dynamo and AOTAutograd (where graph breaks and tracing errors come from) without the
    # inductor C++ build, which takes ~100 s on 2 cores; benchmark.py --compile exercises inductor.
    torch._dynamo.reset()
    moe = MoeMlp(8, 16, num_experts=4, top_k=2, router='similarity').eval()
    x = torch.randn(2, 6, 8, requires_grad=True)
    compiled = torch.compile(moe, backend='aot_eager')
    out = compiled(x)
    torch.testing.assert_close(out, moe(x))
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def _load_benchmark():
    spec = importlib.util.spec_from_file_location('simoe_benchmark', ROOT / 'benchmark.py')
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_benchmark_smoke_in_process(tmp_path):
    bench = _load_benchmark()
    results = bench.main(['--smoke', '--output', str(tmp_path), '--no-rich'])
    rows = {(r['suite'], r['variant']): r for r in results}
    assert ('model_train', 'vit_dense') in rows and ('router', 'similarity') in rows
    for r in results:
        if r['suite'].startswith('model') and 'img_s' in r:
            assert r['img_s'] > 0 and math.isfinite(r['img_s'])
    assert (tmp_path / 'results.csv').stat().st_size > 0
    assert '| ' in (tmp_path / 'results.md').read_text()


@pytest.mark.slow
def test_benchmark_deploy_suite(tmp_path):
    bench = _load_benchmark()
    results = bench.main(['--suites', 'deploy', '--deploy-models', 'vmoe_test', '--num-experts', '4', '--batch-size',
                          '2', '--rounds', '1', '--warmup', '0', '--threads', '1', '--no-rich'])
    rows = {r['variant']: r for r in results}
    assert set(rows) == {'eager', 'eager_static', 'onnxruntime'}
    assert rows['onnxruntime']['max_diff'] <= 1e-5 and rows['eager']['time_vs_eager'] == 1.0
    assert all(r['img_s'] > 0 and r['model'] == 'vmoe_test' for r in results)


def test_benchmark_layer_suite_rows_and_targets(capsys):
    """--suites layer: every variant in every precision at the given shape, FLOP ratios from the fp32 step, and the
    (d)/(e) targets computed from the run's own rows (marked met or not)."""
    bench = _load_benchmark()
    results = bench.main(['--suites', 'layer', '--layer-shapes', '2:9:16:32:4,1:9:16:32:32', '--rounds', '3',
                          '--warmup', '0', '--threads', '1', '--precisions', 'fp32,bf16,bf16w', '--allow-slow-bf16',
                          '--no-rich'])
    timed = [r for r in results if 'step_ms' in r]
    assert {(r['variant'], r['precision']) for r in timed} == {
        (v, p) for v in ('dense_mlp', 'ours', 'ours_dropless', 'naive_loop') for p in ('fp32', 'bf16', 'bf16w')}
    for r in timed:
        assert r['step_ms'] > 0 and len(r['round_ms']) == 3
        assert r['step_ms'] == pytest.approx(sorted(r['round_ms'])[1])  # the median round
        assert r['flops_vs_dense'] == (1.0 if r['variant'] == 'dense_mlp' else pytest.approx(2.0, rel=0.25))
    found = bench.targets(results)
    names = [t.name for t in found]
    assert sum(n.startswith('(d)') for n in names) == 4  # bf16 and bf16w at both shapes
    assert any(n.startswith('(e) ours / naive_loop') for n in names)  # the E = 32 shape
    for t in found:  # the ratio of medians lies within the paired rounds' range
        assert t.spread[0] <= t.value * (1 + 1e-9) and t.value <= t.spread[1] * (1 + 1e-9)
    out = capsys.readouterr().out
    assert '| target | value | rounds | limit | met | detail |' in out


def test_layer_targets_mark_met_and_not_met():
    bench = _load_benchmark()
    shape = '1x9x16, h 32, E 32'
    rows = [dict(variant='ours', shape=shape, precision='bf16', step_ms=10.0, time_vs_dense=2.0, flops_vs_dense=2.0),
            dict(variant='naive_loop', shape=shape, precision='bf16', step_ms=8.0, time_vs_ours=0.8)]
    by_name = {t.name.split(',')[0]: t for t in bench.layer_targets(rows)}
    ratio = by_name['(d) MoE layer / dense Mlp vs FLOP ratio']
    assert ratio.value == 1.0 and ratio.met and ratio.spread is None and ratio.verdict() == 'met'
    assert by_name['(e) ours / naive_loop'].value == pytest.approx(1.25) and not by_name['(e) ours / naive_loop'].met


def test_target_spread_is_the_paired_rounds_range():
    """(d) from rounds of 12 / 10 / 9 ms (ours) over 5 / 5 / 3 ms (dense), FLOP ratio 2: per-round ratios 1.2, 1.0 and
    1.5, so the spread is 1.0-1.5; the median ratio (10 / 5) / 2 = 1.0 is met, with rounds on both sides of 1.10."""
    bench = _load_benchmark()
    shape = '1x9x16, h 32, E 8'
    rows = [dict(variant='dense_mlp', shape=shape, precision='bf16', step_ms=5.0, round_ms=[5.0, 5.0, 3.0]),
            dict(variant='ours', shape=shape, precision='bf16', step_ms=10.0, round_ms=[12.0, 10.0, 9.0],
                 time_vs_dense=2.0, flops_vs_dense=2.0)]
    (target,) = bench.layer_targets(rows)
    assert target.value == 1.0 and target.spread == (pytest.approx(1.0), pytest.approx(1.5))
    assert target.verdict() == 'met (rounds on both sides)' and target.spread_text() == '1.000-1.500'


def test_paired_ratio_range_hand_worked():
    from simoe_vision.perf import medians, paired_ratio_range
    assert paired_ratio_range([2.0, 3.0, 6.0], [1.0, 2.0, 2.0]) == (1.5, 3.0)
    assert medians({'a': [3.0, 1.0, 2.0]}) == {'a': 2.0}
    with pytest.raises(ValueError):
        paired_ratio_range([1.0, 2.0], [1.0])  # rounds must pair up
    with pytest.raises(ValueError):
        paired_ratio_range([], [])


def test_benchmark_refuses_what_it_cannot_apply(capsys):
    bench = _load_benchmark()
    for argv, message in ((['--suites', 'model', '--precisions', 'bf16w'], 'bf16w is for the layer suite only'),
                          (['--precisions', 'fp8'], 'unknown fp8'),
                          (['--suites', 'layer', '--layer-shapes', '32:197'], 'B:N:d:hidden:E')):
        with pytest.raises(SystemExit) as exit_info:
            bench.parse_args(argv)
        error = capsys.readouterr().err.splitlines()
        assert exit_info.value.code == 2 and len(error) == 1 and message in error[0]


@pytest.mark.parametrize('fast', [True, False])
def test_benchmark_bf16_only_where_the_cpu_has_kernels(monkeypatch, capsys, fast):
    """Default precisions take bf16 only on a CPU with bf16 matmul kernels; an explicit bf16 there is refused in one
    line naming the fix (exit 2) unless --allow-slow-bf16 asks for the fallback's timings anyway."""
    bench = _load_benchmark()
    monkeypatch.setattr(bench, 'has_fast_bf16_matmul', lambda device: fast)
    assert bench.parse_args([]).precisions == (['fp32', 'bf16'] if fast else ['fp32'])
    assert bench.parse_args(['--allow-slow-bf16']).precisions == ['fp32', 'bf16']
    assert bench.parse_args(['--suites', 'layer', '--precisions', 'bf16w', '--allow-slow-bf16']).precisions == ['bf16w']
    for argv in (['--precisions', 'fp32,bf16'], ['--suites', 'layer', '--precisions', 'bf16w']):
        if fast:
            assert bench.parse_args(argv).precisions == argv[-1].split(',')
            continue
        with pytest.raises(SystemExit) as exit_info:
            bench.parse_args(argv)
        error = capsys.readouterr().err.splitlines()
        assert exit_info.value.code == 2 and len(error) == 1
        error = error[0]
        assert 'no bf16 matmul kernels' in error and '--precisions fp32' in error and '--allow-slow-bf16' in error


@pytest.mark.parametrize('mkldnn, amx, avx512_bf16, kernel', [
    (False, False, False, 'none'), (True, True, True, 'amx'), (True, False, True, 'avx512-bf16'),
    (True, False, False, 'avx512 (emulated)')])
def test_bf16_matmul_kernel_from_the_cpu_flags(monkeypatch, mkldnn, amx, avx512_bf16, kernel):
    from simoe_vision.perf import hardware
    monkeypatch.setattr(torch.ops.mkldnn, '_is_mkldnn_bf16_supported', lambda: mkldnn)
    monkeypatch.setattr(torch.cpu, '_is_amx_tile_supported', lambda: amx)
    monkeypatch.setattr(torch.cpu, '_is_avx512_bf16_supported', lambda: avx512_bf16)
    assert hardware.bf16_matmul_kernel() == kernel
    assert hardware.has_fast_bf16_matmul('cpu') is (kernel != 'none')
    assert f'bf16 matmul: {kernel}' in hardware.describe_cpu() and hardware.cpu_name() in hardware.describe_cpu()


def test_keep_freed_memory_applies_or_opts_out(monkeypatch):
    """glibc/Linux: mallopt accepted (True); SIMOE_DEFAULT_MALLOC=1: left alone (False), mallopt never called."""
    import ctypes

    from simoe_vision.perf import allocator
    monkeypatch.setenv(allocator.OPT_OUT, '1')
    monkeypatch.setattr(ctypes, 'CDLL', lambda *a, **k: pytest.fail('mallopt called despite the opt-out'))
    assert allocator.keep_freed_memory() is False
    monkeypatch.undo()
    monkeypatch.delenv(allocator.OPT_OUT, raising=False)
    assert allocator.keep_freed_memory() is sys.platform.startswith('linux')

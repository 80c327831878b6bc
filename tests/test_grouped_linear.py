"""grouped_linear (the sorted dispatch's expert GEMMs): values and gradients against plain per-expert autograd, empty
experts, the bf16 grouped kernel, and no per-expert restacking of weight gradients in the backward graph."""
import pytest
import torch

from simoe_vision.layers import MoeMlp
from simoe_vision.layers.experts import Experts
from simoe_vision.layers.grouped_linear import grouped_linear, uses_grouped_mm

COUNTS = [3, 0, 5, 8]  # expert 1 gets no rows


def _problem(dtype, features=(8, 16)):
    g = torch.Generator().manual_seed(0)
    rows, (fin, fout) = sum(COUNTS), features
    x = torch.randn(rows, fin, generator=g).to(dtype).requires_grad_()
    w = torch.randn(len(COUNTS), fin, fout, generator=g).to(dtype).requires_grad_()
    b = torch.randn(len(COUNTS), 1, fout, generator=g).to(dtype).requires_grad_()
    return x, w, b, torch.randn(rows, fout, generator=g).to(dtype)


def _reference(x, w, b, grad):
    """Per-expert autograd in fp64: each expert's rows times its weight plus its bias."""
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    out = torch.cat([rows @ w64[e] + b64[e] for e, rows in enumerate(x64.split(COUNTS))])
    out.backward(grad.double())
    return out, x64.grad, w64.grad, b64.grad


@pytest.mark.parametrize('dtype, tol, grouped', [(torch.float32, 1e-5, False), (torch.bfloat16, 5e-2, False),
                                                (torch.bfloat16, 5e-2, True)])
def test_values_and_gradients_match_per_expert_autograd(dtype, tol, grouped):
    x, w, b, grad = _problem(dtype)
    out = grouped_linear(x, w, b, COUNTS, grouped=grouped)  # grouped=True: the CUDA kernel, exercised on CPU
    out.backward(grad)
    ref_out, ref_x, ref_w, ref_b = _reference(x, w, b, grad)
    for actual, expected in ((out, ref_out), (x.grad, ref_x), (w.grad, ref_w), (b.grad, ref_b)):
        assert actual.dtype == dtype
        torch.testing.assert_close(actual.double(), expected, rtol=tol, atol=tol * expected.abs().max().item())
    assert torch.equal(w.grad[1], torch.zeros_like(w.grad[1]))  # an expert without rows gets a zero gradient
    assert torch.equal(b.grad[1], torch.zeros_like(b.grad[1]))


@pytest.mark.parametrize('grouped', [False, True])
def test_fp32_master_weights_are_cast_inside_and_get_fp32_gradients(grouped):
    """Under autocast the experts pass fp32 weights with bf16 rows: the same outputs and gradient values as bf16
    weights given the same way, the gradients in fp32."""
    x, w, b, grad = _problem(torch.bfloat16)
    w32, b32 = (t.detach().float().requires_grad_() for t in (w, b))
    x32in = x.detach().clone().requires_grad_()
    out = grouped_linear(x, w, b, COUNTS, grouped=grouped)
    out.backward(grad)
    out_mixed = grouped_linear(x32in, w32, b32, COUNTS, grouped=grouped)
    out_mixed.backward(grad)
    assert out_mixed.dtype == torch.bfloat16 and torch.equal(out_mixed, out)
    assert torch.equal(x32in.grad, x.grad)
    for master, low in ((w32, w), (b32, b)):
        assert master.grad.dtype == torch.float32 and torch.equal(master.grad, low.grad.float())


def test_hand_worked_two_experts():
    x = torch.tensor([[1., 2.], [3., 4.], [5., 6.]])
    w = torch.stack([torch.eye(2), torch.tensor([[0., 1.], [1., 0.]])])  # expert 0 identity, expert 1 swaps
    b = torch.tensor([[[0., 0.]], [[10., 20.]]])
    assert grouped_linear(x, w, b, [1, 2]).tolist() == [[1., 2.], [14., 23.], [16., 25.]]


def test_grouped_kernel_flops_are_counted_like_the_loop():
    """FlopCounterMode knows no ``_grouped_mm`` in torch 2.14: with our formula the grouped kernel's train step
    counts what the per-expert loop's GEMMs count, 3 x 2 x 16 rows x 8 x 16 = 12288 (forward, input and weight
    gradients; biases and empty experts add no GEMM FLOPs), and the 2-D x 3-D / 2-D x 2-D / 3-D x 3-D forms by hand."""
    from torch.utils.flop_counter import FlopCounterMode

    from simoe_vision.models.summary import grouped_mm_flops, register_flop_formulas
    register_flop_formulas()
    flops = {}
    for grouped in (False, True):
        x, w, b, grad = _problem(torch.bfloat16)
        with FlopCounterMode(display=False) as counter:
            grouped_linear(x, w, b, COUNTS, grouped=grouped).backward(grad)
        flops[grouped] = counter.get_total_flops()
    assert flops[True] == flops[False] == 3 * 2 * 16 * 8 * 16
    assert grouped_mm_flops((10, 4), (3, 4, 6), out_shape=(10, 6)) == 2 * 10 * 4 * 6  # rows x expert weights
    assert grouped_mm_flops((4, 10), (10, 6), out_shape=(3, 4, 6)) == 2 * 4 * 10 * 6  # weight gradient
    assert grouped_mm_flops((3, 5, 4), (3, 4, 6), out_shape=(3, 5, 6)) == 2 * 3 * 5 * 4 * 6  # batched


def test_kernel_choice():
    x, w, _, _ = _problem(torch.bfloat16)
    assert not uses_grouped_mm(x, w)  # CPU: the loop (bias fused into the GEMM) measured faster
    assert not uses_grouped_mm(x.float(), w.float())
    x, w, _, _ = _problem(torch.bfloat16, features=(6, 7))
    with pytest.raises(ValueError, match='multiples of 16 bytes'):  # strides _grouped_mm rejects
        grouped_linear(x, w, None, COUNTS, grouped=True)
    with pytest.raises(ValueError, match='bf16/fp16'):
        grouped_linear(x.float(), w.float(), None, COUNTS, grouped=True)


def _graph_nodes(tensor):
    seen, stack = set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack += [n for n, _ in node.next_functions]
    return [type(n).__name__ for n in seen]


@pytest.mark.parametrize('amp', [False, True])
def test_backward_has_no_per_expert_weight_slicing(amp):
    """The weight gradients are written in place: no unbind/stack, select or cast nodes in the graph."""
    experts = Experts(32, 16, 32, 16)
    x = torch.randn(64, 16)
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=amp):
        out = experts.forward_grouped(x, [2] * 32)
    nodes = _graph_nodes(out)
    assert '_GroupedLinearBackward' in nodes
    assert not set(nodes) & {'UnbindBackward0', 'StackBackward0', 'SelectBackward0', 'CatBackward0'}
    assert not [n for n in nodes if n.startswith('ToCopyBackward')]  # under autocast grouped_linear casts itself


def test_moe_layer_under_autocast_trains_in_bf16_with_fp32_routing():
    torch.manual_seed(0)
    layer = MoeMlp(16, 32, num_experts=4, top_k=2)
    x = torch.randn(2, 8, 16, requires_grad=True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    assert layer.last_routing.probs.dtype == torch.float32  # the routing math stays fp32
    out.float().sum().backward()
    assert layer.experts.fc1_weight.grad.dtype == torch.float32
    assert layer.experts.fc1_weight.grad.abs().sum() > 0 and x.grad.abs().sum() > 0


def test_padded_rows_give_the_unpadded_results(monkeypatch):
    """bf16 on CPU pads each expert's rows with zero rows to a multiple (GEMM shapes that repeat, see row_multiple):
    outputs and gradients equal those of the exact rows."""
    import simoe_vision.layers.moe_mlp as moe_mlp
    assert moe_mlp.row_multiple(torch.bfloat16, torch.device('cpu')) > 1
    assert moe_mlp.row_multiple(torch.float32, torch.device('cpu')) == 1
    torch.manual_seed(0)
    layer = MoeMlp(16, 32, num_experts=4, top_k=2, capacity_factor=1.25)
    x = torch.randn(3, 10, 16)
    results = []
    for multiple in (1, 8):
        monkeypatch.setattr(moe_mlp, 'row_multiple', lambda dtype, device, m=multiple: m)
        torch.manual_seed(1)  # the same router noise
        xi = x.clone().requires_grad_()
        layer.zero_grad()
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = layer(xi)
        out.float().square().sum().backward()
        results.append((out, xi.grad, layer.experts.fc1_weight.grad, layer.experts.fc2_bias.grad))
    for padded, exact in zip(*results, strict=True):
        torch.testing.assert_close(padded, exact, rtol=1e-2, atol=1e-2)

"""Markdown table of the registered simoe_vision models: total params, active params per token, GMACs.

Run ``python -m simoe_vision.models.summary`` (the README's table comes from it). GMACs are counted by
``torch.utils.flop_counter`` on one image at the model's default input size, in eval mode with capacity factor 1.0
(each expert's buffer holds ``k N / E`` tokens: the nominal sparse compute, router and graph propagation included).
"""
from __future__ import annotations

import argparse
import math
from typing import Dict, List, Sequence

import timm
import torch
from torch.utils.flop_counter import (
    FlopCounterMode,
    flop_registry,
    register_flop_formula,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

from . import count_params

__all__ = ['grouped_mm_flops', 'register_flop_formulas', 'model_rows', 'main']

aten = torch.ops.aten


def grouped_mm_flops(a_shape: Sequence[int], b_shape: Sequence[int], *args, out_shape: Sequence[int],
                     **kwargs) -> int:
    """FLOPs of ``torch._grouped_mm(a, b, offs)``: every row of the reduction meets one group's matrix, so
    2 x (output entries) x K, except a 2-D x 2-D call (groups along the reduction, output (G, m, n)): 2 x m x K x n.
    Counts the whole of ``a`` (exact when the offsets end at its last row, as the sorted dispatch's do)."""
    if len(a_shape) == 2 and len(b_shape) == 2:
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]
    return 2 * math.prod(out_shape) * a_shape[-1]


def register_flop_formulas() -> None:
    """Teach FlopCounterMode what torch 2.14 leaves uncounted: the CPU flash-attention kernels (timm attention, graph
    routing; it counts the CUDA ones only) and ``torch._grouped_mm`` (our CUDA expert GEMMs, torchtitan's MoE)."""
    if aten._scaled_dot_product_flash_attention_for_cpu not in flop_registry:
        @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
        def _fwd(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return sdpa_flop_count(query_shape, key_shape, value_shape)

    if aten._scaled_dot_product_flash_attention_for_cpu_backward not in flop_registry:
        @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
        def _bwd(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)

    if hasattr(aten, '_grouped_mm') and aten._grouped_mm not in flop_registry:
        register_flop_formula(aten._grouped_mm)(grouped_mm_flops)


def model_rows(names: List[str], router: str = 'softmax') -> List[Dict[str, object]]:
    register_flop_formulas()
    rows = []
    for name in names:
        model = timm.create_model(name, router=router, eval_capacity_factor=1.0).eval()
        total, active = count_params(model)
        x = torch.randn(1, *model.pretrained_cfg['input_size'])
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(x)
        rows.append({'model': name, 'input': 'x'.join(str(s) for s in x.shape[1:]), 'params_m': total / 1e6,
                     'active_params_m': active / 1e6, 'gmacs': counter.get_total_flops() / 2e9,
                     'moe_layers': len(model.moe_layers()), 'experts': model.moe_config.num_experts,
                     'top_k': model.moe_config.top_k})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--filter', nargs='*', default=['vmoe_*', 'swin_moe_*'], help='timm name patterns')
    parser.add_argument('--router', default='softmax', help='router for the GMAC count (graph routers add a little)')
    args = parser.parse_args()
    rows = model_rows(timm.list_models(args.filter), args.router)
    print('| model | input | MoE layers | experts (top-k) | params (M) | active params / token (M) | GMACs |')
    print('|---|---|---|---|---|---|---|')
    for r in rows:
        print(f"| `{r['model']}` | {r['input']} | {r['moe_layers']} | {r['experts']} ({r['top_k']}) | "
              f"{r['params_m']:.2f} | {r['active_params_m']:.2f} | {r['gmacs']:.4g} |")


if __name__ == '__main__':
    main()

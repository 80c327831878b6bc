#!/usr/bin/env python3
"""Benchmark expert parallelism against DDP: train-step time, the all-to-all cost and the memory per process.

Each variant (``--ep 1`` is DDP: every process holds every expert) trains the same model on the same per-process
batch in W processes and reports, from rank 0: the median train step (forward, cross-entropy, backward, expert
gradient reduction, AdamW step), the all-to-all cost (one ``all_to_all_single`` of a MoE layer's payload — the kept
(token, expert) rows of width d, measured at the model's own routing — times the 4 a layer runs per step, forward
and backward, each way), the parameter + gradient + optimizer bytes a process holds, and its peak memory (CPU: peak
RSS; GPU: ``torch.cuda.max_memory_allocated``). Started without torchrun it spawns ``--nproc`` gloo processes per
variant (a fresh set each, so peak RSS is the variant's own); under torchrun it runs the variants in the launched
processes (nccl on GPUs; compare peak memory across invocations, one ``--ep`` each).

    python benchmark_ep.py --nproc 2                                   # CPU gloo: DDP vs EP 2
    python benchmark_ep.py --nproc 4 --ep 1,2,4 --num-experts 16
    torchrun --nproc_per_node 8 benchmark_ep.py --ep 8 --model vmoe_small_patch16_224 --batch-size 64
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
from datetime import timedelta
from typing import Any, Callable, Dict, List, Optional, Sequence

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('NO_ALBUMENTATIONS_UPDATE', '1')

import timm  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

import simoe_vision  # noqa: E402,F401  (registers the models)
from simoe_vision.layers import exclude_from_ddp, reduce_expert_gradients  # noqa: E402
from simoe_vision.models import moe_layers  # noqa: E402

COLUMNS = {'ep': '{}', 'world': '{}', 'step_ms': '{:.0f}', 'img_s': '{:.1f}', 'a2a_ms': '{:.1f}',
           'a2a_share': '{:.3f}', 'state_mib': '{:.1f}', 'peak_mib': '{:.0f}'}
MIB = 2 ** 20


def _synced_median_ms(fn: Callable[[], Any], warmup: int, iters: int, device: torch.device) -> float:
    """Median wall time of ``fn`` over ``iters`` calls, every process starting each call together."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        dist.barrier()
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _state_mib(model: nn.Module, optimizer: torch.optim.Optimizer) -> float:
    """Parameters, gradients and optimizer state this process holds."""
    tensors = [p for p in model.parameters()] + [p.grad for p in model.parameters() if p.grad is not None]
    tensors += [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors) / MIB


def _peak_mib(device: torch.device) -> float:
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / MIB
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith('VmHWM:')) / 1024


def _payloads(model: nn.Module) -> List[tuple[int, int]]:
    """(kept (token, expert) rows, width) each MoE layer dispatched in the last forward."""
    return [(round((1 - float(m.last_routing.stats['dropped_fraction'])) * m.last_routing.indices.numel()),
             m.router.dim) for _, m in moe_layers(model)]


def _all_to_all_ms(rows: int, width: int, device: torch.device, iters: int) -> float:
    """One all-to-all of ``rows`` rows of ``width`` floats, spread evenly over the processes."""
    world = dist.get_world_size()
    rows -= rows % world
    payload = torch.randn(rows, width, device=device)
    out = torch.empty_like(payload)
    return _synced_median_ms(lambda: dist.all_to_all_single(out, payload), 1, iters, device)


def measure(args: argparse.Namespace, ep: int, device: torch.device) -> Dict[str, Any]:
    """One variant in the current process group; the numbers of this process (rank 0's are reported)."""
    torch.manual_seed(0)
    model = timm.create_model(args.model, num_experts=args.num_experts, expert_parallel_size=ep).to(device)
    exclude_from_ddp(model)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    side = model.pretrained_cfg['input_size'][-1]
    images = torch.randn(args.batch_size, 3, side, side, device=device)
    targets = torch.randint(0, model.num_classes, (args.batch_size,), device=device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            loss = F.cross_entropy(ddp(images), targets)
        loss.backward()
        reduce_expert_gradients(model)
        optimizer.step()

    step_ms = _synced_median_ms(step, args.warmup, args.steps, device)
    a2a_ms = 0.0
    if ep > 1:  # forward and backward each send the rows out and back: 4 all-to-alls per layer and step
        a2a_ms = 4 * sum(_all_to_all_ms(rows, width, device, args.steps) for rows, width in _payloads(model))
    return {'ep': ep, 'world': dist.get_world_size(), 'step_ms': step_ms,
            'img_s': 1e3 * args.batch_size * dist.get_world_size() / step_ms, 'a2a_ms': a2a_ms,
            'a2a_share': a2a_ms / step_ms, 'state_mib': _state_mib(model, optimizer), 'peak_mib': _peak_mib(device)}


def _device() -> torch.device:
    if torch.cuda.is_available():
        device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', '0')))
        torch.cuda.set_device(device)
        return device
    return torch.device('cpu')


def _spawned(rank: int, world: int, port: int, args: argparse.Namespace, ep: int, out: Dict[str, Any]) -> None:
    torch.set_num_threads(args.threads)
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=world,
                            timeout=timedelta(minutes=10))
    try:
        row = measure(args, ep, torch.device('cpu'))
        if rank == 0:
            out.update(row)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def run(args: argparse.Namespace) -> List[Dict[str, Any]]:
    """The variants' rows (on rank 0; empty on the other torchrun processes)."""
    if 'WORLD_SIZE' in os.environ:  # under torchrun
        device = _device()
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
        try:
            rows = [measure(args, ep, device) for ep in args.ep]
            return rows if dist.get_rank() == 0 else []
        finally:
            dist.destroy_process_group()
    rows = []
    with mp.Manager() as manager:
        for ep in args.ep:
            out = manager.dict()
            mp.spawn(_spawned, args=(args.nproc, _free_port(), args, ep, out), nprocs=args.nproc)
            rows.append(dict(out))
    return rows


def markdown(rows: List[Dict[str, Any]], args: argparse.Namespace) -> str:
    head = (f'{args.model}, E {args.num_experts}, batch {args.batch_size} per process, median of {args.steps} steps; '
            'ep 1 = DDP')
    lines = [head, '', '| ' + ' | '.join(COLUMNS) + ' |', '|' + '---|' * len(COLUMNS)]
    for r in rows:
        lines.append('| ' + ' | '.join(fmt.format(r[c]) for c, fmt in COLUMNS.items()) + ' |')
    return '\n'.join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--model', default='vmoe_micro_patch4_32')
    p.add_argument('--num-experts', type=int, default=8)
    p.add_argument('--batch-size', type=int, default=32, help='images per process')
    p.add_argument('--ep', type=lambda s: [int(v) for v in s.split(',')], default=None,
                   help='expert-parallel sizes to compare (default: 1 and the process count)')
    p.add_argument('--nproc', type=int, default=2, help='processes to spawn without torchrun')
    p.add_argument('--steps', type=int, default=5)
    p.add_argument('--warmup', type=int, default=1)
    p.add_argument('--threads', type=int, default=1, help='torch threads per spawned process')
    p.add_argument('--amp', action='store_true', help='bf16 autocast')
    args = p.parse_args(argv)
    world = int(os.environ.get('WORLD_SIZE', args.nproc))
    args.ep = args.ep or sorted({1, world})
    bad = [ep for ep in args.ep if ep < 1 or world % ep or args.num_experts % ep]
    if bad:
        p.error(f'--ep {bad} must divide the process count ({world}) and --num-experts ({args.num_experts})')
    return args


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    args = parse_args(argv)
    rows = run(args)
    if rows:
        print(markdown(rows, args), flush=True)
    return rows


if __name__ == '__main__':
    main()

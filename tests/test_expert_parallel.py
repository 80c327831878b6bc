"""Expert parallelism on CPU/gloo: 2 and 4 processes against one process holding every expert (loss, gradients,
updated weights and optimizer state, capacity drops; both families, every router), the single-file checkpoint that
train.py writes, and resumes at another EP size."""
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any, Dict, List

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from fixtures import TINY, fake_fashion_mnist
from safetensors.torch import load_file
from torch.nn.parallel import DistributedDataParallel

import simoe_vision  # noqa: F401
from simoe_vision.engine import main
from simoe_vision.layers import (
    ShardedExperts,
    clip_grad_norm_,
    exclude_from_ddp,
    gather_optimizer_state,
    gather_state_dict,
    reduce_expert_gradients,
    shard_optimizer_state,
)
from simoe_vision.models import moe_layers

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, HF_HUB_OFFLINE='1', NO_ALBUMENTATIONS_UPDATE='1', OMP_NUM_THREADS='1')
STEPS, PER_RANK, MAX_NORM, TOL = 2, 2, 0.05, 1e-5
ROUTERS = ('softmax', 'similarity', 'attention')
# capacity 1.0 drops pairs on the tiny models; the selection noise and the balance loss are on (router defaults)
CASES = ([dict(model=m, router=r, kwargs=dict(capacity_factor=1.0)) for m in ('vmoe_test', 'swin_moe_test')
          for r in ROUTERS]
         + [dict(model='vmoe_test', router='similarity',
                 kwargs=dict(capacity_group='batch', batch_prioritized=True, capacity_factor=1.0)),
            dict(model='vmoe_test', router='attention', kwargs=dict(capacity_factor='dropless')),
            # no noise and no (batch-nonlinear) balance loss: the reference is one forward on the whole batch
            dict(model='vmoe_test', router='softmax', whole_batch=True,
                 kwargs=dict(capacity_factor=1.0, router_kwargs=dict(noise_std=0.0, balance_loss='none')))])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _noise_seed(step: int, rank: int) -> int:
    """The seed of rank's selection noise at a step (the reference draws slice rank's noise from it)."""
    return 1000 + 10 * step + rank


def _batch(world: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(world * PER_RANK, 3, 32, 32, generator=generator), torch.randint(0, 5, (world * PER_RANK,),
                                                                                          generator=generator)


def _create(case: Dict[str, Any], **kwargs: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(case['model'], router=case['router'], num_classes=5, **case['kwargs'], **kwargs)


def _dropped(model: torch.nn.Module) -> List[float]:
    return [float(m.last_routing.stats['dropped_fraction']) for _, m in moe_layers(model)]


# ------------------------------------------------------------------------------------- one process, every expert

def _reference(case: Dict[str, Any], world: int) -> Dict[str, Any]:
    """What DDP computes, on one process holding every expert: the mean of the W rank slices' losses (each slice's
    noise drawn from its rank's seed; the aux loss scaled by 1/W as DDP's averaging does), clipped, SGD-stepped."""
    model = _create(case)
    model.set_aux_loss_scale(1.0 / world)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    images, targets = _batch(world)
    out: Dict[str, Any] = {'initial': {k: v.clone() for k, v in model.state_dict().items()}, 'loss': [],
                           'dropped': []}
    slices = [slice(None)] if case.get('whole_batch') else [slice(r * PER_RANK, (r + 1) * PER_RANK)
                                                            for r in range(world)]
    for step in range(STEPS):
        optimizer.zero_grad()
        losses, dropped = [], []
        for r, part in enumerate(slices):
            torch.manual_seed(_noise_seed(step, r))
            losses.append(F.cross_entropy(model(images[part]), targets[part]))
            dropped.append(_dropped(model))
        loss = torch.stack(losses).mean()
        loss.backward()
        out['loss'].append(loss.item())
        out['dropped'].append(dropped)
        if step == 0:
            out['grads'] = {n: p.grad.clone() for n, p in model.named_parameters()}
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        optimizer.step()
    out['weights'] = model.state_dict()
    out['optimizer'] = optimizer.state_dict()
    return out


# --------------------------------------------------------------------------------------- W processes, EP-sharded

def _gathered_grads(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    sharded = {id(p): bank for _, bank in model.named_modules() if isinstance(bank, ShardedExperts)
               for p in bank.sharded_parameters()}
    return {n: sharded[id(p)].layout.gather_to_first(p.grad) if id(p) in sharded else p.grad.clone()
            for n, p in model.named_parameters()}


def _round_trip(model: torch.nn.Module, optimizer: torch.optim.Optimizer, weights: Any, state: Any) -> bool:
    """Load the gathered single-process weights and optimizer state back (cut to each process's experts) and gather
    them again: bit-identical on rank 0."""
    shared = [weights, state]
    dist.broadcast_object_list(shared, src=0)
    model.load_state_dict(shared[0])
    optimizer.load_state_dict(shard_optimizer_state(shared[1], optimizer, model))
    again, state_again = gather_state_dict(model), gather_optimizer_state(optimizer, model)
    if dist.get_rank() != 0:
        return True
    same = all(torch.equal(again[k], v) for k, v in weights.items())
    moments = [(v, state_again['state'][i][key]) for i, entry in state['state'].items() for key, v in entry.items()]
    return same and all(torch.equal(a, b) for a, b in moments)


def _sharded_run(case: Dict[str, Any], ep: int) -> Dict[str, Any]:
    rank, world = dist.get_rank(), dist.get_world_size()
    model = _create(case, expert_parallel_size=ep)
    exclude_from_ddp(model)
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    images, targets = _batch(world)
    mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    initial = gather_state_dict(model)  # references to the live tensors, like state_dict()
    out: Dict[str, Any] = {'initial': initial and {k: v.clone() for k, v in initial.items()}, 'loss': [],
                           'dropped': []}
    if case['model'] == 'vmoe_test':  # the buffered entry point: (E, M, in) buffers of the whole bank
        bank = model.blocks[1].mlp.experts
        out['buffers'] = bank(torch.randn(bank.total_experts, 3, 32, generator=torch.Generator().manual_seed(2)))
    for step in range(STEPS):
        torch.manual_seed(_noise_seed(step, rank))
        optimizer.zero_grad()
        loss = F.cross_entropy(ddp(images[mine]), targets[mine])
        loss.backward()
        reduce_expert_gradients(model)
        total = loss.detach().clone()
        dist.all_reduce(total)
        out['loss'].append(float(total) / world)
        dropped: List[Any] = [None] * world
        dist.all_gather_object(dropped, _dropped(model))
        out['dropped'].append(dropped)
        if step == 0:
            out['grads'] = _gathered_grads(model)
        clip_grad_norm_(model, MAX_NORM)
        optimizer.step()
    out['weights'], out['optimizer'] = gather_state_dict(model), gather_optimizer_state(optimizer, model)
    out['round_trip'] = _round_trip(model, optimizer, out['weights'], out['optimizer'])
    return out


def _worker(rank: int, world: int, port: int, ep: int, cases: List[Dict[str, Any]], path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    try:
        results = [_sharded_run(case, ep) for case in cases]
        if rank == 0:
            torch.save(results, path)
    finally:
        dist.destroy_process_group()


def _spawn(world: int, ep: int, tmp_path: Path) -> List[Dict[str, Any]]:
    path = tmp_path / 'results.pt'
    mp.spawn(_worker, args=(world, _free_port(), ep, CASES, str(path)), nprocs=world)
    return torch.load(path, weights_only=False)


def _close(actual: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor], what: str) -> None:
    assert actual.keys() == expected.keys(), what
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=TOL, atol=TOL, msg=lambda m, k=key: f'{what} {k}: {m}')


def _check_against_one_process(results: List[Dict[str, Any]], world: int) -> None:
    for case, got in zip(CASES, results, strict=True):
        ref = _reference(case, world)
        name = f"{case['model']}/{case['router']}/{case['kwargs']}"
        assert got['initial'].keys() == ref['initial'].keys()
        assert all(torch.equal(got['initial'][k], v) for k, v in ref['initial'].items()), name  # one bank, sliced
        assert got['loss'] == pytest.approx(ref['loss'], rel=TOL, abs=TOL), name
        if not case.get('whole_batch'):
            assert got['dropped'] == ref['dropped'], name  # the same capacity decisions, slice by slice
        _close(got['grads'], ref['grads'], f'{name} grad')
        _close(got['weights'], ref['weights'], f'{name} updated weight')
        for index, entry in ref['optimizer']['state'].items():
            _close(got['optimizer']['state'][index], entry, f'{name} optimizer state {index}')
        assert got['round_trip'], name
        if 'buffers' in got:
            experts = _create(case).blocks[1].mlp.experts
            x = torch.randn(experts.num_experts, 3, 32, generator=torch.Generator().manual_seed(2))
            torch.testing.assert_close(got['buffers'], experts(x), rtol=TOL, atol=TOL)
    assert any(max(map(max, step)) > 0 for r in results for step in r['dropped']), 'no case dropped a pair'


def test_two_processes_ep2_match_one_process(tmp_path):
    _check_against_one_process(_spawn(2, 2, tmp_path), 2)


@pytest.mark.slow
def test_four_processes_ep2_dp2_match_one_process(tmp_path):
    _check_against_one_process(_spawn(4, 2, tmp_path), 4)


def test_sharding_needs_a_process_group_and_a_divisible_bank():
    with pytest.raises(ValueError, match='expert_parallel_size=2 needs torch.distributed initialised'):
        timm.create_model('vmoe_test', expert_parallel_size=2)
    with pytest.raises(ValueError, match='num_experts=4 is not divisible by expert_parallel_size=3'):
        timm.create_model('vmoe_test', expert_parallel_size=3)


# ------------------------------------------------------------------------------------------------------ train.py

@pytest.fixture(scope='module')
def fashion(tmp_path_factory) -> Path:
    return fake_fashion_mnist(tmp_path_factory.mktemp('fmnist'))


def _train_py(world: int, args: List[Any]) -> None:
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, 'train.py', *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env={**ENV, 'RANK': str(r), 'LOCAL_RANK': str(r), 'WORLD_SIZE': str(world),
                                   'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': port}) for r in range(world)]
    try:
        outputs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (out, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-2000:] + err[-3000:]


def _resumed(run: Path, copy: Path, world: int, ep: int) -> Dict[str, torch.Tensor]:
    shutil.copytree(run, copy)
    _train_py(world, ['--resume', copy, '--expert-parallel', ep])
    return load_file(copy / 'last.safetensors')


def _ep2_run(fashion: Path, out: Path, name: str, *flags: Any) -> Path:
    """2 epochs with 2 processes, EP = 2, an EMA of the weights (gathered too); returns the run folder."""
    _train_py(2, [*TINY, '--data-dir', fashion, '--epochs', 2, '--output', out, '--experiment', name,
                  '--expert-parallel', 2, '--model-ema', *flags])
    return out / name


def _split_run(fashion: Path, out: Path, name: str) -> Path:
    """Epoch 1 of :func:`_ep2_run`."""
    return _ep2_run(fashion, out, name, '--stop-after', 1)


def test_train_py_ep2_writes_one_checkpoint_that_resumes_at_ep1(fashion, tmp_path):
    run = _split_run(fashion, tmp_path / 'runs', 'ep2')
    assert sorted(p.name for p in run.iterdir() if p.suffix in ('.pt', '.safetensors')) == [
        'best.pt', 'best.safetensors', 'last.pt', 'last.safetensors']
    one = timm.create_model('vmoe_test', num_experts=4, in_chans=1, checkpoint_path=str(run / 'last.safetensors'))
    weights = load_file(run / 'last.safetensors')
    assert {k: v.shape for k, v in weights.items()} == {k: v.shape for k, v in one.state_dict().items()}
    assert all(torch.equal(one.state_dict()[k], v) for k, v in weights.items())  # one process, every expert
    optimizer = torch.load(run / 'last.pt', weights_only=True)['optimizer']
    shapes = {tuple(v.shape) for entry in optimizer['state'].values() for v in entry.values()}
    assert (4, 32, 64) in shapes  # the AdamW moments of a whole expert bank (E=4, d=32, hidden 64)

    ep2 = _resumed(run, tmp_path / 'again_ep2', 2, 2)
    ep1 = _resumed(run, tmp_path / 'again_ep1', 2, 1)  # the same 2 processes, DDP holding every expert
    _close(ep1, ep2, 'epoch-2 weights, resumed at EP 1 vs EP 2')
    assert not all(torch.equal(ep2[k], v) for k, v in weights.items())  # it trained on
    results = [json.loads((tmp_path / d / 'results.json').read_text()) for d in ('again_ep2', 'again_ep1')]
    assert results[0]['test_images'] == results[1]['test_images'] == 16
    assert results[0]['params'] == results[1]['params']  # the whole model's count, also with sharded experts


@pytest.mark.slow
def test_train_py_ep_resume_is_bit_identical_and_reshards_to_ep4(fashion, tmp_path):
    out = tmp_path / 'runs'
    full = load_file(_ep2_run(fashion, out, 'full') / 'last.safetensors')
    run = _split_run(fashion, out, 'split')
    resumed = _resumed(run, tmp_path / 'split_ep2', 2, 2)
    assert all(torch.equal(full[k], v) for k, v in resumed.items())  # through the gathered file and back, exactly
    _close(_resumed(run, tmp_path / 'ep4', 4, 4), _resumed(run, tmp_path / 'ep1_w4', 4, 1), 'EP 4 vs EP 1 on 4')
    _resumed(run, tmp_path / 'one', 1, 1)  # one process, every expert


@pytest.mark.parametrize('flags, message', [
    (['--expert-parallel', 3], 'invalid value 3 for expert_parallel: must divide num_experts (4)'),
    (['--expert-parallel', 2], 'invalid value 2 for expert_parallel: must divide the number of processes (1)'),
])
def test_bad_expert_parallel_sizes_exit_2_in_one_line(fashion, tmp_path, capsys, flags, message):
    code = main([str(a) for a in [*TINY, '--data-dir', fashion, '--output', tmp_path, *flags]])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err


@pytest.mark.slow
def test_benchmark_ep_measures_ddp_and_ep():
    spec = importlib.util.spec_from_file_location('benchmark_ep', ROOT / 'benchmark_ep.py')
    bench = importlib.util.module_from_spec(spec)
    sys.modules['benchmark_ep'] = bench  # the spawned processes import it by name
    spec.loader.exec_module(bench)
    ddp, ep = bench.main(['--model', 'vmoe_test', '--num-experts', '4', '--batch-size', '2', '--steps', '1',
                          '--warmup', '0'])
    assert (ddp['ep'], ep['ep']) == (1, 2) and ddp['a2a_ms'] == 0 < ep['a2a_ms']
    assert ep['state_mib'] < ddp['state_mib']  # half the experts, their gradients and AdamW moments

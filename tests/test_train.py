"""train.py end to end on tiny data: outputs, exact resume, checkpoints, faults, signals and a 2-process DDP run."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import yaml
from fixtures import TINY, fake_fashion_mnist, image_folder
from safetensors.torch import load_file

from simoe_vision.engine import CheckpointError, atomic_write, load_checkpoint, main, save_checkpoint
from simoe_vision.engine import checkpoint as checkpoint_mod
from simoe_vision.engine import loop as loop_mod
from simoe_vision.perf.hardware import describe_device

ROOT = Path(__file__).resolve().parents[1]
LAYER = 'blocks.1.mlp'
ENV = dict(os.environ, HF_HUB_OFFLINE='1', NO_ALBUMENTATIONS_UPDATE='1', OMP_NUM_THREADS='1')


@pytest.fixture(scope='module')
def fashion(tmp_path_factory) -> Path:
    """A fake Fashion-MNIST: 80 training and 16 test images of 28x28 with labels 0..9."""
    return fake_fashion_mnist(tmp_path_factory.mktemp('fmnist'))


def run(args, capsys=None):
    code = main([str(a) for a in args])
    return (code, capsys.readouterr()) if capsys is not None else code


def rows(run_dir: Path):
    return [json.loads(line) for line in (run_dir / 'metrics.jsonl').read_text().splitlines()]


def test_outputs_and_exact_resume(fashion, tmp_path, capsys):
    out = tmp_path / 'runs'
    common = TINY + ['--data-dir', fashion, '--epochs', 2, '--output', out, '--train-subset', 48]
    assert run(common + ['--experiment', 'full']) == 0
    assert run(common + ['--experiment', 'split', '--stop-after', 1]) == 0
    assert not (out / 'split' / 'results.json').exists()  # stopped early: no final test yet
    assert run(['--resume', out / 'split']) == 0  # inherits the saved config, not its stop_after
    before = (out / 'full' / 'last.pt').read_bytes()
    code, printed = run(common + ['--experiment', 'full'], capsys)  # a fresh run never overwrites a saved one
    assert code == 2 and 'already holds a run; continue it with --resume' in printed.err
    assert (out / 'full' / 'last.pt').read_bytes() == before

    full, split = out / 'full', out / 'split'
    a, b = load_file(full / 'last.safetensors'), load_file(split / 'last.safetensors')
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical weights
    assert [r['train_loss'] for r in rows(full)] == [r['train_loss'] for r in rows(split)]

    # run folder contents
    for name in ('config.yaml', 'metrics.jsonl', 'summary.csv', 'fluctuation.json', 'results.json', 'last.pt',
                 'last.safetensors', 'best.pt', 'best.safetensors'):
        assert (full / name).is_file(), name
    assert yaml.safe_load((full / 'config.yaml').read_text())['epochs'] == 2
    first, second = rows(full)
    for key in ('epoch', 'train_loss', 'val_top1', 'val_top5', 'aux_loss', 'load_cv', 'dropped', 'entropy',
                'fluctuation', 'epoch_time', f'load_cv.{LAYER}', f'dropped.{LAYER}', f'entropy.{LAYER}',
                f'fluctuation.{LAYER}'):
        assert key in second, key
    assert first['fluctuation'] is None and 0.0 <= second['fluctuation'] <= 1.0  # needs a previous epoch
    assert second['val_images'] == 16 and second['train_images'] == 48
    header = (full / 'summary.csv').read_text().splitlines()[0].split(',')
    assert {'train_loss', 'val_top1', 'val_top5', 'aux_loss', 'load_cv', 'fluctuation', 'epoch_time'} <= set(header)
    fluct = json.loads((full / 'fluctuation.json').read_text())
    assert len(fluct['curves']['mean']) == 1 and fluct['curves']['mean'][0] == pytest.approx(second['fluctuation'])
    dist = fluct['last_fluctuation_epoch']
    assert dist['tokens'] == 8 * 17 and sum(dist['count']) == 8 * 17 and dist['cdf'][-1] == pytest.approx(1.0)
    results = json.loads((full / 'results.json').read_text())
    assert results['test_images'] == 16 and 0 <= results['test_top1'] <= results['test_top5'] <= 100
    assert results['machine'] == describe_device('cpu')  # epoch times compare only on the same machine
    best = max(rows(full), key=lambda r: r['val_top1'])
    assert results['best_epoch'] == best['epoch']  # chosen on validation

    # checkpoints load with weights_only=True and hold the whole training state
    state = torch.load(full / 'last.pt', weights_only=True)
    assert {'epoch', 'optimizer', 'rng', 'tracker', 'best', 'save_id'} <= set(state) and state['epoch'] == 2
    torch.load(full / 'best.pt', weights_only=True)


def test_ema_mixup_bf16_and_bad_val_size(fashion, tmp_path, capsys, monkeypatch):
    """--model-ema with the attention router: the EMA copy is evaluated every epoch (it used to fail there). bf16 on
    a CPU without bf16 matmul kernels trains as asked, with a warning that names the fallback and --amp none."""
    from simoe_vision.engine import runner as runner_mod
    monkeypatch.setattr(runner_mod, 'has_fast_bf16_matmul', lambda device: False)
    out = tmp_path / 'runs'
    args = TINY + ['--data-dir', fashion, '--epochs', 1, '--output', out, '--train-subset', 32]
    code, captured = run(args + ['--experiment', 'opts', '--model-ema', '--model-ema-decay', 0.9, '--mixup', 0.8,
                                 '--cutmix', 1.0, '--amp', 'bf16', '--router', 'attention'], capsys)
    assert code == 0
    warning = [line for line in captured.out.splitlines() if 'no bf16 matmul kernels' in line]
    assert len(warning) == 1 and '--amp none' in warning[0]
    state = torch.load(out / 'opts' / 'last.pt', weights_only=True)
    assert set(state['ema']) == set(load_file(out / 'opts' / 'last.safetensors'))
    code, captured = run(args + ['--val-size', 500], capsys)
    assert code == 2 and 'val_size must leave both parts non-empty' in captured.err


def test_optimizer_kwargs_are_applied_or_refused(fashion, tmp_path, capsys):
    out = tmp_path / 'runs'
    args = TINY + ['--data-dir', fashion, '--epochs', 1, '--output', out, '--train-subset', 32]
    assert run(args + ['--experiment', 'fused', '--opt-kwargs', 'fused=true']) == 0
    state = torch.load(out / 'fused' / 'last.pt', weights_only=True)
    assert all(group['fused'] is True for group in state['optimizer']['param_groups'])
    code, captured = run(args + ['--experiment', 'bad', '--opt-kwargs', 'fusde=true'], capsys)
    assert code == 2 and len(captured.err.splitlines()) == 1
    assert captured.err.startswith("error: invalid opt_kwargs {'fusde': True} for opt 'adamw'")
    assert not (out / 'bad').exists()


def test_interrupted_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    target = tmp_path / 'file.bin'
    target.write_bytes(b'good')

    def broken(tmp: str) -> None:
        Path(tmp).write_bytes(b'partial')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, broken)
    assert target.read_bytes() == b'good' and list(tmp_path.iterdir()) == [target]  # no temp file left behind

    model = nn.Linear(3, 2)
    save_checkpoint(tmp_path, 'last', model, {'epoch': 1})
    saved = {k: v.clone() for k, v in model.state_dict().items()}

    def dies_midway(obj, path):
        Path(path).write_bytes(b'\x80partial pickle')
        raise OSError('I/O error')

    monkeypatch.setattr(checkpoint_mod.torch, 'save', dies_midway)
    with torch.no_grad():
        model.weight.add_(1.0)
    with pytest.raises(OSError, match='I/O error'):
        save_checkpoint(tmp_path, 'last', model, {'epoch': 2})
    monkeypatch.undo()
    # the weights of epoch 2 were written, but only as the staged half of a save that never committed: the previous
    # pair is whole, and nothing of the failed save is left
    fresh = nn.Linear(3, 2)
    state, _ = load_checkpoint(tmp_path, fresh)
    assert state['epoch'] == 1 and all(torch.equal(fresh.state_dict()[k], v) for k, v in saved.items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ['file.bin', 'last.pt', 'last.safetensors']
    with pytest.raises(CheckpointError, match='does not exist'):
        load_checkpoint(tmp_path / 'nothing')


def test_non_finite_loss_stops_with_step_and_keeps_checkpoint(fashion, tmp_path, monkeypatch, capsys):
    calls = []
    original = loop_mod.forward_loss

    def poisoned(*args):  # epoch 1 has 4 steps; the 6th forward (epoch 2, step 2) is NaN
        calls.append(1)
        loss = original(*args)
        return loss * float('nan') if len(calls) == 6 else loss

    monkeypatch.setattr(loop_mod, 'forward_loss', poisoned)
    out = tmp_path / 'runs'
    code, captured = run(TINY + ['--data-dir', fashion, '--epochs', 2, '--output', out, '--experiment', 'nan'], capsys)
    assert code == 1
    assert 'non-finite loss (nan) at epoch 2, step 2' in captured.err and 'Traceback' not in captured.err
    state, _ = load_checkpoint(out / 'nan')
    assert state['epoch'] == 1 and len(rows(out / 'nan')) == 1


def test_imagefolder_skips_corrupt_images_and_strict_fails(tmp_path, capsys):
    data = image_folder(tmp_path / 'data')
    args = ['--model', 'vmoe_test', '--num-experts', '4', '--data', 'imagefolder', '--data-dir', data, '--epochs', 1,
            '--batch-size', 8, '--val-size', 1, '--probe-size', 4, '--workers', 0, '--no-progress',
            '--output', tmp_path / 'runs']
    with pytest.warns(RuntimeWarning, match='bad.png'):
        code, captured = run(args + ['--experiment', 'lenient'], capsys)
    assert code == 0
    assert rows(tmp_path / 'runs' / 'lenient')[0]['skipped_images'] == 1  # 16 good + 1 bad: in train or val
    assert 'skipped 1 unreadable image' in captured.out
    code, captured = run(args + ['--experiment', 'strict', '--strict-data'], capsys)
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and 'cannot decode image' in lines[0] and 'bad.png' in lines[0]


def test_missing_data_and_bad_config_exit_2_without_traceback(tmp_path, capsys):
    code, captured = run(['--data', 'imagefolder', '--data-dir', tmp_path / 'nowhere', '--output', tmp_path], capsys)
    assert code == 2 and captured.err.startswith('error: dataset root') and len(captured.err.splitlines()) == 1
    broken = tmp_path / 'broken'
    broken.mkdir()
    for name in ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte', 't10k-images-idx3-ubyte',
                 't10k-labels-idx1-ubyte'):
        (broken / name).write_bytes(b'\x00\x00\x08')  # a truncated idx header
    code, captured = run(['--data-dir', broken, '--output', tmp_path / 'runs'], capsys)
    assert code == 2 and captured.err.startswith('error: ') and len(captured.err.splitlines()) == 1
    assert 'Traceback' not in captured.err and 'train-images-idx3-ubyte' in captured.err
    broken_files = set(tmp_path.iterdir())
    code, captured = run(['--modle', 'vmoe_test', '--output', tmp_path], capsys)
    assert code == 2 and 'did you mean model' in captured.err
    code, captured = run(['--model', 'vmoe_tset', '--output', tmp_path], capsys)
    assert code == 2 and "did you mean vmoe_test" in captured.err
    assert set(tmp_path.iterdir()) == broken_files  # failed before any work: no run folder


def test_sigterm_saves_and_exits_cleanly(fashion, tmp_path):
    out = tmp_path / 'runs'
    cmd = [sys.executable, 'train.py', *map(str, TINY), '--data-dir', str(fashion), '--epochs', '500',
           '--output', str(out), '--experiment', 'sig']
    log = (tmp_path / 'out.txt').open('w')
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while not (out / 'sig' / 'last.pt').exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert (out / 'sig' / 'last.pt').exists(), (tmp_path / 'out.txt').read_text()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = (tmp_path / 'out.txt').read_text()
    assert code == 128 + signal.SIGTERM, text
    assert 'stopped by signal 15' in text and 'Traceback' not in text
    saved = out / 'sig' / ('interrupted.pt' if (out / 'sig' / 'interrupted.pt').exists() else 'last.pt')
    state, _ = load_checkpoint(saved)
    assert state['epoch'] >= 1
    torch.load(out / 'sig' / 'last.pt', weights_only=True)


def test_torchrun_two_processes_gloo(fashion, tmp_path):
    out = tmp_path / 'runs'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', 'train.py',
           *map(str, TINY), '--data-dir', str(fashion), '--epochs', '1', '--output', str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run_dir,) = out.iterdir()  # one run folder, written by rank 0
    assert sorted(p.name for p in run_dir.glob('*.pt')) == ['best.pt', 'last.pt']
    (row,) = rows(run_dir)
    # 64 training images -> 32 per rank -> 2 steps of 16 each: sums over both ranks
    assert row['train_images'] == 64 and row['val_images'] == 16
    results = json.loads((run_dir / 'results.json').read_text())
    assert results['test_images'] == 16 and results['best_val_top1'] == pytest.approx(row['val_top1'])


def test_fluctuation_report_by_hand():
    from simoe_vision.engine import fluctuation_report
    from simoe_vision.metrics import FluctuationTracker
    tracker = FluctuationTracker()
    # one image, 4 tokens. epoch 1: 0 0 0 0; epoch 2: 0 1 0 0 (1 of 4 changed); epoch 3: 0 1 2 0 (1 of 4 changed)
    for epoch, top1 in ((1, [0, 0, 0, 0]), (2, [0, 1, 0, 0]), (3, [0, 1, 2, 0])):
        tracker.update(epoch, {'layer': torch.tensor([top1])})
    report = fluctuation_report(tracker)
    assert report['curves']['mean'] == [0.25, 0.25] and report['curve_epochs'] == [2, 3]
    # last change: token 0 and 3 never (epoch 1), token 1 at epoch 2, token 2 at epoch 3 -> counts 2, 1, 1
    dist = report['last_fluctuation_epoch']
    assert dist['count'] == [2, 1, 1] and dist['cdf'] == [0.5, 0.75, 1.0] and dist['tokens'] == 4


def test_epoch_table_is_not_cut_in_logs(capsys):
    from simoe_vision.engine.display import EPOCH_COLUMNS, Display
    row = {'epoch': 3, 'train_loss': 0.81234, 'val_top1': 85.5, 'fluctuation': 0.01234, 'lr': 1e-4, 'epoch_time': 98.7}
    Display().epoch_table(row, total_epochs=9)
    out = capsys.readouterr().out  # captured output is not a terminal: no 80-column cut like rich's default
    assert all(title in out for _, title, _ in EPOCH_COLUMNS)
    assert '0.8123' in out and '85.50' in out and '1.00e-04' in out and '…' not in out


def test_epoch_table_grows_by_one_row_per_epoch(capsys):
    """In a log: the header once, then one line per epoch; on a terminal: one live table whose last frame has
    every epoch's row (and no table per epoch)."""
    import io

    from rich.console import Console

    from simoe_vision.engine.display import Display
    rows = [{'epoch': e, 'train_loss': 1.0 / e, 'val_top1': 80.0 + e, 'epoch_time': 9.0} for e in (1, 2, 3)]
    display = Display()
    for row in rows:
        for _ in display.track(range(2), 2, f'train {row["epoch"]}'):
            pass
        display.epoch_table(row, total_epochs=3)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and lines[0].split()[:3] == ['epoch', 'train', 'loss']
    assert [line.split()[0] for line in lines[1:]] == ['1', '2', '3'] and '83.00' in lines[3]
    buf = io.StringIO()
    display = Display(console=Console(file=buf, force_terminal=True, width=160))
    for row in rows:
        for _ in display.track(range(2), 2, f'train {row["epoch"]}'):
            pass
        display.epoch_table(row, total_epochs=3)
    display.close()
    out = buf.getvalue()
    last_frame = out[out.rindex('epochs (3/3)'):]
    assert all(f'{80.0 + e:.2f}' in last_frame for e in (1, 2, 3))
    assert 'epoch 1/3' not in out  # the old per-epoch tables

"""What a user sees when something goes wrong, pinned as exit code, error line and what is on disk: a kill or a full
disk at every step of a checkpoint save, divergence, SIGTERM in the first epoch, resumes that cannot be exact or
change settings, mismatched class folders, bad weights files, a dead DDP process, and evaluate.py's up-front checks."""
import errno
import hashlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Dict, List

import pytest
import timm
import torch
import yaml
from fixtures import TINY, fake_fashion_mnist, image_folder, png_tree
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.utils.data import Subset

from simoe_vision.data import RobustImageFolder
from simoe_vision.engine import checkpoint as checkpoint_mod
from simoe_vision.engine import loop as loop_mod
from simoe_vision.engine import main
from simoe_vision.engine import runner as runner_mod
from simoe_vision.engine.checkpoint import atomic_write_text, committed_files, is_disk_full, load_checkpoint
from simoe_vision.evaluation import cli as cli_mod
from simoe_vision.evaluation import main as evaluate_main
from simoe_vision.evaluation.loading import check_state_dict
from simoe_vision.robustness import imagenet_synsets, read_timm_info
from simoe_vision.routers.losses import cv_squared, load_loss

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, HF_HUB_OFFLINE='1', NO_ALBUMENTATIONS_UPDATE='1', OMP_NUM_THREADS='1')
RUN_FILES = ['best.pt', 'best.safetensors', 'config.yaml', 'fluctuation.json', 'last.pt', 'last.safetensors',
             'metrics.jsonl', 'results.json', 'summary.csv']


@pytest.fixture(scope='module')
def fashion(tmp_path_factory) -> Path:
    return fake_fashion_mnist(tmp_path_factory.mktemp('fmnist'))


def _args(fashion: Path, out: Path, name: str, *extra: Any) -> List[str]:
    """A tiny 2-epoch train.py run of ``out/name``."""
    return [str(a) for a in TINY + ['--data-dir', fashion, '--epochs', 2, '--output', out, '--experiment', name,
                                    *extra]]


def _train(args: List[Any], capsys) -> tuple[int, Any]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr()


def _error_line(captured) -> str:
    """The single line a failed run prints on stderr (asserting there is exactly one)."""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    return lines[0]


def _printed(captured) -> str:
    """stdout with rich's line wrapping undone."""
    return ' '.join(captured.out.split())


def _digest(path: Path) -> str:
    tensors = load_file(path)
    return hashlib.sha256(b''.join(k.encode() + tensors[k].numpy().tobytes() for k in sorted(tensors))).hexdigest()


def _rows(run_dir: Path) -> List[Dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / 'metrics.jsonl').read_text().splitlines()]


def _outcome(run_dir: Path) -> Dict[str, Any]:
    """What a finished run leaves, timings aside: its files, final and best weights, metrics and results."""
    results = json.loads((run_dir / 'results.json').read_text())
    results.pop('train_time_s')
    return {'files': sorted(p.name for p in run_dir.iterdir()), 'last': _digest(run_dir / 'last.safetensors'),
            'best': _digest(run_dir / 'best.safetensors'), 'results': results,
            'rows': [{k: v for k, v in r.items() if k != 'epoch_time'} for r in _rows(run_dir)]}


@pytest.fixture(scope='module')
def reference(fashion, tmp_path_factory) -> Dict[str, Any]:
    """The outcome of an uninterrupted run: every interrupted and resumed one must end exactly like it."""
    out = tmp_path_factory.mktemp('reference')
    assert main(_args(fashion, out, 'ref')) == 0
    return _outcome(out / 'ref')


def _on_every_step(monkeypatch, folder: Path, before: Callable[[int, str], None]) -> None:
    """Call ``before(i, what)`` ahead of every file-system step train.py takes in ``folder``: creating a temp file,
    writing one (torch.save, safetensors, text), fsyncing, renaming, removing."""
    count = itertools.count()

    def hook(what: str, function: Callable, path_of: Callable) -> Callable:
        def step(*args, **kwargs):
            if str(path_of(*args, **kwargs)).startswith(str(folder)):
                before(next(count), what)
            return function(*args, **kwargs)
        return step

    monkeypatch.setattr(tempfile, 'mkstemp', hook('create', tempfile.mkstemp, lambda **kw: kw['dir']))
    monkeypatch.setattr(torch, 'save', hook('torch.save', torch.save, lambda obj, f: f))
    monkeypatch.setattr(checkpoint_mod, 'save_file', hook('safetensors', checkpoint_mod.save_file,
                                                          lambda tensors, f, metadata: f))
    monkeypatch.setattr(Path, 'write_text', hook('write', Path.write_text, lambda self, text: self))
    monkeypatch.setattr(checkpoint_mod, '_fsync', hook('fsync', checkpoint_mod._fsync, lambda path: path))
    monkeypatch.setattr(os, 'replace', hook('rename', os.replace, lambda src, dst: src))
    monkeypatch.setattr(os, 'unlink', hook('remove', os.unlink, lambda path: path))


def _fingerprint(folder: Path) -> tuple:
    return tuple(sorted((p.name, hashlib.md5(p.read_bytes()).hexdigest()) for p in folder.iterdir()))


def _assert_whole(folder: Path) -> None:
    """Every committed checkpoint loads as one save, and the best that ``last`` (and results.json) records is the
    committed best."""
    model = timm.create_model('vmoe_test', num_experts=4, num_classes=10, in_chans=1)
    if committed_files(folder, 'last') is None:
        assert committed_files(folder, 'best') is None
        return
    state, _ = load_checkpoint(folder, model)
    best, _ = load_checkpoint(folder / 'best.pt', model, save_id=state['best']['save_id'])
    assert best['epoch'] == state['best']['epoch']
    if (folder / 'results.json').is_file():
        assert json.loads((folder / 'results.json').read_text())['best_epoch'] == best['epoch']


def test_a_kill_at_any_step_leaves_the_previous_or_the_new_checkpoint(fashion, reference, tmp_path, monkeypatch,
                                                                      capsys):
    """Snapshot the run folder before every step of a 2-epoch run (what a SIGKILL there leaves), then resume each."""
    folder, snapshots, seen = tmp_path / 'runs' / 'run', tmp_path / 'killed', set()

    def snapshot(i: int, what: str) -> None:
        if folder.is_dir() and _fingerprint(folder) not in seen:
            seen.add(_fingerprint(folder))
            shutil.copytree(folder, snapshots / f'{i:03d}')

    _on_every_step(monkeypatch, folder, snapshot)
    assert main(_args(fashion, tmp_path / 'runs', 'run')) == 0
    monkeypatch.undo()
    assert _outcome(folder) == reference
    killed = sorted(snapshots.iterdir())
    assert len(killed) > 40  # every step of the config, metrics, checkpoint and results writes of both epochs
    for snap in killed:
        _assert_whole(snap)
        if not (snap / 'config.yaml').is_file():  # killed before anything was saved: nothing to resume
            code, captured = _train(['--resume', snap], capsys)
            assert code == 2 and 'holds no config.yaml' in _error_line(captured)
            continue
        assert main(['--resume', str(snap)]) == 0, snap.name
        assert _outcome(snap) == reference, snap.name  # bit-identical, no stray temp or staged files left


def _disk_full(what: str) -> Exception:
    """What each writer raises on a full file system (as seen on a full tmpfs)."""
    if what == 'torch.save':
        return RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598')
    if what == 'safetensors':
        return SafetensorError('Error while serializing: I/O error: No space left on device (os error 28)')
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_at_any_step_stops_with_one_line_and_keeps_the_checkpoint(fashion, reference, tmp_path,
                                                                             monkeypatch, capsys):
    steps: List[str] = []
    with monkeypatch.context() as m:
        _on_every_step(m, tmp_path / 'count', lambda i, what: steps.append(what))
        assert main(_args(fashion, tmp_path, 'count')) == 0
    failing = [i for i, what in enumerate(steps) if what != 'remove']  # removing a file never needs space
    assert len(failing) > 40 and not is_disk_full(RuntimeError('mat1 and mat2 shapes cannot be multiplied'))
    for i in failing:
        folder = tmp_path / f'full{i:03d}'

        def fail(j: int, what: str, i: int = i) -> None:
            if j == i:
                raise _disk_full(what)

        with monkeypatch.context() as m:
            _on_every_step(m, folder, fail)
            code, captured = _train(_args(fashion, tmp_path, folder.name), capsys)
        line = _error_line(captured)
        assert code == 1 and line.startswith(f'error: {folder}: No space left on device'), (steps[i], line)
        assert f'resume with --resume {folder}' in line and 'Traceback' not in captured.err
        assert not list(folder.glob('.*.tmp'))  # the failed write cleaned up after itself
        _assert_whole(folder)
        resume = ['--resume', folder] if (folder / 'config.yaml').is_file() else _args(fashion, tmp_path, folder.name)
        assert main([str(a) for a in resume]) == 0, steps[i]
        assert _outcome(folder) == reference, steps[i]


def test_atomic_writes_give_files_the_usual_permissions(tmp_path):
    mask = os.umask(0)
    os.umask(mask)
    atomic_write_text(tmp_path / 'results.json', '{}')  # not the private 0600 of the temp file it was written as
    assert (tmp_path / 'results.json').stat().st_mode & 0o777 == 0o666 & ~mask


KILLED_AT_RENAME = textwrap.dedent('''
    import os, sys
    from simoe_vision.engine import main
    target, nth = sys.argv[1], int(sys.argv[2])
    real, seen = os.replace, []
    def replace(src, dst):
        if os.path.basename(dst) == target:
            seen.append(dst)
            if len(seen) == nth:
                os._exit(9)  # like SIGKILL: no cleanup of any kind
        return real(src, dst)
    os.replace = replace
    sys.exit(main(sys.argv[3:]))
''')


def test_a_process_killed_between_weights_and_state_resumes_exactly(fashion, reference, tmp_path, capsys):
    """Killed when epoch 2's weights are in place as last.safetensors but last.pt is still epoch 1's (the pair the
    old two renames left inconsistent): the committed staged state completes it."""
    run_dir = tmp_path / 'run'
    proc = subprocess.run([sys.executable, '-c', KILLED_AT_RENAME, 'last.pt', '2', *_args(fashion, tmp_path, 'run')],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 9, proc.stderr[-3000:]
    assert load_file(run_dir / 'last.safetensors') and torch.load(run_dir / 'last.pt')['epoch'] == 1
    assert (run_dir / 'last.next.pt').is_file()
    code, captured = _train(['--resume', run_dir], capsys)
    assert code == 0 and f'resumed from {run_dir / "last.pt"} (epoch 2' in _printed(captured)
    assert _outcome(run_dir) == reference


def test_a_pair_from_two_saves_is_refused_in_one_line(fashion, tmp_path, capsys):
    run_dir = tmp_path / 'run'
    assert main(_args(fashion, tmp_path, 'run', '--stop-after', 1)) == 0
    epoch1 = (run_dir / 'last.pt').read_bytes()
    assert main(['--resume', str(run_dir)]) == 0
    (run_dir / 'last.pt').write_bytes(epoch1)  # e.g. a copy that mixed two saves
    code, captured = _train(['--resume', run_dir], capsys)
    assert code == 2 and 'were not saved together' in _error_line(captured)


@pytest.mark.parametrize('flags, hint', [
    (['--lr', '1e6'], 'lower --lr (and --warmup-lr; gradients were already clipped at 1)'),
    (['--warmup-lr', '1e6'], 'lower --lr (and --warmup-lr; gradients were already clipped at 1)'),
    (['--lr', '1e6', '--clip-grad', 'none'], 'lower --lr (and --warmup-lr), or clip gradients with --clip-grad 1.0'),
])
def test_divergence_stops_with_the_promised_line(fashion, tmp_path, capsys, flags, hint):
    code, captured = _train(_args(fashion, tmp_path, 'div', *flags), capsys)
    line = _error_line(captured)
    assert code == 1 and line.startswith('error: non-finite loss (') and ' at epoch 1, step ' in line, line
    assert line.endswith(f'{hint}; no epoch had finished, so no checkpoint was saved'), line
    assert not list((tmp_path / 'div').glob('*.pt'))


def test_load_loss_lets_nan_through_and_computes_what_normal_cdf_did():
    nan = torch.full((6, 4), float('nan'))
    assert torch.isnan(load_loss(nan, nan, 0.25, 2))  # no distribution argument validation to fail on
    clean, noisy = torch.randn(64, 8), torch.randn(64, 8)
    threshold = noisy.topk(2, dim=-1).values[:, -1:]
    selected = 1.0 - torch.distributions.Normal(0.0, 1.0).cdf((threshold - clean) / 0.125)
    assert torch.equal(load_loss(clean, noisy, 0.125, 2), cv_squared(selected.mean(dim=0)))  # bit for bit


def test_non_finite_weights_are_never_evaluated_or_saved(fashion, tmp_path, monkeypatch, capsys):
    original = runner_mod.train_one_epoch

    def blows_up(model, *args, epoch, **kwargs):  # the last update of epoch 2 overflows, every loss was finite
        out = original(model, *args, epoch=epoch, **kwargs)
        if epoch == 1:
            with torch.no_grad():
                next(model.parameters()).fill_(float('inf'))
        return out

    monkeypatch.setattr(runner_mod, 'train_one_epoch', blows_up)
    code, captured = _train(_args(fashion, tmp_path, 'inf'), capsys)
    line = _error_line(captured)
    assert code == 1 and line.startswith('error: the weights became non-finite in epoch 2 (every loss was finite)')
    assert line.endswith(f'{tmp_path / "inf" / "last.pt"} (epoch 1) is intact')
    assert load_checkpoint(tmp_path / 'inf')[0]['epoch'] == 1 and len(_rows(tmp_path / 'inf')) == 1


@pytest.mark.parametrize('flag, value', [('--lr', 'inf'), ('--lr', 'nan'), ('--warmup-lr', '-inf')])
def test_non_finite_numbers_are_refused_at_config_time(tmp_path, capsys, flag, value):
    code, captured = _train(['--output', tmp_path, f'{flag}={value}'], capsys)
    key = flag[2:].replace('-', '_')
    assert code == 2 and _error_line(captured) == f"error: invalid value {value!r} for {key}: expected a finite " \
                                                  f"number, got {value!r}"
    assert not list(tmp_path.iterdir())


def test_sigterm_in_the_first_epoch_prints_a_resume_command_that_works(fashion, reference, tmp_path, monkeypatch,
                                                                       capsys):
    calls, original = [], loop_mod.forward_loss

    def signalled(*args):
        calls.append(1)
        if len(calls) == 2:  # epoch 1, step 2
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args)

    monkeypatch.setattr(loop_mod, 'forward_loss', signalled)
    run_dir = tmp_path / 'run'
    code, captured = _train(_args(fashion, tmp_path, 'run'), capsys)
    monkeypatch.undo()
    assert code == 128 + signal.SIGTERM
    printed = _printed(captured)
    assert (f'stopped by signal 15 during epoch 1: saved {run_dir / "interrupted.pt"} (mid-epoch weights, not a '
            f'resume point); resume with --resume {run_dir} (restarts epoch 1 from the start: no epoch had finished)'
            ) in printed
    assert committed_files(run_dir, 'last') is None

    code, captured = _train(['--resume', run_dir / 'interrupted.pt'], capsys)  # not exact: refused, saying why
    assert code == 2 and _error_line(captured) == (
        f'error: {run_dir / "interrupted.pt"} was saved mid-epoch during epoch 1: a resume from it cannot be exact '
        '(the epoch would replay from mid-epoch weights), so it is refused; resume with --resume '
        f'{run_dir} (restarts that epoch from the start)')
    code, captured = _train(['--resume', run_dir / 'best.pt'], capsys)
    assert code == 2 and 'would rewind the run' in _error_line(captured)

    code, captured = _train(['--resume', run_dir], capsys)  # the printed command
    assert code == 0 and 'has no finished epoch: training it from epoch 1' in _printed(captured)
    outcome = _outcome(run_dir)
    assert outcome.pop('files') == sorted(RUN_FILES + ['interrupted.pt', 'interrupted.safetensors'])
    assert outcome == {k: v for k, v in reference.items() if k != 'files'}


def test_resume_applies_schedule_changes_and_refuses_the_rest(fashion, reference, tmp_path, capsys):
    run_dir, fast = tmp_path / 'run', tmp_path / 'fast'
    assert main(_args(fashion, tmp_path, 'fast', '--lr', '3e-3')) == 0  # the schedule a resumed --lr 3e-3 must follow
    assert main(_args(fashion, tmp_path, 'run', '--stop-after', 1)) == 0
    saved = (run_dir / 'config.yaml').read_bytes()

    code, captured = _train(['--resume', run_dir, '--batch-size', 8, '--seed', 1], capsys)
    assert code == 2 and _error_line(captured) == (
        f'error: cannot change batch_size 16 -> 8, seed 0 -> 1 when resuming {run_dir}: its weights and training state '
        'depend on the saved value(s); drop the flag(s), or start a new run with '
        f'-c {run_dir / "config.yaml"} --experiment NEW')
    assert (run_dir / 'config.yaml').read_bytes() == saved  # refused: nothing rewritten

    code, captured = _train(['--resume', run_dir, '--lr', '3e-3'], capsys)
    assert code == 0 and 'changed settings, applied from the resumed epoch on: lr 0.001 -> 0.003' in _printed(captured)
    assert yaml.safe_load((run_dir / 'config.yaml').read_text())['lr'] == 3e-3
    # epoch 2 ran on the new schedule: the lr of its steps is the one of a run with lr 3e-3 from the start
    lr = [r['lr'] for r in _rows(run_dir)]
    assert lr[1] == _rows(fast)[1]['lr'] != reference['rows'][1]['lr'] and lr[0] == reference['rows'][0]['lr']

    code, captured = _train(['--resume', run_dir, '--epochs', 3], capsys)  # an extension trains epoch 3
    assert code == 0 and 'epochs 2 -> 3' in _printed(captured)
    assert [r['epoch'] for r in _rows(run_dir)] == [1, 2, 3]
    assert json.loads((run_dir / 'results.json').read_text())['epochs'] == 3
    code, captured = _train(['--resume', run_dir, '--epochs', 2], capsys)
    assert code == 2 and _error_line(captured) == (f'error: invalid value 2 for epochs: {run_dir} has already trained '
                                                   '3 epoch(s); pass at least that many')


@pytest.mark.parametrize('change, named', [('missing', 'only in train/: dog'), ('extra', 'only in val/: fox')])
def test_train_and_val_class_folders_must_match(tmp_path, capsys, change, named):
    data = image_folder(tmp_path / 'data', classes=('cat', 'dog', 'emu'))
    if change == 'missing':
        shutil.rmtree(data / 'val' / 'dog')
    else:
        shutil.copytree(data / 'val' / 'emu', data / 'val' / 'fox')
    code, captured = _train(['--data', 'imagefolder', '--data-dir', data, '--model', 'vmoe_test', '--workers', 0,
                             '--output', tmp_path / 'runs'], capsys)
    assert code == 2 and _error_line(captured) == (
        f'error: the class folders of {data / "train"} and {data / "val"} differ ({named}); both need the same class '
        'folders (labels are their sorted names)')
    assert not (tmp_path / 'runs').exists()  # checked before any work


def test_strict_data_names_the_flag_and_skip_warnings_point_at_the_image(tmp_path, capsys):
    data = image_folder(tmp_path / 'data')
    bad = str(data / 'train' / 'cat' / 'bad.png')
    code, captured = _train(['--data', 'imagefolder', '--data-dir', data, '--model', 'vmoe_test', '--num-experts', 4,
                             '--batch-size', 8, '--val-size', 1, '--workers', 0, '--no-progress', '--strict-data',
                             '--output', tmp_path / 'runs'], capsys)
    line = _error_line(captured)
    assert code == 2 and line.startswith(f'error: cannot decode image {bad}: ')
    assert line.endswith('remove or replace the file, or run without --strict-data (--no-strict-data) to skip '
                         'unreadable images') and 'strict=False' not in line
    dataset = Subset(RobustImageFolder(data / 'train'), range(17))  # the frames torch's Subset/DataLoader add
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        assert [dataset[i] for i in range(17)].count(None) == 1
    (warning,) = caught
    assert warning.filename == bad and f'skipping unreadable image {bad}' in str(warning.message)
    assert warnings.formatwarning(warning.message, warning.category, warning.filename, warning.lineno).startswith(bad)


class _Pickled:
    """A Python object in a .pth file: a safe load refuses to run its pickle."""


@pytest.mark.parametrize('content, reason', [
    (b'not a checkpoint at all', 'not a PyTorch file of tensors (empty, truncated, corrupt or another format)'),
    (b'', 'not a PyTorch file of tensors (empty, truncated, corrupt or another format)'),
    (None, f'it holds a pickled {__name__}._Pickled, which a safe load (weights_only=True) refuses to run; save the '
           'tensors alone (torch.save(model.state_dict(), path)) or as .safetensors'),
])
def test_a_bad_pth_is_one_line_that_never_suggests_an_unsafe_load(tmp_path, capsys, content, reason):
    path = tmp_path / 'model.pth'
    if content is None:
        torch.save({'model': _Pickled()}, path)
    else:
        path.write_bytes(content)
    code = evaluate_main(['--checkpoint', str(path), '--model', 'vmoe_test', '--output', str(tmp_path / 'o')])
    line = _error_line(capsys.readouterr())
    assert code == 2 and line == f'error: cannot read weights {path}: {reason}' and 'weights_only=False' not in line


def test_a_corrupt_training_state_is_one_line(fashion, tmp_path, capsys):
    assert main(_args(fashion, tmp_path, 'run', '--stop-after', 1)) == 0
    (tmp_path / 'run' / 'last.pt').write_bytes(b'\x80garbage')
    code, captured = _train(['--resume', tmp_path / 'run'], capsys)
    assert code == 2 and _error_line(captured) == (f'error: cannot read checkpoint {tmp_path / "run" / "last.pt"}: not '
                                                   'a PyTorch file of tensors (empty, truncated, corrupt or another '
                                                   'format)')


def test_a_checkpoint_of_another_size_is_called_that_not_another_router(tmp_path, capsys):
    weights = tmp_path / 'small.safetensors'
    save_file(timm.create_model('vmoe_test', num_experts=4, embed_dim=48).state_dict(), str(weights))
    code = evaluate_main(['--checkpoint', str(weights), '--model', 'vmoe_test', '--model-kwargs', '{"num_experts": 4}',
                          '--output', str(tmp_path / 'o')])
    err = capsys.readouterr().err
    assert code == 2 and err.strip().splitlines()[-1] == (
        "  likely cause: a different model size (embed_dim, mlp_ratio, patch or image size) than 'vmoe_test'. Pass "
        'the run folder (its config.yaml has the settings), or --model/--router/--model-kwargs that match.')
    model, config = timm.create_model('vmoe_test', num_experts=4), {'model': 'vmoe_test', 'router': 'softmax'}
    for other, cause in ((dict(depth=4), 'a different depth or MoE layout'),
                         (dict(router='similarity', router_kwargs={'learnable_tau': True}), 'a different router'),
                         (dict(num_experts=8), 'a different num_experts'), (dict(num_classes=3), 'a different number')):
        with pytest.raises(ValueError) as info:
            check_state_dict(model, timm.create_model('vmoe_test', **{'num_experts': 4, **other}).state_dict(), config,
                             'w')
        assert str(info.value).splitlines()[-1].startswith(f'  likely cause: {cause}'), other


DIES_IN_EPOCH_1 = textwrap.dedent('''
    import os, sys
    from simoe_vision.engine import loop, main
    calls, original = [], loop.forward_loss
    def dies(*args):
        calls.append(1)
        if os.environ['RANK'] == '1' and len(calls) == 2:
            os._exit(7)
        return original(*args)
    loop.forward_loss = dies
    sys.exit(main(sys.argv[1:]))
''')


def test_a_dead_ddp_process_leaves_the_survivor_one_line_naming_it(fashion, tmp_path):
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, '-c', DIES_IN_EPOCH_1, *_args(fashion, tmp_path, 'ddp')], cwd=ROOT,
                              env={**ENV, 'RANK': str(r), 'LOCAL_RANK': str(r), 'WORLD_SIZE': '2',
                                   'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': str(port)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        (_, err0), _ = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert procs[1].returncode == 7 and procs[0].returncode == 1, err0
    assert err0.strip().splitlines() == [
        "error: rank 0: rank 1 stopped responding during training (killed or crashed: see its output or torchrun's "
        f"report); no epoch had finished, so no checkpoint was saved: resume with --resume {tmp_path / 'ddp'}"]


def test_clashing_labels_all_get_their_router():
    models = [SimpleNamespace(label='run', router=r) for r in ('softmax', 'similarity', 'softmax')]
    cli_mod._unique_labels(models)
    assert [m.label for m in models] == ['run/softmax', 'run/similarity', 'run/softmax#2']


def _weights_file(path: Path, **kwargs: Any) -> Path:
    save_file({k: v.contiguous() for k, v in timm.create_model('vmoe_test', **kwargs).state_dict().items()}, str(path))
    return path


def test_imagenet_suites_and_clean_folders_are_checked_against_the_model_first(tmp_path, capsys):
    weights = _weights_file(tmp_path / 'small.safetensors', num_classes=10)
    for wnid in read_timm_info('imagenet_a_synsets.txt'):
        (tmp_path / 'a' / wnid).mkdir(parents=True)
    code = evaluate_main(['--checkpoint', str(weights), '--model', 'vmoe_test', '--suite', 'a', '--imagenet-a-dir',
                          str(tmp_path / 'a'), '--output', str(tmp_path / 'o')])
    assert code == 2 and _error_line(capsys.readouterr()) == (
        'error: --suite a needs an ImageNet-1k model (1000 classes, RGB input), but small has 10 classes')
    data = png_tree(tmp_path / 'data' / 'val', ('cat', 'dog')).parent
    code = evaluate_main(['--checkpoint', str(weights), '--model', 'vmoe_test', '--suite', 'clean', '--data',
                          'imagefolder', '--data-dir', str(data), '--output', str(tmp_path / 'o')])
    assert code == 2 and _error_line(capsys.readouterr()) == (
        f'error: {data / "val"} holds 2 class folders but small has 10 classes: evaluate each model on the classes '
        'it was trained on')
    assert not (tmp_path / 'o').exists()  # nothing ran


def test_a_bad_imagenet_a_folder_is_found_before_any_suite_runs(tmp_path, capsys):
    weights = _weights_file(tmp_path / 'imagenet.safetensors', num_classes=1000)
    png_tree(tmp_path / 'c' / 'gaussian_noise' / '1', imagenet_synsets()[:2], size=36)
    png_tree(tmp_path / 'a', list(read_timm_info('imagenet_a_synsets.txt')) + ['n0000bad'], size=8)
    code = evaluate_main(['--checkpoint', str(weights), '--model', 'vmoe_test', '--suite', 'c,a', '--imagenet-c-dir',
                          str(tmp_path / 'c'), '--corruptions', 'gaussian_noise', '--severities', '1',
                          '--imagenet-a-dir', str(tmp_path / 'a'), '--output', str(tmp_path / 'o'), '--no-progress'])
    captured = capsys.readouterr()
    assert code == 2 and 'unexpected (1): n0000bad' in captured.err and 'ImageNet-C' not in captured.out
    assert not (tmp_path / 'o').exists()


def test_a_failure_midway_keeps_the_finished_suites(tmp_path, monkeypatch, capsys):
    weights = _weights_file(tmp_path / 'imagenet.safetensors', num_classes=1000)
    png_tree(tmp_path / 'c' / 'gaussian_noise' / '1', imagenet_synsets()[:2], size=36)
    png_tree(tmp_path / 'a', read_timm_info('imagenet_a_synsets.txt'), size=8)

    def fails(*args, **kwargs):
        raise RuntimeError('out of memory')

    monkeypatch.setattr(cli_mod, 'run_imagenet_ar', fails)
    with pytest.raises(RuntimeError, match='out of memory'):
        evaluate_main(['--checkpoint', str(weights), '--model', 'vmoe_test', '--suite', 'c,a', '--imagenet-c-dir',
                       str(tmp_path / 'c'), '--corruptions', 'gaussian_noise', '--severities', '1',
                       '--imagenet-a-dir', str(tmp_path / 'a'), '--output', str(tmp_path / 'o'), '--no-progress'])
    results = tmp_path / 'o' / 'results.json'
    assert _error_line(capsys.readouterr()) == f'evaluate.py failed: the suites that finished are saved in {results}'
    saved = json.loads(results.read_text())
    assert saved['meta']['complete'] is False
    assert saved['checkpoints']['imagenet']['corruptions']['cells']['gaussian_noise']['1']['num_samples'] == 2
    assert 'imagenet_a' not in saved['checkpoints']['imagenet']

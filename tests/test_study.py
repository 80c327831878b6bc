"""The study runner: planning and status, budget stop, summary extraction and the generated report (no training:
fake run folders and evaluate.py results; the real pipeline is exercised by ``python -m simoe_vision.study run
--smoke``)."""
import json
import math
from pathlib import Path

import pytest
import yaml

from simoe_vision import study
from simoe_vision.engine.config import parse_config

LAYERS = ('blocks.1.mlp', 'blocks.3.mlp')


def _fake_run(root: Path, name: str = 'vmoe_similarity_s0', router: str = 'similarity') -> Path:
    """A finished train.py folder (4 epochs) with an evaluate.py results.json: 2 corruptions x severities 1, 2."""
    run = root / name
    (run / 'eval').mkdir(parents=True)
    (run / 'config.yaml').write_text(yaml.safe_dump({'model': 'vmoe_nano_patch4_32', 'router': router,
                                                     'router_kwargs': {}, 'epochs': 4}))
    (run / 'results.json').write_text(json.dumps({'test_top1': 81.5, 'best_val_top1': 82.0, 'best_epoch': 4,
                                                  'epochs': 4, 'train_time_s': 460.0}))
    rows = [{'epoch': e, 'epoch_time': t, 'train_images': 55000}
            for e, t in zip((1, 2, 3, 4), (100, 110, 120, 130), strict=True)]
    (run / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    curves = {'blocks.1.mlp': [0.4, 0.2, 0.1], 'blocks.3.mlp': [0.2, 0.2, 0.1], 'mean': [0.3, 0.2, 0.1]}
    (run / 'fluctuation.json').write_text(json.dumps({'epochs': [1, 2, 3, 4], 'curves': curves,
                                                      'curve_epochs': [2, 3, 4]}))
    cell = lambda top1: {'top1': top1, 'top5': 99.0, 'nll': 0.5, 'ece': 0.01, 'num_samples': 100}  # noqa: E731
    agreement = {'gaussian_noise': {'1': {'blocks.1.mlp': 0.9, 'blocks.3.mlp': 0.8, 'mean': 0.85},
                                    '2': {'blocks.1.mlp': 0.7, 'blocks.3.mlp': 0.6, 'mean': 0.65}},
                 'contrast': {'1': {'blocks.1.mlp': 0.7, 'blocks.3.mlp': 0.6, 'mean': 0.65},
                              '2': {'blocks.1.mlp': 0.5, 'blocks.3.mlp': 0.4, 'mean': 0.45}}}
    result = {
        'model': 'vmoe_nano_patch4_32', 'router': router,
        'clean': cell(85.0),
        'routing': {'layers': {'blocks.1.mlp': {'load_cv': 0.2}, 'blocks.3.mlp': {'load_cv': 0.4}},
                    'agreement': agreement},
        'corruptions': {'mce': 35.0, 'mean_corruption_accuracy': 65.0, 'corruptions': ['gaussian_noise', 'contrast'],
                        'severities': [1, 2],
                        'cells': {'gaussian_noise': {'1': cell(80.0), '2': cell(60.0)},
                                  'contrast': {'1': cell(70.0), '2': cell(50.0)}},
                        'errors': {'gaussian_noise': {'1': 0.2, '2': 0.4}, 'contrast': {'1': 0.3, '2': 0.5}}},
        'adversarial': [{'attack': 'fgsm', 'eps': 1.0, 'adv_top1': 50.0}, {'attack': 'pgd', 'eps': 1.0,
                                                                            'adv_top1': 40.0},
                        {'attack': 'pgd', 'eps': 4.0, 'adv_top1': 10.0}],
    }
    (run / 'eval' / 'results.json').write_text(json.dumps({'meta': {}, 'checkpoints': {name: result}}))
    return run


HARDWARE = {'platform': 'Linux-test', 'cpu': 'Test CPU', 'cpu_count': 2, 'torch': '2.x', 'python': '3.x'}


def _summary(run_dir: Path, arm: str, seed: int, **changes) -> dict:
    s = study.summarize_run(run_dir, run_dir / 'eval' / 'results.json', arm, seed, ['python train.py ...'],
                            eval_s=50.0, hardware=HARDWARE)
    s['run'] = f'{arm}_s{seed}'
    for key, value in changes.items():
        s[key] = value
    return s


def _write_summary(docs: Path, summary: dict) -> None:
    path = study.summary_path(docs, summary['run'])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary))


# ---- pure functions ----

def test_window_mean_hand_worked():
    # 4 epochs, curve at epochs 2, 3, 4 (ends at 0.5, 0.75, 1.0 of training).
    # 40-90 %: (0.4, 0.9] holds 0.5 and 0.75 -> (0.3 + 0.2) / 2 = 0.25; last 30 %: (0.7, 1] -> (0.2 + 0.1) / 2 = 0.15
    assert study.window_mean([2, 3, 4], [0.3, 0.2, 0.1], 4, 0.4, 0.9) == pytest.approx(0.25)
    assert study.window_mean([2, 3, 4], [0.3, 0.2, 0.1], 4, 0.7, 1.0) == pytest.approx(0.15)
    # 10 epochs, value e / 100 at epoch e: 40-90 % -> epochs 5..9 -> 0.07; last 30 % -> 8, 9, 10 -> 0.09
    epochs = list(range(2, 11))
    assert study.window_mean(epochs, [e / 100 for e in epochs], 10, 0.4, 0.9) == pytest.approx(0.07)
    assert study.window_mean(epochs, [e / 100 for e in epochs], 10, 0.7, 1.0) == pytest.approx(0.09)
    assert study.window_mean([2], [0.5], 2, 0.4, 0.9) is None  # the only point ends at 1.0


def test_mean_std_and_format():
    # [1, 2, 3, 4]: mean 2.5; squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5, / (n-1) = 5/3, sqrt = 1.2910
    mean, std, n = study.mean_std([1.0, 2.0, None, 3.0, 4.0])
    assert (mean, n) == (2.5, 4) and std == pytest.approx(math.sqrt(5 / 3))
    assert study.fmt([1.0, 2.0, 3.0, 4.0]) == '2.50 ± 1.29'
    assert study.fmt([7.0]) == '7.00'
    assert study.fmt([None]) == '–'
    assert study.fmt([1.0, -1.0], sign=True) == '+0.00 ± 1.41'  # std of (1, -1): sqrt((1 + 1) / 1)


def test_paired_deltas_only_seeds_both_have():
    summaries = [{'arm': 'vmoe_similarity', 'seed': s, 'test_top1': v} for s, v in ((0, 80.0), (1, 82.0), (2, 81.0))]
    summaries += [{'arm': 'vmoe_softmax', 'seed': s, 'test_top1': v} for s, v in ((0, 79.0), (1, 83.0))]
    # seed 0: 80 - 79 = +1; seed 1: 82 - 83 = -1; seed 2 has no softmax run
    assert study.paired_deltas(summaries, 'vmoe_similarity', 'vmoe_softmax', lambda s: s['test_top1']) == [1.0, -1.0]


def test_relative_mce_hand_worked():
    # CE_a = mean(0.2, 0.4) / mean(0.4, 0.4) = 0.75; CE_b = mean(0.5, 0.5) / mean(0.25, 0.25) = 2 -> mCE 137.5
    errors = {'a': {'1': 0.2, '2': 0.4}, 'b': {'1': 0.5, '2': 0.5}}
    reference = {'a': {'1': 0.4, '2': 0.4}, 'b': {'1': 0.25, '2': 0.25}}
    assert study.relative_mce(errors, reference) == pytest.approx(137.5)


def test_fits_budget():
    assert study.fits_budget(100.0, 50.0, 150.0)
    assert not study.fits_budget(100.0, 51.0, 150.0)
    assert study.fits_budget(1e9, 1e9, None)


# ---- arms and configs ----

def test_every_arm_has_a_valid_config_differing_only_in_router():
    configs = sorted(Path(study.REPO, 'configs').glob('study_*.yaml'))
    assert sorted(p.stem[len('study_'):] for p in configs) == sorted(study.ARMS)
    by_family = {}
    for arm in study.ARMS.values():
        config = parse_config(['-c', str(study.REPO / arm.config)])  # train.py's own validation
        assert config['router'] == arm.router and config['val_size'] > 0
        knob = {k: str(v) for k, v in config['router_kwargs'].items()}
        assert knob == (dict([arm.knob.split('=')]) if arm.knob else {})
        rest = {k: v for k, v in config.items() if k not in ('router', 'router_kwargs')}
        by_family.setdefault(arm.family, []).append(rest)
    for family, rests in by_family.items():
        assert all(r == rests[0] for r in rests), f'{family} configs differ beyond the router'


def test_select_runs_order_and_errors():
    names = [r.name for r in study.select_runs()]
    assert names[:4] == ['vmoe_softmax_s0', 'vmoe_similarity_s0', 'vmoe_attention_s0', 'vmoe_softmax_s1']
    assert len(names) == 16 and names[-1] == 'vmoe_similarity_alpha05_s0'
    assert [r.name for r in study.select_runs(['swinmoe_softmax'], [0, 1])] == ['swinmoe_softmax_s0']
    with pytest.raises(study.StudyError, match='unknown arm.*nope.*choose from'):
        study.select_runs(['nope'])


# ---- planning and the budget ----

def test_plan_statuses_and_estimates(tmp_path):
    runs_dir, docs = tmp_path / 'runs', tmp_path / 'docs'
    _write_summary(docs, _summary(_fake_run(tmp_path / 'src'), 'vmoe_softmax', 0))
    partial = runs_dir / 'vmoe_similarity_s0'
    partial.mkdir(parents=True)
    (partial / 'last.pt').write_bytes(b'')
    (partial / 'metrics.jsonl').write_text('{"epoch": 1}\n{"epoch": 2}\n')
    rows = {r['run']: r for r in study.plan_runs(study.select_runs(), runs_dir, docs)}
    assert rows['vmoe_softmax_s0'] == {'run': 'vmoe_softmax_s0', 'status': 'done', 'estimate_s': 0.0}
    # partial: 8 of 10 epochs left at the V-MoE family's measured 460 / 4 = 115 s each, + 50 s evaluation + 60 s
    # = 1030 s
    assert rows['vmoe_similarity_s0']['status'] == 'partial'
    assert rows['vmoe_similarity_s0']['estimate_s'] == pytest.approx(1030.0)
    # todo with a finished run of the same arm: its measured 460 s / 4 epochs x 10 + its 50 s evaluation + 60 = 1260 s
    assert rows['vmoe_softmax_s1']['estimate_s'] == pytest.approx(1260.0)
    # no run of the arm yet: the V-MoE family's measurement (vmoe_softmax_s0) stands in
    assert rows['vmoe_attention_s0'] == {'run': 'vmoe_attention_s0', 'status': 'todo', 'estimate_s': 1260.0}


def test_estimate_without_measurements():
    # 10 epochs x 55000 / 780 img/s = 705.1 s + 150 s evaluation + 60 s overhead = 915.1 s
    run = study.select_runs(['vmoe_attention'], [0])[0]
    assert study.estimate_seconds(run, Path('/nonexistent'), []) == pytest.approx(10 * 55000 / 780 + 150 + 60)


def test_run_stops_before_a_run_that_would_exceed_the_budget(tmp_path):
    runs_dir, docs = tmp_path / 'runs', tmp_path / 'docs'
    source = _fake_run(tmp_path / 'src')
    now = [0.0]
    executed = []

    def execute(run, runs_dir_, docs_, plan, cache_dir, extra, log):
        executed.append(run.name)
        _write_summary(docs_, _summary(source, run.arm.name, run.seed))
        now[0] += 1500.0  # each run takes 1500 s of the session's clock

    runs = study.select_runs(['vmoe_softmax', 'vmoe_similarity'], [0])
    logs = []
    # budget 2000 s: the first run's estimate (4 x 220 + 300 + 60 = 1240 s) fits; after it, 1500 s have passed and the
    # next one, estimated from the finished V-MoE run at 460 + 50 + 60 = 570 s, would end at 2070 s > 2000: stop
    done = study.run_study(runs, runs_dir, docs, 2000.0, study.EvalPlan(), tmp_path / 'cache', log=logs.append,
                           clock=lambda: now[0], execute=execute)
    assert done == executed == ['vmoe_softmax_s0']
    assert 'stopping before vmoe_similarity_s0' in logs[-1] and 'commit docs/results' in logs[-1]
    # the next session skips the finished run and does the rest
    done = study.run_study(runs, runs_dir, docs, 2000.0, study.EvalPlan(), tmp_path / 'cache', log=logs.append,
                           clock=lambda: now[0], execute=execute)
    assert done == ['vmoe_similarity_s0']


# ---- summary extraction ----

def test_summarize_run_hand_worked(tmp_path):
    s = study.summarize_run(_fake_run(tmp_path), tmp_path / 'vmoe_similarity_s0' / 'eval' / 'results.json',
                            'vmoe_similarity', 0, ['cmd'], eval_s=50.0, hardware=HARDWARE)
    assert (s['run'], s['test_top1'], s['val_top1'], s['eval']['clean_top1']) == ('vmoe_similarity_s0', 81.5, 82.0,
                                                                                   85.0)
    # per severity: s1 = (80 + 70) / 2 = 75; s2 = (60 + 50) / 2 = 55
    assert s['corruption']['per_severity'] == {'1': 75.0, '2': 55.0}
    assert (s['corruption']['mean_accuracy'], s['corruption']['mce']) == (65.0, 35.0)
    assert s['adversarial'] == {'fgsm': {'1': 50.0}, 'pgd': {'1': 40.0, '4': 10.0}}
    # agreement s1: mean over corruptions of the layer mean (0.85 + 0.65) / 2 = 0.75; blocks.1.mlp (0.9 + 0.7) / 2
    assert s['routing']['agreement']['1']['mean'] == pytest.approx(0.75)
    assert s['routing']['agreement']['1']['blocks.1.mlp'] == pytest.approx(0.8)
    assert s['routing']['agreement']['2']['mean'] == pytest.approx(0.55)  # (0.65 + 0.45) / 2
    assert s['routing']['load_cv_mean'] == pytest.approx(0.3)  # (0.2 + 0.4) / 2
    # fluctuation windows (see test_window_mean_hand_worked): mean curve 0.25 and 0.15; blocks.3.mlp 0.2 and 0.15
    assert s['fluctuation']['windows']['40-90%']['mean'] == pytest.approx(0.25)
    assert s['fluctuation']['windows']['last 30%']['mean'] == pytest.approx(0.15)
    assert s['fluctuation']['windows']['40-90%']['blocks.3.mlp'] == pytest.approx(0.2)
    # epoch time (100 + 110 + 120 + 130) / 4 = 115; wall = 460 training + 50 evaluation
    assert s['timing'] == {'epoch_s': 115.0, 'train_s': 460.0, 'eval_s': 50.0, 'wall_s': 510.0}
    assert s['hardware'] == HARDWARE and s['commands'] == ['cmd']


def test_summarize_run_missing_file(tmp_path):
    run = _fake_run(tmp_path)
    (run / 'results.json').unlink()
    with pytest.raises(study.StudyError, match='results.json is missing: finish the run first'):
        study.summarize_run(run, run / 'eval' / 'results.json', 'vmoe_similarity', 0, [])


# ---- report ----

def test_report_tables_conclusions_missing_runs_and_human_text(tmp_path):
    docs = tmp_path / 'docs'
    source = _fake_run(tmp_path / 'src')
    for seed, top1 in ((0, 80.0), (1, 82.0)):
        _write_summary(docs, _summary(source, 'vmoe_softmax', seed, test_top1=top1))
    for seed, top1 in ((0, 81.0), (1, 81.0)):
        _write_summary(docs, _summary(source, 'vmoe_similarity', seed, test_top1=top1))
    path = study.write_report(docs)
    text = path.read_text()
    assert 'Runs missing: vmoe_attention_s0, vmoe_attention_s1, vmoe_softmax_s2,' in text
    assert '4 of 16 runs done' in text
    assert '| similarity | 1/1 | 81.00 |' in text and '| similarity, tau=0.05 | 0/1 | – |' in text  # ablations: seed 0
    # softmax 80, 82 -> 81.00 ± 1.41; similarity 81, 81 -> 81.00 ± 0.00; 2 of 3 seeds
    assert '| softmax | 2/3 | 81.00 ± 1.41 |' in text
    assert '| similarity | 2/3 | 81.00 ± 0.00 |' in text
    assert '| attention | 0/3 | – |' in text
    # paired: seed 0 +1, seed 1 -1 -> +0.00 ± 1.41 pp; relative mCE vs itself-equal errors: 100 - 100 = 0
    assert '- vmoe similarity − softmax, test top-1 (%): +0.00 ± 1.41 pp over 2 seed(s)' in text
    assert '- vmoe similarity − softmax, mCE vs softmax (%): +0.00 ± 0.00 over 2 seed(s)' in text
    assert (docs / 'results' / 'vmoe_fluctuation.png').is_file()
    assert '![vmoe_accuracy_vs_severity.png](results/vmoe_accuracy_vs_severity.png)' in text
    assert study.HUMAN_BEGIN in text and 'Test CPU' in text
    # the human-written conclusion survives regeneration
    edited = text.replace('_To be written by a person', 'Similarity routing helps a little. _To be written')
    path.write_text(edited)
    assert 'Similarity routing helps a little.' in study.write_report(docs).read_text()


def test_cli_plan_and_errors(tmp_path, capsys):
    assert study.main(['plan', '--runs-dir', str(tmp_path / 'r'), '--docs', str(tmp_path / 'd'),
                       '--arms', 'vmoe_softmax']) == 0
    out = capsys.readouterr().out
    assert 'vmoe_softmax_s2' in out and 'todo' in out and '0/3 done' in out
    assert study.main(['plan', '--arms', 'nope']) == 2
    assert 'unknown arm(s) nope' in capsys.readouterr().err
    assert study.main(['run', '--smoke', '--docs', str(tmp_path)]) == 2
    assert '--smoke writes to a temporary folder' in capsys.readouterr().err


@pytest.mark.slow
def test_smoke_end_to_end(tmp_path, monkeypatch, capsys):
    """The real pipeline (train.py and evaluate.py subprocesses) on vmoe_test, in a temporary folder (~1-2 min)."""
    monkeypatch.setattr('tempfile.tempdir', str(tmp_path))
    assert study.main(['run', '--smoke', '--seeds', '0']) == 0
    root = next(tmp_path.glob('simoe-study-smoke-*'))
    summaries = study.load_summaries(root / 'docs')
    assert [s['run'] for s in summaries] == ['vmoe_similarity_s0', 'vmoe_softmax_s0']
    assert summaries[0]['corruption']['relative_mce'] > 0 and summaries[0]['eval']['images'] == 32
    assert 'vmoe similarity − softmax, test top-1' in (root / 'docs' / 'results.md').read_text()

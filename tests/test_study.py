"""The study driver (``study/``): the declared arms and their configs, planning and the budget stop, running a run
(subprocesses faked), summary extraction and the generated report (no training: fake run folders and evaluate.py
results; the real pipeline is exercised by ``python -m study run --smoke``)."""
import json
from pathlib import Path

import pytest
import yaml

from simoe_vision.engine.config import parse_config
from simoe_vision.metrics import window_mean
from study import STUDIES, run
from study.__main__ import main
from study.design import REPO, Arm, Run, Study, StudyError, arm_config, arm_flags
from study.plan import estimate_seconds, fits_budget, plan_runs, select_runs
from study.report import HUMAN_BEGIN, render_report, write_report
from study.summarize import FLUCTUATION_WINDOWS, load_summaries, summarize_run
from study.v1 import V1, VMOE

HARDWARE = {'platform': 'Linux-test', 'cpu': 'Test CPU', 'cpu_count': 2, 'torch': '2.x', 'python': '3.x'}


def _fake_run(root: Path, name: str = 'vmoe_similarity_s0', router: str = 'similarity') -> Path:
    """A finished train.py folder (4 epochs) with an evaluate.py results.json: 2 corruptions x severities 1, 2."""
    run_dir = root / name
    (run_dir / 'eval').mkdir(parents=True)
    (run_dir / 'config.yaml').write_text(yaml.safe_dump({'model': 'vmoe_nano_patch4_32', 'router': router,
                                                         'router_kwargs': {}, 'epochs': 4}))
    (run_dir / 'results.json').write_text(json.dumps({'test_top1': 81.5, 'best_val_top1': 82.0, 'best_epoch': 4,
                                                      'epochs': 4, 'train_time_s': 460.0}))
    rows = [{'epoch': e, 'epoch_time': t, 'train_images': 55000}
            for e, t in zip((1, 2, 3, 4), (100, 110, 120, 130), strict=True)]
    (run_dir / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    curves = {'blocks.1.mlp': [0.4, 0.2, 0.1], 'blocks.3.mlp': [0.2, 0.2, 0.1], 'mean': [0.3, 0.2, 0.1]}
    (run_dir / 'fluctuation.json').write_text(json.dumps({'epochs': [1, 2, 3, 4], 'curves': curves,
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
    (run_dir / 'eval' / 'results.json').write_text(json.dumps({'meta': {}, 'checkpoints': {name: result}}))
    return run_dir


def _summary(run_dir: Path, arm: str, seed: int, **changes) -> dict:
    s = summarize_run(run_dir, run_dir / 'eval' / 'results.json', arm, seed, ['python train.py ...'], eval_s=50.0,
                      hardware=HARDWARE)
    s['run'] = f'{arm}_s{seed}'
    s.update(changes)
    return s


def _write_summary(docs: Path, summary: dict) -> None:
    path = V1.summary_path(docs, summary['run'])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary))


def _names(runs) -> list:
    return [r.name for r in runs]


# ---- the declaration: arms, configs, committed results ----

def test_arm_labels_flags_and_merged_settings():
    tau = V1.arm('vmoe_similarity_tau005')
    assert tau.label == 'similarity, tau=0.05' and V1.arm('vmoe_softmax').label == 'softmax'
    assert arm_flags(tau) == ['--router', 'similarity', '--router-kwargs', '{"tau": 0.05}']
    # a mapping setting updates the base's mapping: the arm names only what it changes (here the capacity factor)
    dropless = Arm('vmoe_dropless', VMOE, 'softmax', (0,), {'model_kwargs': {'capacity_factor': 4.0},
                                                            'model_ema': True, 'epochs': 2})
    config = arm_config(dropless)
    assert config['model_kwargs'] == {'global_pool': 'avg', 'class_token': False, 'patch_size': 7,
                                      'capacity_factor': 4.0, 'moe_layout': 'last2'}
    assert config['model_ema'] is True and config['epochs'] == 2 and config['router'] == 'softmax'
    assert dropless.label == 'softmax, capacity_factor=4.0, model_ema=True, epochs=2'


def test_study_rejects_what_it_does_not_declare():
    arm = Arm('a', VMOE, 'similarity', (0,), baseline='b')
    with pytest.raises(StudyError, match=r'a \(baseline b\).*family vmoe \(reference vmoe_softmax\).*smoke arm c'):
        Study('x', 't', (VMOE,), (arm,), 'setup', ('c',))


def test_arms_resolve_to_the_committed_runs_and_differ_only_in_the_router():
    summaries = load_summaries(V1, REPO / 'docs')
    assert sorted(s['run'] for s in summaries) == sorted(_names(select_runs(V1)))
    configs = {a.name: arm_config(a) for a in V1.arms}  # train.py's own validation
    for s in summaries:
        config = configs[s['arm']]
        assert (config['model'], config['router'], config['router_kwargs'], config['epochs']) == \
            (s['model'], s['router'], s['router_kwargs'], s['epochs'])
    for family in V1.families:
        rests = [{k: v for k, v in configs[a.name].items() if k not in ('router', 'router_kwargs')}
                 for a in V1.arms if a.family == family]
        assert all(r == rests[0] for r in rests) and rests[0]['val_size'] > 0, f'{family.name} arms differ'
    # the base alone is the family's reference arm
    for family in V1.families:
        assert parse_config(['-c', str(REPO / family.config)]) == configs[family.reference]


def test_committed_fluctuation_windows_follow_window_mean():
    for s in load_summaries(V1, REPO / 'docs'):
        f = s['fluctuation']
        for name, (lo, hi) in FLUCTUATION_WINDOWS.items():
            assert f['windows'][name]['mean'] == window_mean(f['curves']['mean'], f['epochs'], s['epochs'], lo, hi)


def test_report_from_the_committed_summaries_is_the_committed_results_md(tmp_path):
    committed = (REPO / 'docs' / 'results.md').read_text()
    assert render_report(V1, load_summaries(V1, REPO / 'docs'), tmp_path, committed) == committed
    assert (tmp_path / 'results' / 'vmoe_fluctuation.png').is_file()


# ---- selection, planning and the budget ----

def test_select_runs_order_and_errors():
    names = _names(select_runs(V1))
    # the V-MoE comparison seed-major (each seed's softmax reference first), then Swin-MoE, then the ablations
    assert names[:4] == ['vmoe_softmax_s0', 'vmoe_similarity_s0', 'vmoe_attention_s0', 'vmoe_softmax_s1']
    assert names[9:12] == ['swinmoe_softmax_s0', 'swinmoe_similarity_s0', 'swinmoe_attention_s0']
    assert len(names) == 16 and names[-1] == 'vmoe_similarity_alpha05_s0'
    assert _names(select_runs(V1, ['swinmoe_softmax'], [0, 1])) == ['swinmoe_softmax_s0']
    with pytest.raises(StudyError, match='unknown arm.*nope.*choose from'):
        select_runs(V1, ['nope'])


def test_fits_budget():
    assert fits_budget(100.0, 50.0, 150.0)
    assert not fits_budget(100.0, 51.0, 150.0)
    assert fits_budget(1e9, 1e9, None)


def test_plan_statuses_and_estimates(tmp_path):
    runs_dir, docs = tmp_path / 'runs', tmp_path / 'docs'
    _write_summary(docs, _summary(_fake_run(tmp_path / 'src'), 'vmoe_softmax', 0))
    partial = runs_dir / 'vmoe_similarity_s0'
    partial.mkdir(parents=True)
    (partial / 'last.pt').write_bytes(b'')
    (partial / 'metrics.jsonl').write_text('{"epoch": 1}\n{"epoch": 2}\n')
    rows = {r['run']: r for r in plan_runs(V1, select_runs(V1), runs_dir, docs)}
    assert rows['vmoe_softmax_s0'] == {'run': 'vmoe_softmax_s0', 'status': 'done', 'estimate_s': 0.0}
    # partial: 8 of 10 epochs left at the V-MoE family's measured 460 / 4 = 115 s each, + 50 s evaluation + 60 s
    # = 1030 s
    assert rows['vmoe_similarity_s0']['status'] == 'partial'
    assert rows['vmoe_similarity_s0']['estimate_s'] == pytest.approx(1030.0)
    # todo with a finished run of the same arm: its measured 460 s / 4 epochs x 10 + its 50 s evaluation + 60 = 1260 s
    assert rows['vmoe_softmax_s1']['estimate_s'] == pytest.approx(1260.0)
    # no run of the arm yet: the V-MoE family's measurement (vmoe_softmax_s0) stands in
    assert rows['vmoe_attention_s0'] == {'run': 'vmoe_attention_s0', 'status': 'todo', 'estimate_s': 1260.0}
    # Swin-MoE has no measurement: 4 epochs x 24000 / 150 img/s + 500 s evaluation + 60 s = 1200 s
    assert rows['swinmoe_softmax_s0']['estimate_s'] == pytest.approx(4 * 24000 / 150 + 500 + 60)


def test_estimate_without_measurements():
    # 10 epochs x 55000 / 780 img/s = 705.1 s + 150 s evaluation + 60 s overhead = 915.1 s
    r = select_runs(V1, ['vmoe_attention'], [0])[0]
    assert estimate_seconds(V1, r, Path('/nonexistent'), []) == pytest.approx(10 * 55000 / 780 + 150 + 60)


def test_run_stops_before_a_run_that_would_exceed_the_budget(tmp_path):
    runs_dir, docs = tmp_path / 'runs', tmp_path / 'docs'
    source = _fake_run(tmp_path / 'src')
    now = [0.0]
    executed = []

    def execute(study, r, runs_dir_, docs_, plan, cache_dir, extra, log):
        executed.append(r.name)
        _write_summary(docs_, _summary(source, r.arm.name, r.seed))
        now[0] += 1500.0  # each run takes 1500 s of the session's clock

    runs = select_runs(V1, ['vmoe_softmax', 'vmoe_similarity'], [0])
    logs = []
    # budget 2000 s: the first run's estimate (915 s, see above) fits; after it, 1500 s have passed and the next one,
    # estimated from the finished V-MoE run at 10 x 115 + 50 + 60 = 1260 s, would end at 2760 s > 2000: stop
    done = run.run_study(V1, runs, runs_dir, docs, 2000.0, V1.eval_plan, tmp_path / 'cache', log=logs.append,
                         clock=lambda: now[0], execute=execute)
    assert done == executed == ['vmoe_softmax_s0']
    assert 'stopping before vmoe_similarity_s0' in logs[-1] and 'commit ' + str(docs / 'results') in logs[-1]
    # the next session skips the finished run and does the rest
    done = run.run_study(V1, runs, runs_dir, docs, 2000.0, V1.eval_plan, tmp_path / 'cache', log=logs.append,
                         clock=lambda: now[0], execute=execute)
    assert done == ['vmoe_similarity_s0']


def test_run_evaluates_each_family_with_its_own_plan(tmp_path):
    """v2: AutoAttack for the 49-token V-MoE runs only; a plan given (the smoke test's) overrides both."""
    from study.design import EvalPlan
    from study.v2 import V2
    plans = {}

    def execute(study, r, runs_dir_, docs_, plan, cache_dir, extra, log):
        plans[r.name] = plan

    runs = select_runs(V2, ['v2_vmoe_softmax', 'swinmoe_softmax'], [1])
    run.run_study(V2, runs, tmp_path / 'runs', tmp_path / 'docs', None, None, tmp_path / 'cache', execute=execute,
                  log=lambda m: None)
    assert plans['v2_vmoe_softmax_s1'].autoattack_eps == (4.0,) and plans['swinmoe_softmax_s1'] == EvalPlan()
    given = EvalPlan(eval_subset=8)
    run.run_study(V2, runs, tmp_path / 'runs', tmp_path / 'docs', None, given, tmp_path / 'cache', execute=execute,
                  log=lambda m: None)
    assert set(plans.values()) == {given}


# ---- running one run (train.py / evaluate.py faked) ----

def test_execute_run_trains_evaluates_and_summarises(tmp_path, monkeypatch):
    runs_dir, docs = tmp_path / 'runs', tmp_path / 'docs'
    calls = []

    def fake_call(cmd, log):
        calls.append(run.command_text(cmd))
        if cmd[1].endswith('train.py'):
            maps = _fake_run(runs_dir, cmd[cmd.index('--experiment') + 1]) / 'eval' / 'expert_maps'
            maps.mkdir()
            (maps / 'blocks.3.mlp.png').write_bytes(b'png')
        return 0

    monkeypatch.setattr(run, '_call', fake_call)
    reference = _fake_run(runs_dir, 'vmoe_softmax_s0', 'softmax')
    reference_errors = {'gaussian_noise': {'1': 0.4, '2': 0.4}, 'contrast': {'1': 0.2, '2': 0.2}}
    _write_summary(docs, _summary(reference, 'vmoe_softmax', 0,
                                  corruption={'errors': reference_errors, 'per_severity': {}}))
    tau = Run(V1.arm('vmoe_similarity_tau005'), 0)
    summary = run.execute_run(V1, tau, runs_dir, docs, V1.eval_plan, tmp_path / 'cache', [], log=lambda m: None)
    train, evaluate = calls
    assert train.startswith('python train.py -c configs/study/vmoe_base.yaml --router similarity --router-kwargs '
                            '\'{"tau": 0.05}\' --seed 0 ')
    assert f'--reference {runs_dir}/vmoe_softmax_s0/eval/results.json' in evaluate
    assert summary['commands'] == calls
    # CE gaussian_noise = mean(.2, .4) / .4 = .75, contrast = mean(.3, .5) / .2 = 2 -> mCE 137.5
    assert summary['corruption']['relative_mce'] == pytest.approx(137.5)
    assert summary['expert_map'] == 'results/maps/vmoe_similarity_tau005_s0.png'
    assert (docs / summary['expert_map']).read_bytes() == b'png'
    assert json.loads(V1.summary_path(docs, tau.name).read_text()) == summary
    # done training and evaluation are not redone
    calls.clear()
    run.execute_run(V1, tau, runs_dir, docs, V1.eval_plan, tmp_path / 'cache', [], log=lambda m: None)
    assert calls == []


# ---- summary extraction ----

def test_summarize_run_hand_worked(tmp_path):
    s = summarize_run(_fake_run(tmp_path), tmp_path / 'vmoe_similarity_s0' / 'eval' / 'results.json',
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
    # fluctuation over 4 epochs, curve at epochs 2, 3, 4: 40-90 % keeps epochs 2, 3 -> (0.3 + 0.2) / 2 = 0.25;
    # last 30 % keeps 3, 4 -> 0.15; blocks.3.mlp 0.2 and 0.15
    assert s['fluctuation']['windows']['40-90%']['mean'] == pytest.approx(0.25)
    assert s['fluctuation']['windows']['last 30%']['mean'] == pytest.approx(0.15)
    assert s['fluctuation']['windows']['40-90%']['blocks.3.mlp'] == pytest.approx(0.2)
    # epoch time (100 + 110 + 120 + 130) / 4 = 115; wall = 460 training + 50 evaluation
    assert s['timing'] == {'epoch_s': 115.0, 'train_s': 460.0, 'eval_s': 50.0, 'wall_s': 510.0}
    assert s['hardware'] == HARDWARE and s['commands'] == ['cmd']


def test_summarize_run_missing_file(tmp_path):
    run_dir = _fake_run(tmp_path)
    (run_dir / 'results.json').unlink()
    with pytest.raises(StudyError, match='results.json is missing: finish the run first'):
        summarize_run(run_dir, run_dir / 'eval' / 'results.json', 'vmoe_similarity', 0, [])


# ---- report ----

def test_report_tables_conclusions_missing_runs_and_human_text(tmp_path):
    docs = tmp_path / 'docs'
    source = _fake_run(tmp_path / 'src')
    for seed, top1 in ((0, 80.0), (1, 82.0)):
        _write_summary(docs, _summary(source, 'vmoe_softmax', seed, test_top1=top1))
    for seed, top1 in ((0, 81.0), (1, 81.0)):
        _write_summary(docs, _summary(source, 'vmoe_similarity', seed, test_top1=top1))
    _write_summary(docs, _summary(source, 'vmoe_similarity_tau005', 0, test_top1=83.5, val_top1=81.25))
    path = write_report(V1, docs)
    text = path.read_text()
    assert 'Runs missing: vmoe_attention_s0, vmoe_attention_s1, vmoe_softmax_s2,' in text
    assert '5 of 16 runs done' in text
    assert '### vmoe ablations (1 seed; baseline: similarity, tau 0.1, mix probs, alpha 1)' in text
    assert '| similarity | 1/1 | 81.00 |' in text and '| similarity, tau=0.05 | 1/1 | 83.50 |' in text  # seed 0
    # an ablation is paired with its baseline (similarity), not with softmax: 83.5 - 81 at seed 0
    assert '- vmoe similarity, tau=0.05 − similarity, test top-1 (%): +2.50 pp over 1 seed(s)' in text
    assert 'tau=0.05 − softmax' not in text
    # validation is paired too: 81.25 - 82.0 (the fake run's best val top-1) at seed 0
    assert '- vmoe similarity, tau=0.05 − similarity, val top-1 (%): -0.75 pp over 1 seed(s)' in text
    assert '| similarity, tau=0.5 | 0/1 | – |' in text  # an ablation without runs stays an empty row
    # softmax 80, 82 -> 81.00 ± 1.41; similarity 81, 81 -> 81.00 ± 0.00; 2 of 3 seeds
    assert '| softmax | 2/3 | 81.00 ± 1.41 |' in text
    assert '| similarity | 2/3 | 81.00 ± 0.00 |' in text
    assert '| attention | 0/3 | – |' in text
    # paired: seed 0 +1, seed 1 -1 -> +0.00 ± 1.41 pp; relative mCE vs itself-equal errors: 100 - 100 = 0
    assert '- vmoe similarity − softmax, test top-1 (%): +0.00 ± 1.41 pp over 2 seed(s)' in text
    assert '- vmoe similarity − softmax, mCE vs softmax (%): +0.00 ± 0.00 over 2 seed(s)' in text
    assert '- swinmoe' not in text  # no paired Swin-MoE runs
    assert (docs / 'results' / 'vmoe_fluctuation.png').is_file()
    assert '![vmoe_accuracy_vs_severity.png](results/vmoe_accuracy_vs_severity.png)' in text
    assert "--router similarity --router-kwargs '{\"tau\": 0.05}' --seed S" in text
    assert HUMAN_BEGIN in text and 'Test CPU' in text and V1.commands_note in text
    # the human-written conclusion survives regeneration
    edited = text.replace('_To be written by a person', 'Similarity routing helps a little. _To be written')
    path.write_text(edited)
    assert 'Similarity routing helps a little.' in write_report(V1, docs).read_text()


def test_entropy_section_says_whether_the_graph_lowered_the_entropy(tmp_path):
    docs = tmp_path / 'docs'
    source = _fake_run(tmp_path / 'src')
    cases = (('vmoe_softmax', 0, 1.5, 1.5), ('vmoe_softmax', 1, 1.5, 1.5),
             ('vmoe_similarity', 0, 1.9, 1.7), ('vmoe_similarity', 1, 1.8, 1.6), ('vmoe_attention', 0, 1.4, 1.6))
    for arm, seed, h_p, h_g in cases:
        summary = _summary(source, arm, seed)
        summary['routing']['diagnostics'] = {'entropy': h_p, 'gate_entropy': h_g, 'margin': 0.1, 'flip': 0.5}
        _write_summary(docs, summary)
    text = write_report(V1, docs).read_text()
    # similarity: H(P) 1.9, 1.8 -> 1.850 ± 0.071; H(P) - H(G) 0.2, 0.2; vs softmax 0.4, 0.3 -> +0.350 ± 0.071
    assert ('| vmoe: similarity | 2 | 1.850 ± 0.071 | 1.650 ± 0.071 | +0.200 ± 0.000 | +0.350 ± 0.071 | '
            '0.500 ± 0.000 | raised (0 of 2 runs lower) |') in text
    assert '| vmoe: attention | 1 | 1.400 | 1.600 | -0.200 | -0.100 | 0.500 | lowered (1 of 1 runs lower) |' in text
    assert '| vmoe: softmax |' not in text  # the reference's P is its G


def test_cli_plan_and_errors(tmp_path, capsys):
    assert main(['plan', '--runs-dir', str(tmp_path / 'r'), '--docs', str(tmp_path / 'd'),
                 '--arms', 'vmoe_softmax']) == 0
    out = capsys.readouterr().out
    assert 'vmoe_softmax_s2' in out and 'todo' in out and '0/3 done' in out
    assert main(['plan', '--arms', 'nope']) == 2
    assert 'unknown arm(s) nope' in capsys.readouterr().err
    assert main(['run', '--smoke', '--docs', str(tmp_path)]) == 2
    assert '--smoke writes to a temporary folder' in capsys.readouterr().err
    assert list(STUDIES) == ['v1', 'v2'] and STUDIES['v1'] is V1


@pytest.mark.slow
def test_smoke_end_to_end(tmp_path, monkeypatch, capsys):
    """The real pipeline (train.py and evaluate.py subprocesses) on vmoe_test, in a temporary folder (~1-2 min)."""
    monkeypatch.setattr('tempfile.tempdir', str(tmp_path))
    assert main(['run', '--smoke', '--seeds', '0']) == 0
    root = next(tmp_path.glob('simoe-study-smoke-*'))
    summaries = load_summaries(V1, root / 'docs')
    assert [s['run'] for s in summaries] == ['vmoe_similarity_s0', 'vmoe_softmax_s0']
    assert summaries[0]['corruption']['relative_mce'] > 0 and summaries[0]['eval']['images'] == 32
    assert 'vmoe similarity − softmax, test top-1' in (root / 'docs' / 'results.md').read_text()


def test_v2_arms_resolve_and_differ_only_in_router_settings():
    from study.v2 import NOISE, OTHER_NOISE, V2
    assert STUDIES['v2'] is V2
    configs = {a.name: arm_config(a) for a in V2.arms}  # train.py's own validation
    base = configs['v2_vmoe_softmax']
    assert base['model_kwargs']['capacity_factor'] == 'dropless' and base['epochs'] >= 8
    assert base['train_subset'] == 20000 and base['img_size'] == 28
    for arm in V2.arms:
        if arm.family.name == 'vmoe49':
            c = configs[arm.name]
            assert {k: v for k, v in c.items() if k not in ('router', 'router_kwargs')} == \
                {k: v for k, v in base.items() if k not in ('router', 'router_kwargs')}
            if arm.router != 'softmax':
                assert c['router_kwargs']['noise'] in (NOISE, OTHER_NOISE)
    assert {a.seeds for a in V2.arms if a.baseline is None} == {(0, 1, 2)}
    # the setting where the reconciliation found the effect, extended to 8 epochs: the reference config but for that
    reference = parse_config(['-c', str(REPO / 'configs/reconcile/reference.yaml')])
    differs = {k for k in base if base[k] != reference.get(k)}
    assert differs == {'epochs', 'warmup_epochs'} and base['warmup_epochs'] == 0.1 * base['epochs']
    plan = V2.plan_for(V2.arm('v2_vmoe_softmax').family)
    flags = plan.flags(0)
    assert flags[flags.index('--autoattack-eps') + 1] == '4' and flags[flags.index('--autoattack-subset') + 1] == '100'
    assert 'autoattack' not in ' '.join(plan.flags(1))  # seed 0 only: its cost
    assert 'autoattack' not in ' '.join(plan.flags(0, ablation=True))  # and the router comparison only
    assert 'autoattack' not in ' '.join(V2.plan_for(V2.arm('swinmoe_softmax').family).flags(0))  # as its seed 0


def test_reconcile_runs_table_and_summary(tmp_path):
    from study import reconcile
    names = [r.arm.name for _, r in reconcile.reconcile_runs()]
    assert names[:2] == ['reference_softmax', 'reference_attention'] and 'noise_softmax' not in names
    assert [r.arm.name for _, r in reconcile.reconcile_runs(['init'], ['attention'])] == ['init_attention']
    for _, r in reconcile.reconcile_runs():
        arm_config(r.arm)  # every setting is a valid train.py configuration
    rows = [{'epoch': e, 'fluctuation': f, 'entropy': 1.5, 'gate_entropy': 1.6, 'margin': 0.2, 'flip': 0.1,
             'val_top1': 80.0, 'epoch_time': 9.0} for e, f in ((1, None), (2, 0.3), (3, 0.25))]
    (tmp_path / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    summary = reconcile.summarize(tmp_path, 'reference', 'softmax')
    assert summary['test_top1'] is None and summary['fluctuation'] == [None, 0.3, 0.25]
    table = reconcile.table({'reference_softmax': summary})
    assert ('| reference: the reference setting | softmax | 0.300 / 0.250 | 1.50 | 1.60 | 0.20 | 0.10 | '
            '(val 80.0 after epoch 3; running) |') in table
    assert '| reference: the reference setting | attention | not run |' in table

"""evaluate.py end to end on a tiny fake Fashion-MNIST with two vmoe_test runs (softmax and similarity router),
its error paths through the CLI, and the evaluation package's pure helpers worked by hand."""
import json
import math
import shutil
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
import timm
import torch
from fixtures import TINY, idx_gz
from PIL import Image
from safetensors.torch import save_file

from simoe_vision.engine import main as train_main
from simoe_vision.evaluation import (
    CleanSet,
    EvalSettings,
    add_relative_ce,
    agreement_table,
    expert_colormap,
    main,
    patch_grid,
    per_severity,
    record_top1,
    save_expert_maps,
)
from simoe_vision.evaluation.loading import load_model
from simoe_vision.evaluation.plots import line_plot, pointwise_mean
from simoe_vision.evaluation.report import format_mean_std, markdown_table, mean_of, mean_std, relative_ce
from simoe_vision.evaluation.runner import run_clean, run_corruptions
from simoe_vision.metrics import RoutingRecorder
from simoe_vision.robustness import imagenet_synsets, read_timm_info

SMOKE = ['--eval-subset', '8', '--corruptions', 'gaussian_noise,contrast', '--severities', '1,3', '--pgd-steps', '2',
         '--eps', '4', '--num-maps', '2', '--batch-size', '8', '--no-progress']


@pytest.fixture(scope='module')
def runs(tmp_path_factory) -> dict:
    """Fake Fashion-MNIST (class k: a bright band at rows 2k..2k+5 plus noise) and two 2-epoch vmoe_test runs."""
    root = tmp_path_factory.mktemp('eval')
    data = root / 'fmnist'
    data.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (('train', 80), ('t10k', 16)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28), dtype=np.uint8)
        for i, k in enumerate(labels):
            images[i, 2 * k:2 * k + 6] += 180
        idx_gz(data / f'{prefix}-images-idx3-ubyte.gz', images)
        idx_gz(data / f'{prefix}-labels-idx1-ubyte.gz', labels)
    out = {'data': data, 'root': root}
    for router, name in (('softmax', 'soft'), ('similarity', 'sim')):
        code = train_main(TINY + ['--epochs', '2', '--data-dir', str(data), '--output', str(root / 'runs'),
                                  '--experiment', name, '--router', router, '--lr', '3e-3'])
        assert code == 0
        out[name] = root / 'runs' / name
    return out


def evaluate(args, capsys):
    code = main([str(a) for a in args])
    return code, capsys.readouterr()


def test_end_to_end_two_checkpoints_side_by_side(runs, tmp_path, capsys):
    out = tmp_path / 'out'
    code, cap = evaluate(['--checkpoint', runs['soft'], '--checkpoint', runs['sim'], '--data-dir', runs['data'],
                          '--suite', 'clean,c,adv,routing', '--output', out, '--cache-dir', tmp_path / 'cache']
                         + SMOKE, capsys)
    assert code == 0, cap.err
    results = json.loads((out / 'results.json').read_text())
    assert results['meta']['num_images'] == 8
    soft, sim = results['checkpoints']['soft'], results['checkpoints']['sim']
    assert (soft['router'], sim['router']) == ('softmax', 'similarity')
    for r in (soft, sim):
        assert set(r['clean']) >= {'top1', 'top5', 'nll', 'ece'} and r['clean']['num_samples'] == 8
        assert set(r['corruptions']['cells']) == {'gaussian_noise', 'contrast'}
        assert set(r['corruptions']['cells']['contrast']) == {'1', '3'}
        for attack in r['adversarial']:
            # the attack sees the same 8 images as the clean suite, and can only lower accuracy on them
            assert attack['clean_top1'] == pytest.approx(r['clean']['top1'])
            assert attack['adv_top1'] <= attack['clean_top1']
        agreement = r['routing']['agreement']['gaussian_noise']['3']['blocks.1.mlp']
        assert 0.0 <= agreement <= 1.0
        layer = r['routing']['layers']['blocks.1.mlp']
        assert sum(layer['load']) == pytest.approx(1.0)
        assert layer['load_cv'] == pytest.approx(float(np.std(layer['load']) / np.mean(layer['load'])), rel=1e-5)
        assert all(Path(p).is_file() for p in r['expert_maps'])
    # CE of the similarity model relative to the softmax one: its mean error over severities / softmax's
    relative = sim['corruptions']['relative']['soft']
    for c in ('gaussian_noise', 'contrast'):
        assert relative['ce'][c] == pytest.approx(sim['corruptions']['mean_error'][c]
                                                  / soft['corruptions']['mean_error'][c])
    assert 'relative' not in soft['corruptions']
    md = (out / 'results.md').read_text()
    for section in ('## Clean', '## Corruptions', '## Adversarial', '## Routing agreement', '## Expert load',
                    'rel. mCE vs soft'):
        assert section in md
    assert (out / 'accuracy_vs_severity.png').is_file() and (out / 'routing_agreement_vs_severity.png').is_file()
    assert 'evaluation summary' in cap.out

    # an earlier results.json as --reference: CE relative to its softmax model
    code, cap = evaluate(['--checkpoint', runs['sim'], '--data-dir', runs['data'], '--suite', 'c',
                          '--output', tmp_path / 'ref', '--cache-dir', tmp_path / 'cache', '--reference',
                          out / 'results.json'] + SMOKE, capsys)
    assert code == 0, cap.err
    again = json.loads((tmp_path / 'ref' / 'results.json').read_text())['checkpoints']['sim']['corruptions']
    assert again['relative'][f'soft ({out / "results.json"})']['mce'] == pytest.approx(relative['mce'])


def test_routing_agreement_is_one_on_identical_inputs(runs):
    loaded = load_model(runs['sim'])
    rng = np.random.default_rng(1)
    clean = CleanSet(rng.integers(0, 256, (6, 28, 28), dtype=np.uint8), np.arange(6) % 10, 'random')
    dataset = clean.dataset(loaded.data_config)
    settings = EvalSettings(device=torch.device('cpu'), batch_size=4, progress=False)
    recorder = RoutingRecorder(loaded.model)
    top1 = run_clean(loaded.model, dataset, settings, recorder)['top1_experts']
    result = run_corruptions(loaded.model, lambda c, s: dataset, ['gaussian_noise', 'snow'], [1, 2], settings,
                             recorder, top1)
    values = [v for by_s in result['routing_agreement'].values() for layers in by_s.values() for v in layers.values()]
    assert len(values) == 2 * 2 * 2 and all(v == 1.0 for v in values)  # 2 corruptions x 2 severities x (layer, mean)


def test_agreement_table_by_hand():
    clean = {'l': torch.tensor([[0, 1, 2, 3]])}
    # cells stacked corruption-major: (a, 1) then (a, 2); (a,1) differs in 1 of 4 tokens -> 0.75, (a,2) in 3 -> 0.25
    corrupted = {'l': torch.tensor([[0, 1, 2, 0], [3, 3, 3, 3]])}
    table = agreement_table(clean, corrupted, ['a'], [1, 2])
    assert table == {'a': {1: {'l': 0.75, 'mean': 0.75}, 2: {'l': 0.25, 'mean': 0.25}}}
    with pytest.raises(ValueError, match='recorded 2 corrupted images for 3 cells'):
        agreement_table(clean, corrupted, ['a'], [1, 2, 3])


def test_relative_ce_and_per_severity_by_hand():
    # softmax: errors 0.5, 0.7 -> mean 0.6; other: 0.3, 0.3 -> mean 0.3; CE = 0.3 / 0.6 = 0.5, mCE = 100 * 0.5 = 50
    results = {
        'soft': {'router': 'softmax', 'corruptions': {'errors': {'fog': {1: 0.5, 3: 0.7}}, 'corruptions': ['fog'],
                                                      'severities': [1, 3]}},
        'sim': {'router': 'similarity', 'corruptions': {'errors': {'fog': {1: 0.3, 3: 0.3}}, 'corruptions': ['fog'],
                                                        'severities': [1, 3]}},
    }
    add_relative_ce(results)
    assert results['sim']['corruptions']['relative']['soft']['ce']['fog'] == pytest.approx(0.5)
    assert results['sim']['corruptions']['relative']['soft']['mce'] == pytest.approx(50.0)
    assert 'relative' not in results['soft']['corruptions']
    # severity 1: (10 + 30) / 2 = 20; severity 3: 50 (one corruption); string keys (from JSON) become ints
    assert per_severity({'a': {'1': 10.0, '3': 50.0}, 'b': {'1': 30.0}}) == {1: 20.0, 3: 50.0}


def test_relative_ce_reads_json_keyed_tables():
    # CE_a = mean(0.2, 0.4) / mean(0.4, 0.4) = 0.75; CE_b = mean(0.5, 0.5) / mean(0.25, 0.25) = 2 -> mCE 137.5;
    # string severities (a summary read back from JSON) against int ones
    errors = {'a': {'1': 0.2, '2': 0.4}, 'b': {'1': 0.5, '2': 0.5}}
    reference = {'a': {1: 0.4, 2: 0.4}, 'b': {1: 0.25, 2: 0.25}}
    scored = relative_ce(errors, reference)
    assert scored['ce'] == pytest.approx({'a': 0.75, 'b': 2.0}) and scored['mce'] == pytest.approx(137.5)
    assert relative_ce(errors, reference, corruptions=['a'], severities=['1'])['mce'] == pytest.approx(50.0)  # .2/.4


def test_mean_std_format_and_table():
    # [1, 2, 3, 4]: mean 2.5; squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5, / (n-1) = 5/3, sqrt = 1.2910
    mean, std, n = mean_std([1.0, 2.0, None, 3.0, 4.0])
    assert (mean, n) == (2.5, 4) and std == pytest.approx(math.sqrt(5 / 3))
    assert mean_std([7.0]) == (7.0, None, 1) and mean_std([None]) == (None, None, 0)
    assert mean_of([1.0, None, 2.0]) == 1.5 and mean_of([]) is None
    assert format_mean_std([1.0, 2.0, 3.0, 4.0]) == '2.50 ± 1.29'
    assert format_mean_std([7.0], 3) == '7.000'
    assert format_mean_std([None]) == '–'
    assert format_mean_std([1.0, -1.0], sign=True) == '+0.00 ± 1.41'  # std of (1, -1): sqrt((1 + 1) / 1)
    assert markdown_table(['a', 'b'], [['1', 2]]) == ['| a | b |', '|---|---|', '| 1 | 2 |']


def test_pointwise_mean_and_line_plot(tmp_path):
    # x 1: (10 + 30) / 2; x 2: 20 (the None is skipped); keys from JSON become ints
    assert pointwise_mean([{'1': 10.0, '2': None}, {1: 30.0, 2: 20.0}]) == {1: 20.0, 2: 20.0}
    path = tmp_path / 'sub' / 'curve.png'
    assert line_plot({'a': {1: 0.5, 2: 0.25}, 'empty': {}}, path, 'epoch', 'y', 'title') == str(path)
    assert plt.imread(path).shape[:2] == (440, 660)  # 6 x 4 in at 110 dpi
    assert line_plot({'empty': {}}, tmp_path / 'none.png', 'x', 'y', 't') is None
    assert not (tmp_path / 'none.png').exists()


def test_patch_grid_drops_class_token():
    top1 = torch.arange(17).view(1, 17)  # ViT: class token 0, then a 4 x 4 raster grid 1..16
    grid = patch_grid(top1, num_prefix_tokens=1)
    assert grid.shape == (1, 4, 4) and grid[0, 0, 0] == 1 and grid[0, 1, 0] == 5 and grid[0, 3, 3] == 16
    with pytest.raises(ValueError, match='do not form a square grid'):
        patch_grid(top1, num_prefix_tokens=0)


def test_weights_file_carries_its_run_config(runs, tmp_path):
    weights = tmp_path / 'copied.safetensors'
    shutil.copy(runs['sim'] / 'best.safetensors', weights)  # no config.yaml beside it: the metadata has the config
    loaded = load_model(weights)
    assert (loaded.label, loaded.config['model'], loaded.router, loaded.config['num_experts']) == \
        ('copied', 'vmoe_test', 'similarity', 4)
    run = load_model(runs['sim'])
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), run.model(x), rtol=0, atol=0)
    assert load_model(weights, router='softmax').router == 'softmax'  # an explicit flag still wins


def test_weights_file_loads_with_flags_and_mismatch_is_one_message(runs, tmp_path, capsys):
    weights = tmp_path / 'sim.safetensors'  # a state dict without train.py's metadata (e.g. saved by hand)
    save_file(load_model(runs['sim']).model.state_dict(), weights)
    loaded = load_model(weights, model='vmoe_test', router='similarity', model_kwargs={'num_experts': 4})
    assert (loaded.label, loaded.router, loaded.config['num_experts']) == ('sim', 'similarity', 4)
    code, cap = evaluate(['--checkpoint', weights, '--model', 'vmoe_test', '--model-kwargs', '{"num_experts": 8}',
                          '--data-dir', runs['data'], '--output', tmp_path / 'o'] + SMOKE, capsys)
    assert code == 2 and 'Traceback' not in cap.err
    assert 'do not fit vmoe_test' in cap.err and 'mis-shaped' in cap.err
    assert 'blocks.1.mlp.router.gate.weight (4, 32) vs model (8, 32)' in cap.err
    assert 'a different num_experts (the model was built with 8 experts)' in cap.err
    code, cap = evaluate(['--checkpoint', weights, '--output', tmp_path / 'o'], capsys)
    assert code == 2 and 'has no config.yaml beside it and no train.py run config in its metadata: pass --model' \
        in cap.err


def test_conv_stem_weights_load_with_their_input_channels(tmp_path):
    """stem='conv' replaces the cfg's first conv (patch_embed.proj): in_chans comes from the stem's first conv."""
    torch.manual_seed(0)
    net = timm.create_model('vmoe_test', stem='conv', in_chans=1, num_classes=10, img_size=28, num_experts=4)
    weights = tmp_path / 'stem.safetensors'
    save_file(net.state_dict(), weights)
    loaded = load_model(weights, model='vmoe_test', model_kwargs={'stem': 'conv', 'num_experts': 4, 'img_size': 28})
    assert loaded.model.patch_embed.backbone[0].conv.in_channels == 1 and loaded.config['data'] == 'fashion_mnist'
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), net.eval()(x), rtol=0, atol=0)


def test_missing_imagenet_c_folders_listed_in_one_error(runs, tmp_path, capsys):
    root = tmp_path / 'imagenet-c'
    (root / 'gaussian_noise' / '1' / 'n01440764').mkdir(parents=True)
    code, cap = evaluate(['--checkpoint', runs['soft'], '--suite', 'c', '--imagenet-c-dir', root,
                          '--corruptions', 'gaussian_noise,contrast', '--severities', '1,2',
                          '--output', tmp_path / 'o'], capsys)
    assert code == 2 and 'Traceback' not in cap.err
    assert 'incomplete (2 problems)' in cap.err
    assert 'gaussian_noise/2/' in cap.err and 'contrast/ (the whole corruption)' in cap.err


def test_bad_flags_are_reported_together(runs, tmp_path, capsys):
    code, cap = evaluate(['--checkpoint', runs['soft'], '--suite', 'clean,x', '--corruptions', 'fogg',
                          '--suite', 'a', '--output', tmp_path / 'o'], capsys)
    assert code == 2
    assert '--suite a needs --imagenet-a-dir' in cap.err and 'unknown corruption(s) fogg' in cap.err
    code, cap = evaluate(['--checkpoint', runs['soft'], '--attacks', 'pgd', '--autoattack-eps', '4',
                          '--output', tmp_path / 'o'], capsys)
    assert code == 2 and '--autoattack-eps needs autoattack among --attacks' in cap.err
    code, cap = evaluate(['--checkpoint', runs['soft'], '--attacks', 'autoattack', '--eps', '1,4',
                          '--autoattack-eps', '8', '--output', tmp_path / 'o'], capsys)
    assert code == 2 and '--autoattack-eps 8 must be a subset of --eps 1,4' in cap.err


def _png_tree(root: Path, wnids, size: int = 36) -> None:
    rng = np.random.default_rng(0)
    for wnid in wnids:
        (root / wnid).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / wnid / 'x.png')


def test_imagenet_c_a_r_folders_with_a_weights_file(tmp_path, capsys):
    """A 1000-class RGB vmoe_test as a bare weights file on tiny ImageNet-C (one cell), -A and -R folders."""
    model = timm.create_model('vmoe_test', num_classes=1000)
    weights = tmp_path / 'imagenet_vmoe.safetensors'
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    _png_tree(tmp_path / 'c' / 'gaussian_noise' / '1', imagenet_synsets()[:2])
    _png_tree(tmp_path / 'a', read_timm_info('imagenet_a_synsets.txt'), size=8)
    _png_tree(tmp_path / 'r', read_timm_info('imagenet_r_synsets.txt'), size=8)
    code, cap = evaluate(['--checkpoint', weights, '--model', 'vmoe_test', '--suite', 'c,a,r', '--imagenet-c-dir',
                          tmp_path / 'c', '--corruptions', 'gaussian_noise', '--severities', '1', '--imagenet-a-dir',
                          tmp_path / 'a', '--imagenet-r-dir', tmp_path / 'r', '--eval-subset', '6',
                          '--output', tmp_path / 'o', '--no-progress'], capsys)
    assert code == 0, cap.err
    r = json.loads((tmp_path / 'o' / 'results.json').read_text())['checkpoints']['imagenet_vmoe']
    assert r['imagenet_a']['num_samples'] == 6 and r['imagenet_r']['num_samples'] == 6
    corr = r['corruptions']
    assert corr['source'] == 'ImageNet-C' and corr['cells']['gaussian_noise']['1']['num_samples'] == 2
    # one corruption: mCE = 100 * error / AlexNet's mean error for gaussian_noise (0.886428)
    assert corr['alexnet']['mce'] == pytest.approx(100 * corr['errors']['gaussian_noise']['1'] / 0.886428)
    assert 'mCE (AlexNet)' in (tmp_path / 'o' / 'results.md').read_text()


def test_swin_expert_maps_one_grid_per_stage_and_colours(tmp_path):
    model = timm.create_model('swin_moe_test', in_chans=1).eval()  # MoE blocks in both stages: 8x8 and 4x4 maps
    x = torch.randn(2, 1, 32, 32)
    paths = save_expert_maps(model, x, x.flip(-1), 'flipped', {'mean': (0.5,), 'std': (0.5,)}, 4, tmp_path, 'swin',
                             torch.device('cpu'))
    assert [Path(p).name for p in paths] == ['swin_layers-0-blocks-1-mlp.png', 'swin_layers-1-blocks-1-mlp.png']
    grids = {k: patch_grid(v).shape for k, v in record_top1(model, x, torch.device('cpu')).items()}
    assert grids == {'layers.0.blocks.1.mlp': (2, 8, 8), 'layers.1.blocks.1.mlp': (2, 4, 4)}
    gray = plt.get_cmap('tab10').colors[7]
    assert gray not in expert_colormap(8).colors and len(set(expert_colormap(8).colors)) == 8

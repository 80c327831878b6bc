"""Training config: defaults < YAML < command line, and one clear error naming a bad key or value."""
from pathlib import Path

import pytest
import timm
import torch

import simoe_vision  # noqa: F401  (registers the models)
from simoe_vision.engine import OPTIONS, ConfigError, load_yaml, parse_config, parse_kwargs, save_config
from simoe_vision.engine.model_factory import create_model_from_config


def test_precedence_defaults_yaml_cli(tmp_path):
    cfg = tmp_path / 'a.yaml'
    cfg.write_text('router: similarity\nlr: 0.002\nepochs: 7\nrouter-kwargs: {tau: 0.5}\n')
    config = parse_config(['-c', str(cfg), '--lr', '3e-4', '--num-experts', '4'])
    assert config['router'] == 'similarity'  # from YAML
    assert config['epochs'] == 7  # from YAML
    assert config['lr'] == 3e-4  # the flag beats the YAML
    assert config['num_experts'] == 4  # flag over the default
    assert config['batch_size'] == OPTIONS['batch_size'].default  # untouched default
    assert config['router_kwargs'] == {'tau': 0.5}
    assert parse_config(['--strict-data'])['strict_data'] is True
    assert parse_config(['--no-progress'])['progress'] is False
    # the saved config reloads to the same values
    save_config(config, tmp_path / 'saved.yaml')
    assert parse_config(['-c', str(tmp_path / 'saved.yaml')]) == config


def test_base_config_is_overridden_by_flags():
    config = parse_config(['--epochs', '3'], base={'epochs': 2, 'lr': 0.01})
    assert (config['epochs'], config['lr']) == (3, 0.01)


@pytest.mark.parametrize('text,expected', [
    ('{"tau": 0.5, "hops": 2}', {'tau': 0.5, 'hops': 2}),
    ('tau=0.5,hops=2,mode=knn', {'tau': 0.5, 'hops': 2, 'mode': 'knn'}),
    ('', {}),
])
def test_parse_kwargs(text, expected):
    assert parse_kwargs(text) == expected


def test_unknown_yaml_key_names_close_match(tmp_path):
    cfg = tmp_path / 'bad.yaml'
    cfg.write_text('learning_rate: 0.1\nnum_expert: 4\n')
    with pytest.raises(ConfigError, match=r"unknown config key 'learning_rate'.*valid keys"):
        load_yaml(cfg)
    cfg.write_text('num_expert: 4\n')
    with pytest.raises(ConfigError, match=r"'num_expert'.*did you mean num_experts"):
        load_yaml(cfg)


@pytest.mark.parametrize('argv,match', [
    (['--num-expert', '4'], r"unknown config key 'num_expert'.*did you mean num_experts"),
    (['--lr', 'fast'], r"invalid value 'fast' for lr"),
    (['--lr', '-1'], r"invalid value '-1' for lr: must be > 0"),
    (['--router', 'simlarity'], r"for router: choose one of .*did you mean 'similarity'"),
    (['--epochs', '2.5'], r"invalid value '2.5' for epochs: expected an integer"),
    (['--top-k', '3', '--num-experts', '2'], r'top_k: must be <= num_experts'),
    (['--val-size', '1.5'], r'val_size: must be a positive count or a fraction'),
    (['--data', 'imagefolder'], r'data_dir is required'),
    (['--router-kwargs', 'tau'], r'router_kwargs: expected a JSON object or comma-separated key=value'),
    (['--no-progress', 'false'], r'--no-progress is a switch and takes no value: use --progress or --no-progress'),
    (['--epochs', '2', 'extra'], r"unexpected argument 'extra'; options are --key value pairs"),
])
def test_bad_values_name_the_key(argv, match):
    with pytest.raises(ConfigError, match=match):
        parse_config(argv)


def test_bad_yaml_value_and_missing_file(tmp_path):
    cfg = tmp_path / 'v.yaml'
    cfg.write_text('batch_size: many\n')
    with pytest.raises(ConfigError, match="invalid value 'many' for batch_size"):
        load_yaml(cfg)
    with pytest.raises(ConfigError, match='does not exist'):
        load_yaml(tmp_path / 'none.yaml')


SHIPPED = sorted((Path(__file__).resolve().parents[1] / 'configs').glob('*.yaml'))


@pytest.mark.parametrize('path', SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_configs_resolve(path):
    config = parse_config(['-c', str(path)])
    assert timm.is_model(config['model']), config['model']


@pytest.mark.parametrize('path', [p for p in SHIPPED if not p.stem.startswith('imagenet')],
                         ids=[p.stem for p in SHIPPED if not p.stem.startswith('imagenet')])
def test_small_image_configs_build_their_model(path):
    config = parse_config(['-c', str(path)])
    model = create_model_from_config(config, num_classes=10, in_chans=1).eval()
    side = config['img_size'] or model.pretrained_cfg['input_size'][-1]
    with torch.no_grad():
        assert model(torch.randn(2, 1, side, side)).shape == (2, 10)
    if path.stem == 'demo':
        assert model.patch_embed.num_patches == 16  # 7 px patches on the native 28 px images

"""timm_script.py runs a timm script with the models registered and its own argv; a bad path is one line, exit 2."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, HF_HUB_OFFLINE='1', NO_ALBUMENTATIONS_UPDATE='1')


def _run(*args):
    return subprocess.run([sys.executable, str(ROOT / 'timm_script.py'), *map(str, args)], capture_output=True,
                          text=True, env=ENV, cwd=ROOT)


def test_runs_the_script_as_main_with_the_models_registered(tmp_path):
    script = tmp_path / 'train.py'
    script.write_text('import sys, timm\n'
                      'if __name__ == "__main__":\n'
                      '    model = timm.create_model(sys.argv[1], router="attention")\n'
                      '    print(type(model).__name__, sys.argv[1:])\n')
    result = _run(script, 'vmoe_test', '--flag')
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "VisionMoE ['vmoe_test', '--flag']"


def test_a_missing_script_is_one_line_and_exit_2(tmp_path):
    result = _run(tmp_path / 'nope.py')
    assert result.returncode == 2
    assert result.stderr.count('\n') == 1 and 'expected the path of a timm script' in result.stderr

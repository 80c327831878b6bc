"""Run one of timm's own scripts (train.py, validate.py, benchmark.py from a pytorch-image-models checkout) with the
simoe_vision models registered: ``python timm_script.py PATH/TO/timm/train.py --model vmoe_test ...``.

timm's scripts only know the models of the modules they import; this imports ``simoe_vision`` first (which
registers every ``vmoe_*`` / ``swin_moe_*`` entrypoint) and then runs the script as ``__main__`` with the remaining
arguments. MoE settings go through timm's ``--model-kwargs`` (e.g. ``router=attention capacity_factor=dropless``;
with ``--grad-accum-steps N`` add ``aux_loss_scale=1/N`` so the balance weight stays the configured one).
"""
import os
import runpy
import sys
from pathlib import Path

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('NO_ALBUMENTATIONS_UPDATE', '1')

import simoe_vision  # noqa: E402,F401  (registers the models with timm)


def main() -> int:
    if len(sys.argv) < 2 or not Path(sys.argv[1]).is_file():
        given = sys.argv[1] if len(sys.argv) > 1 else 'nothing'
        print(f'error: expected the path of a timm script (train.py, validate.py, benchmark.py from a '
              f'pytorch-image-models checkout) as the first argument, got {given}', file=sys.stderr)
        return 2
    script = str(Path(sys.argv[1]).resolve())
    sys.argv = [script] + sys.argv[2:]
    sys.path.insert(0, str(Path(script).parent))
    runpy.run_path(script, run_name='__main__')
    return 0


if __name__ == '__main__':
    sys.exit(main())

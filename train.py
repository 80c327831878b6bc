#!/usr/bin/env python3
"""Train a sparse MoE vision transformer: ``python train.py -c configs/NAME.yaml [--key value ...]``.

Fashion-MNIST by default, ImageNet-style folders with ``--data imagefolder --data-dir DIR``; ``torchrun
--nproc_per_node N train.py ...`` for DDP. See ``python train.py --help`` and simoe_vision/engine/.
"""
import os
import sys

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('NO_ALBUMENTATIONS_UPDATE', '1')

from simoe_vision.engine import main  # noqa: E402
from simoe_vision.perf.allocator import keep_freed_memory  # noqa: E402

if __name__ == '__main__':
    keep_freed_memory()  # large activations reuse their pages across steps (simoe_vision/perf/allocator.py)
    sys.exit(main())

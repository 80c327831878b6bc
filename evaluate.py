#!/usr/bin/env python3
"""Evaluate MoE checkpoints: ``python evaluate.py --checkpoint RUN_DIR [--checkpoint RUN_DIR2 ...] --output DIR``.

Suites (``--suite``): clean, c (ImageNet-C or generated corruptions), a, r (ImageNet-A/R), adv (FGSM/PGD), routing
(clean-vs-corrupted routing agreement, expert load, expert maps). See ``python evaluate.py --help`` and
simoe_vision/evaluation/.
"""
import os
import sys

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('NO_ALBUMENTATIONS_UPDATE', '1')

from simoe_vision.evaluation import main  # noqa: E402
from simoe_vision.perf.allocator import keep_freed_memory  # noqa: E402

if __name__ == '__main__':
    keep_freed_memory()  # large activations reuse their pages across steps (simoe_vision/perf/allocator.py)
    sys.exit(main())

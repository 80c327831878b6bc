#!/usr/bin/env python3
"""Export a trained model: ``python export.py --checkpoint RUN_DIR [--format onnx|export] [--output FILE]``.

Writes an ONNX model (run with onnxruntime) or a torch.export archive with a dynamic batch dimension, runs it on
deterministic images at two batch sizes and prints the max difference to eager; exits 2 with one line when it exceeds
``--tolerance``. See ``python export.py --help`` and simoe_vision/deploy/.
"""
import os
import sys

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('NO_ALBUMENTATIONS_UPDATE', '1')

from simoe_vision.deploy import main  # noqa: E402

if __name__ == '__main__':
    sys.exit(main())

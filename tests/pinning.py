"""Fixed-seed fingerprints of every registered model x router: train-mode logits, aux loss and gradients, and
eval-mode logits. ``tests/data/fingerprints.json`` was written before the one-way-block restructuring; the test in
``test_pinning.py`` checks that the code still computes the same numbers (so committed study results stay valid).

Regenerate only for an intended numerical change: ``python -m tests.pinning --write`` (say why in the commit).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict

import timm
import torch
import torch.nn.functional as F

import simoe_vision  # noqa: F401

PATH = Path(__file__).parent / 'data' / 'fingerprints.json'
ROUTER_NAMES = ('softmax', 'similarity', 'attention')


def model_names() -> list[str]:
    return timm.list_models(['vmoe_*', 'swin_moe_*'])


def fingerprint(name: str, router: str, **kwargs: Any) -> Dict[str, Any]:
    """Seed 0 weights, a seed-1 batch of 2; one train-mode forward/backward (noise, capacity) and one eval forward."""
    torch.manual_seed(0)
    model = timm.create_model(name, router=router, num_classes=5, **kwargs)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, *model.pretrained_cfg['input_size'], generator=generator)
    y = torch.randint(0, 5, (2,), generator=generator)
    torch.manual_seed(2)
    features = model.forward_features(x)
    logits = model.forward_head(features)
    aux = model.aux_loss()
    (F.cross_entropy(logits, y) + features.square().mean()).backward()
    grads = {n: [float(p.grad.double().sum()), float(p.grad.double().norm())]
             for n, p in model.named_parameters() if p.grad is not None}
    model.eval()
    with torch.no_grad():
        eval_logits = model(x)
    return {'logits': logits.detach().double().tolist(), 'aux_loss': float(aux), 'grads': grads,
            'eval_logits': eval_logits.double().tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--write', action='store_true', help=f'write {PATH}')
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = {f'{m}/{r}': fingerprint(m, r) for m in model_names() for r in ROUTER_NAMES}
    if args.write:
        PATH.write_text(json.dumps(out) + '\n')
        print(f'wrote {len(out)} fingerprints to {PATH}')


if __name__ == '__main__':
    main()

"""The small-scale study behind ``docs/results.md``: the softmax, similarity and attention routers on Fashion-MNIST
(V-MoE nano, 3 seeds; Swin-MoE nano, 1 seed) and four similarity-router ablations (1 seed)."""
from __future__ import annotations

from .design import Arm, Family, Study

__all__ = ['SWINMOE', 'V1', 'VMOE']

# Training throughput on 2 idle CPU cores (images/s in train.py), for time estimates before a run of the family
# exists: V-MoE nano with the demo recipe (16 tokens, batch 128) measured ~780 img/s with MoE in blocks 1/3/5 (the
# last-2 layout is faster, so estimates err long); Swin-MoE nano (256 tokens in its first stage) assumed from a
# 0.7-0.8x speed ratio to the 65-token V-MoE nano. Evaluation: evaluate.py with the study's EvalPlan (corruption
# cache already built), ~77000 forward passes and ~22000 attack steps, estimated from the training speed and rounded
# up. Measured runs replace these.
VMOE = Family('vmoe', 'V-MoE nano (vmoe_nano_patch4_32)', 'configs/study/vmoe_base.yaml', 'vmoe_softmax',
              images_per_second=780.0, eval_seconds=150.0)
SWINMOE = Family('swinmoe', 'Swin-MoE nano (swin_moe_nano_patch2_window4_32)', 'configs/study/swinmoe_base.yaml',
                 'swinmoe_softmax', images_per_second=150.0, eval_seconds=500.0)

SETUP = ('Fashion-MNIST (28 px: native for the V-MoE arms with 7 px patches, zero-padded to 32 for Swin-MoE): '
         '5000 training images held out for model selection (best epoch on validation; the test set is used for '
         'the reported numbers only). Everything equal across routers but the router. Evaluation: `evaluate.py` '
         'on a fixed seeded subset of the test set (see the commands), corruptions generated at 5 severities, '
         'FGSM/PGD L-inf attacks, clean-vs-corrupted routing agreement. Values are mean ± sample std over seeds; '
         '`n` is seeds done / planned. Test top-1 is on the full 10000 test images; the corruption and attack '
         'numbers on the evaluation subset. mCE vs softmax: relative to the softmax run of the same seed (100 = '
         'same). Fluctuation: share of probe tokens whose top-1 expert changed since the previous epoch, averaged '
         'over the epochs ending in 40–90 % and in the last 30 % of training. Agreement s3: at severity 3, averaged '
         'over corruptions and MoE layers.')

# Priority order: the V-MoE router comparison over all seeds first, then Swin-MoE, then the ablations.
V1 = Study(
    name='v1',
    title="Results: the paper's claims at small scale",
    families=(VMOE, SWINMOE),
    arms=(
        Arm('vmoe_softmax', VMOE, 'softmax', (0, 1, 2)),
        Arm('vmoe_similarity', VMOE, 'similarity', (0, 1, 2), description='similarity, tau 0.1, mix probs, alpha 1'),
        Arm('vmoe_attention', VMOE, 'attention', (0, 1, 2)),
        Arm('swinmoe_softmax', SWINMOE, 'softmax', (0,)),
        Arm('swinmoe_similarity', SWINMOE, 'similarity', (0,)),
        Arm('swinmoe_attention', SWINMOE, 'attention', (0,)),
        # P = softmax(S h): the graph mixed into the logits instead of the probabilities
        Arm('vmoe_similarity_mixlogits', VMOE, 'similarity', (0,), {'router_kwargs': {'mix': 'logits'}},
            baseline='vmoe_similarity'),
        Arm('vmoe_similarity_tau005', VMOE, 'similarity', (0,), {'router_kwargs': {'tau': 0.05}},
            baseline='vmoe_similarity'),  # a sharper token graph
        Arm('vmoe_similarity_tau05', VMOE, 'similarity', (0,), {'router_kwargs': {'tau': 0.5}},
            baseline='vmoe_similarity'),  # a flatter token graph
        # P = 0.5 G + 0.5 S G: half the graph blended in
        Arm('vmoe_similarity_alpha05', VMOE, 'similarity', (0,), {'router_kwargs': {'alpha': 0.5}},
            baseline='vmoe_similarity'),
    ),
    setup=SETUP,
    smoke_arms=('vmoe_softmax', 'vmoe_similarity'),
    commands_note='Runs recorded before the configs were split name `configs/study_<arm>.yaml`: that file was the '
                  "family's base config with the arm's flags above (the same resolved train.py configuration).",
)

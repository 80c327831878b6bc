"""Evaluation behind ``evaluate.py``: load checkpoints, run the robustness and routing suites, write reports."""
from .cli import SUITES, build_parser, main
from .expert_maps import expert_colormap, patch_grid, record_top1, save_expert_maps
from .loading import CheckpointMismatchError, LoadedModel, check_state_dict, load_model, read_weights
from .plots import per_severity, plot_accuracy, plot_agreement
from .report import add_relative_ce, load_reference, markdown_report, rich_summary, write_json
from .runner import (
    CleanSet,
    EvalSettings,
    agreement_table,
    build_cache,
    load_clean_set,
    run_adversarial,
    run_clean,
    run_corruptions,
    run_imagenet_ar,
    run_imagenet_c,
)

__all__ = [
    'CheckpointMismatchError', 'CleanSet', 'EvalSettings', 'LoadedModel', 'SUITES', 'add_relative_ce',
    'agreement_table', 'build_cache', 'build_parser', 'check_state_dict', 'expert_colormap', 'load_clean_set',
    'load_model', 'load_reference', 'main', 'markdown_report', 'patch_grid', 'per_severity', 'plot_accuracy',
    'plot_agreement', 'read_weights', 'record_top1', 'rich_summary', 'run_adversarial', 'run_clean',
    'run_corruptions', 'run_imagenet_ar', 'run_imagenet_c', 'save_expert_maps', 'write_json',
]

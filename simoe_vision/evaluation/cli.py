"""``evaluate.py``: robustness and routing evaluation of one or more checkpoints, side by side.

``main(argv)`` parses the flags, checks every input of every suite up front (checkpoints, data, ImageNet-C/A/R
folders and that the models fit them) so a bad input fails before hours of evaluation, runs the requested suites per
checkpoint and writes ``results.json`` (after every finished suite, so a failure mid-way keeps what was done),
``results.md``, plots and expert maps to ``--output``. Errors a user can fix exit with code 2 and one message.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from rich.console import Console

from ..data import DatasetNotFoundError, IdxFormatError, class_folders, imagefolder_split
from ..engine.checkpoint import CheckpointError
from ..engine.config import ConfigError
from ..engine.display import make_console
from ..metrics import RoutingRecorder
from ..robustness import (
    ATTACKS,
    CORRUPTIONS,
    EXTRA_CORRUPTIONS,
    SEVERITIES,
    check_class_folders,
    imagenet_ar_classes,
    validate_imagenet_c,
)
from ..routers import ROUTERS
from .expert_maps import save_expert_maps
from .loading import LoadedModel, load_model
from .plots import plot_accuracy, plot_agreement
from .report import add_relative_ce, load_reference, markdown_report, rich_summary, write_json
from .runner import (
    EvalSettings,
    array_transform,
    build_cache,
    imagenet_model_error,
    load_clean_set,
    run_adversarial,
    run_clean,
    run_corruptions,
    run_imagenet_ar,
    run_imagenet_c,
)

__all__ = ['SUITES', 'build_parser', 'main']

SUITES = ('clean', 'c', 'a', 'r', 'adv', 'routing')
EXIT_USAGE = 2


class UsageError(ValueError):
    """A flag is missing or invalid; argparse's errors are raised as this instead of printing usage and exiting."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        raise UsageError(message)


def _csv(value: str) -> List[str]:
    return [item.strip() for item in value.split(',') if item.strip()]


def _numbers(value: str) -> List[float]:
    try:
        return [float(v) for v in _csv(value)]
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected comma-separated numbers, got {value!r}') from None


def _ints(value: str) -> List[int]:
    try:
        return [int(v) for v in _csv(value)]
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected comma-separated integers, got {value!r}') from None


def _json_object(value: str) -> Dict[str, Any]:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f'invalid JSON {value!r}: {e.msg}') from None
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError(f'expected a JSON object, got {value!r}')
    return parsed


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(description='Evaluate MoE checkpoints: clean, corruptions, ImageNet-A/R, adversarial, routing.',
                allow_abbrev=False)
    g = p.add_argument_group('models')
    g.add_argument('--checkpoint', action='append', required=True, metavar='PATH',
                   help='train.py run folder (best checkpoint + config.yaml) or weights file (.safetensors, .pth); '
                        'repeat to compare models side by side')
    g.add_argument('--model', help='timm model name (needed for a weights file without config.yaml)')
    g.add_argument('--router', choices=list(ROUTERS), metavar='ROUTER',
                   help=f'a registered router: {", ".join(ROUTERS)} (overrides the run config; needed for a bare '
                        'weights file of a non-softmax model)')
    g.add_argument('--model-kwargs', type=_json_object, default=None, metavar='JSON',
                   help='constructor settings as a JSON object, e.g. \'{"num_experts": 8, "top_k": 2}\'')
    g = p.add_argument_group('suites and data')
    g.add_argument('--suite', type=_csv, default=['clean', 'c', 'adv', 'routing'],
                   help=f'comma-separated suites from {",".join(SUITES)} (default: clean,c,adv,routing)')
    g.add_argument('--data', choices=('fashion_mnist', 'imagefolder'), default=None,
                   help="clean set (default: the first run's data): Fashion-MNIST test, or <data-dir>/val")
    g.add_argument('--data-dir', default=None, help='Fashion-MNIST idx folder, or a folder holding val/<class>/*')
    g.add_argument('--imagenet-c-dir', default=None,
                   help='ImageNet-C root (<root>/<corruption>/<1-5>/<wnid>/*); without it --suite c generates the '
                        'corruptions from the clean set')
    g.add_argument('--imagenet-a-dir', default=None, help='ImageNet-A folder of 200 wnid folders (--suite a)')
    g.add_argument('--imagenet-r-dir', default=None, help='ImageNet-R folder of 200 wnid folders (--suite r)')
    g.add_argument('--eval-subset', type=int, default=None, metavar='N',
                   help='evaluate a fixed, seeded subset of N images of every set')
    g.add_argument('--seed', type=int, default=0, help='seed of the subset, the corruptions and attack starts')
    g.add_argument('--corruptions', type=_csv, default=None,
                   help='comma-separated corruptions (default: the 15 ImageNet-C ones)')
    g.add_argument('--extra-corruptions', action='store_true',
                   help=f'add the 4 extra corruptions ({", ".join(EXTRA_CORRUPTIONS)})')
    g.add_argument('--severities', type=_ints, default=list(SEVERITIES), help='comma-separated, default 1,2,3,4,5')
    g.add_argument('--cache-dir', default='data/cache/corruptions', help='cache of generated corruptions')
    g.add_argument('--reference', default=None, metavar='RESULTS_JSON',
                   help='an earlier results.json (its softmax-router model): report CE relative to it')
    g = p.add_argument_group('adversarial')
    g.add_argument('--attacks', type=_csv, default=['fgsm', 'pgd'],
                   help=f'from {",".join(ATTACKS)} (default fgsm,pgd; autoattack: standard L-inf AutoAttack)')
    g.add_argument('--eps', type=_numbers, default=[1.0, 4.0], help='L-inf radii in 1/255 units (default 1,4)')
    g.add_argument('--pgd-steps', type=int, default=10, help='PGD iterations (default 10)')
    g.add_argument('--pgd-step-size', type=float, default=None,
                   help='PGD step in 1/255 units (default 2.5 * eps / steps)')
    g.add_argument('--adv-subset', type=int, default=None, metavar='N',
                   help='attack only the first N images of the (sub)set (attacks cost ~steps forward+backward)')
    g.add_argument('--autoattack-subset', type=int, default=None, metavar='N',
                   help='AutoAttack only the first N of the attacked images (it costs thousands of passes per image)')
    g.add_argument('--autoattack-eps', type=_numbers, default=None, metavar='EPS',
                   help='AutoAttack at these radii (1/255 units) only, a subset of --eps (default: all of --eps)')
    g = p.add_argument_group('routing')
    g.add_argument('--num-maps', type=int, default=4, help='sample images in the expert maps (0: none)')
    g.add_argument('--map-corruption', default=None, help='corruption shown in the expert maps (default: the first)')
    g.add_argument('--map-severity', type=int, default=3, help='its severity (default 3)')
    g = p.add_argument_group('run')
    g.add_argument('--output', required=True, help='output folder')
    g.add_argument('--batch-size', type=int, default=128)
    g.add_argument('--workers', type=int, default=0, help='data loader workers')
    g.add_argument('--device', default=None, help='cpu, cuda, cuda:1 (default: cuda if available)')
    g.add_argument('--progress', action=argparse.BooleanOptionalAction, default=True, help='progress bars')
    return p


def _check_args(args: argparse.Namespace) -> None:
    """Every flag-level problem at once, before anything is loaded."""
    problems = []
    unknown = [s for s in args.suite if s not in SUITES]
    if unknown or not args.suite:
        problems.append(f'unknown suite(s) {", ".join(unknown) or "(none given)"}; choose from {", ".join(SUITES)}')
    corruptions = list(args.corruptions or CORRUPTIONS) + (list(EXTRA_CORRUPTIONS) if args.extra_corruptions else [])
    bad = [c for c in corruptions if c not in CORRUPTIONS + EXTRA_CORRUPTIONS]
    if bad:
        problems.append(f'unknown corruption(s) {", ".join(bad)}; choose from '
                        f'{", ".join(CORRUPTIONS + EXTRA_CORRUPTIONS)}')
    args.corruptions = list(dict.fromkeys(corruptions))
    if not args.severities or any(s not in SEVERITIES for s in args.severities):
        problems.append(f'--severities must be a subset of {",".join(map(str, SEVERITIES))}, got {args.severities}')
    if args.map_corruption is not None and args.map_corruption not in args.corruptions:
        problems.append(f'--map-corruption {args.map_corruption} is not among the evaluated corruptions')
    if args.map_severity not in SEVERITIES:
        problems.append(f'--map-severity must be in 1..5, got {args.map_severity}')
    bad_attacks = [a for a in args.attacks if a not in ATTACKS]
    if bad_attacks:
        problems.append(f'unknown attack(s) {", ".join(bad_attacks)}; choose from {", ".join(ATTACKS)}')
    for flag in ('eval_subset', 'adv_subset', 'autoattack_subset', 'batch_size'):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            problems.append(f'--{flag.replace("_", "-")} must be positive, got {value}')
    if args.autoattack_eps is not None and 'autoattack' not in args.attacks:
        problems.append('--autoattack-eps needs autoattack among --attacks')
    elif args.autoattack_eps is not None and not set(args.autoattack_eps) <= set(args.eps):
        problems.append(f'--autoattack-eps {",".join(f"{e:g}" for e in args.autoattack_eps)} must be a subset of '
                        f'--eps {",".join(f"{e:g}" for e in args.eps)}')
    for suite, flag in (('a', 'imagenet_a_dir'), ('r', 'imagenet_r_dir')):
        if suite in args.suite and not getattr(args, flag):
            problems.append(f'--suite {suite} needs --{flag.replace("_", "-")}')
        elif suite in args.suite and not os.path.isdir(getattr(args, flag)):
            problems.append(f'--{flag.replace("_", "-")} {getattr(args, flag)} does not exist')
    if problems:
        raise UsageError('\n  '.join(['invalid arguments:'] + problems) if len(problems) > 1 else problems[0])


def _unique_labels(models: List[LoadedModel]) -> None:
    """Run names label the checkpoints; a clash gets the router, then a counter."""
    names = [m.label for m in models]  # counted before any is renamed
    seen: Dict[str, int] = {}
    for m, name in zip(models, names, strict=True):
        label = name if names.count(name) == 1 else f'{name}/{m.router}'
        seen[label] = seen.get(label, 0) + 1
        m.label = label if seen[label] == 1 else f'{label}#{seen[label]}'


def _clean_data(args: argparse.Namespace, models: List[LoadedModel]) -> str:
    return args.data or models[0].config['data']


def _check_inputs(args: argparse.Namespace, models: List[LoadedModel]) -> None:
    """Every suite's inputs against the loaded models, before any suite runs: the ImageNet suites need 1000-class RGB
    models, ImageNet-A/-R folders the 200 wnids, a clean image folder as many classes as each model."""
    problems = [error for suite in ('c', 'a', 'r') if suite in args.suite and (suite != 'c' or args.imagenet_c_dir)
                for m in models if (error := imagenet_model_error(m.model, m.data_config, suite, m.label))]
    if problems:
        raise UsageError(problems[0] if len(problems) == 1 else '\n  '.join(['invalid inputs:'] + problems))
    for suite, root in (('a', args.imagenet_a_dir), ('r', args.imagenet_r_dir)):
        if suite in args.suite:
            check_class_folders(root, imagenet_ar_classes(suite)[0])
    if _needs_clean(args) and _clean_data(args, models) == 'imagefolder' and args.data_dir:
        val = imagefolder_split(args.data_dir, 'val')
        classes = len(class_folders(val))
        counts = {m.label: getattr(m.model, 'num_classes', classes) for m in models}
        wrong = [f'{label} has {n}' for label, n in counts.items() if n != classes]
        if wrong:
            raise UsageError(f'{val} holds {classes} class folders but {", ".join(wrong)} classes: evaluate each model '
                             'on the classes it was trained on')


def _needs_clean(args: argparse.Namespace) -> bool:
    return bool({'clean', 'adv', 'routing'} & set(args.suite)) or ('c' in args.suite and not args.imagenet_c_dir)


def _map_cell(args: argparse.Namespace) -> tuple[str, int]:
    severity = args.map_severity if args.map_severity in args.severities else args.severities[len(args.severities) // 2]
    return args.map_corruption or args.corruptions[0], severity


def evaluate_checkpoint(m: LoadedModel, args: argparse.Namespace, settings: EvalSettings, clean_set, cache,
                        console: Console, out: Optional[Dict[str, Any]] = None,
                        done: Callable[[], None] = lambda: None) -> Dict[str, Any]:
    """Every requested suite for one model, into ``out`` (its results entry, returned); ``done()`` after each."""
    suites = args.suite
    net = m.model
    out = {} if out is None else out
    out.update({'checkpoint': m.checkpoint, 'model': m.config['model'], 'router': m.router,
                'num_experts': m.config['num_experts'], 'top_k': m.config['top_k']})
    recorder = RoutingRecorder(net) if 'routing' in suites else None
    dataset = clean_set.dataset(m.data_config) if clean_set is not None else None
    clean_top1 = None
    if dataset is not None and ({'clean', 'routing'} & set(suites)):
        console.print(f'[bold]{m.label}[/bold]: clean ({len(dataset)} images)')
        clean = run_clean(net, dataset, settings, recorder)
        if recorder is not None:
            out['routing'] = {'layers': clean.pop('routing')}
            clean_top1 = clean.pop('top1_experts')
        out['clean'] = clean
        done()
    transform = array_transform(m.data_config)
    generated = cache is not None and ('routing' in suites or ('c' in suites and not args.imagenet_c_dir))
    if generated:
        console.print(f'[bold]{m.label}[/bold]: generated corruptions')
        corr = run_corruptions(net, lambda c, s: cache.dataset(c, s, clean_set.targets, transform), args.corruptions,
                               args.severities, settings, recorder, clean_top1)
        if recorder is not None:
            out['routing']['agreement'] = corr.pop('routing_agreement')
        if 'c' in suites and not args.imagenet_c_dir:
            out['corruptions'] = {'source': f'generated from {clean_set.name}', **corr}
    if 'c' in suites and args.imagenet_c_dir:
        console.print(f'[bold]{m.label}[/bold]: ImageNet-C')
        out['corruptions'] = {'source': 'ImageNet-C', **run_imagenet_c(net, args.imagenet_c_dir, m.data_config,
                                                                       args.corruptions, args.severities, settings)}
    if 'corruptions' in out:
        out['corruptions'].update(corruptions=list(args.corruptions), severities=list(args.severities))
    if generated or 'corruptions' in out:
        done()
    for suite, root, key in (('a', args.imagenet_a_dir, 'imagenet_a'), ('r', args.imagenet_r_dir, 'imagenet_r')):
        if suite in suites:
            console.print(f'[bold]{m.label}[/bold]: ImageNet-{suite.upper()}')
            out[key] = run_imagenet_ar(net, root, suite, m.data_config, settings)
            done()
    if 'adv' in suites:
        attacked = dataset if args.adv_subset is None else torch.utils.data.Subset(
            dataset, range(min(args.adv_subset, len(dataset))))
        console.print(f'[bold]{m.label}[/bold]: adversarial ({", ".join(args.attacks)}; eps '
                      f'{", ".join(f"{e:g}" for e in args.eps)}/255; {len(attacked)} images)')
        out['adversarial'] = run_adversarial(net, attacked, m.data_config, args.attacks, args.eps, args.pgd_steps,
                                             args.pgd_step_size, settings, args.autoattack_subset,
                                             args.autoattack_eps)
        done()
    if recorder is not None and args.num_maps > 0:
        corruption, severity = _map_cell(args)
        count = min(args.num_maps, len(dataset))
        corrupted = cache.dataset(corruption, severity, clean_set.targets, transform)
        clean_x = torch.stack([dataset[i][0] for i in range(count)])
        corrupt_x = torch.stack([corrupted[i][0] for i in range(count)])
        out['expert_maps'] = save_expert_maps(
            net, clean_x, corrupt_x, f'{corruption} s{severity}', m.data_config, m.config['num_experts'],
            Path(args.output) / 'expert_maps', m.label.replace('/', '_'), settings.device)
    return out


def run(args: argparse.Namespace, console: Console) -> Dict[str, Any]:
    _check_args(args)
    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    settings = EvalSettings(device=device, batch_size=args.batch_size, workers=args.workers,
                            eval_subset=args.eval_subset, seed=args.seed, progress=args.progress)
    reference = load_reference(args.reference) if args.reference else None
    if 'c' in args.suite and args.imagenet_c_dir:
        validate_imagenet_c(args.imagenet_c_dir, args.corruptions, args.severities)
    models = [load_model(path, args.model, args.router, args.model_kwargs, args.data, device)
              for path in args.checkpoint]
    _unique_labels(models)
    _check_inputs(args, models)
    clean_set = cache = None
    if _needs_clean(args):
        clean_set = load_clean_set(_clean_data(args, models), args.data_dir, models[0].data_config['input_size'][-1],
                                   settings)
        console.print(f'clean set: {clean_set.name}, {len(clean_set.images)} images')
        if 'routing' in args.suite or ('c' in args.suite and not args.imagenet_c_dir):
            cache = build_cache(clean_set, args.cache_dir, args.corruptions, args.severities, settings)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    meta = {'data': clean_set.name if clean_set is not None else 'ImageNet-C/A/R folders',
            'num_images': len(clean_set.images) if clean_set is not None else None, 'eval_subset': args.eval_subset,
            'suites': list(args.suite), 'seed': args.seed, 'device': str(device), 'argv': args.argv,
            'date': datetime.now(timezone.utc).isoformat(timespec='seconds')}
    results: Dict[str, Any] = {}

    def save_partial() -> None:  # the finished suites, in case a later one fails
        write_json(output / 'results.json', {**meta, 'complete': False}, results)
        args.partial_results = output / 'results.json'

    for m in models:
        results[m.label] = {}
        evaluate_checkpoint(m, args, settings, clean_set, cache, console, results[m.label], save_partial)
    add_relative_ce(results, reference)
    figures = {}
    for name, plot in (('accuracy_vs_severity', plot_accuracy), ('routing_agreement_vs_severity', plot_agreement)):
        path = plot(results, output / f'{name}.png')
        if path:
            figures[name] = os.path.relpath(path, output)
    for label, r in results.items():
        for path in r.get('expert_maps', []):
            figures[f'expert map {label} {Path(path).stem}'] = os.path.relpath(path, output)
    meta.update(complete=True, figures=figures)
    write_json(output / 'results.json', meta, results)
    args.partial_results = None
    (output / 'results.md').write_text(markdown_report(meta, results, figures))
    rich_summary(results, console)
    console.print(f'wrote {output / "results.json"}, {output / "results.md"} and {len(figures)} figure(s)')
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``evaluate.py``; returns 0, or 2 with one ``error:`` message for anything the user can fix. A failure
    after some suites finished says where their results are."""
    argv = list(sys.argv[1:] if argv is None else argv)
    console = make_console()
    args = argparse.Namespace()
    try:
        args = build_parser().parse_args(argv)
        args.argv = argv
        run(args, console)
    except (UsageError, ConfigError, CheckpointError, DatasetNotFoundError, IdxFormatError, FileNotFoundError,
            ValueError) as e:
        print(f'error: {e}{_partial_note(args, "; ")}', file=sys.stderr)
        return EXIT_USAGE
    except BaseException:
        if _partial_note(args):
            print(f'evaluate.py failed{_partial_note(args, ": ")}', file=sys.stderr)
        raise
    return 0


def _partial_note(args: argparse.Namespace, prefix: str = '') -> str:
    partial = getattr(args, 'partial_results', None)
    return f'{prefix}the suites that finished are saved in {partial}' if partial else ''

"""A study's results file (``docs/<results>.md``) regenerated from its committed run summaries alone: mean ± std over
seeds per arm, per-severity tables, plots, expert maps, paired differences against each family's reference, the
commands, hardware and wall time, the runs still missing. The conclusion between the HUMAN CONCLUSION markers is
written by a person and kept across regenerations."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from simoe_vision.evaluation.plots import line_plot, pointwise_mean
from simoe_vision.evaluation.report import format_mean_std, markdown_table
from simoe_vision.robustness import SEVERITIES

from .compare import DIGITS, headline_metrics, paired_deltas
from .design import REPO, Arm, EvalPlan, Family, Run, Study
from .plan import select_runs
from .run import command_text, eval_command, train_command
from .summarize import load_summaries

__all__ = ['HUMAN_BEGIN', 'HUMAN_END', 'render_report', 'write_report']

Summary = Dict[str, Any]
HUMAN_BEGIN = '<!-- BEGIN HUMAN CONCLUSION (kept when the report is regenerated) -->'
HUMAN_END = '<!-- END HUMAN CONCLUSION -->'


def _runs_of(summaries: Sequence[Summary], arm: Arm) -> List[Summary]:
    return [s for s in summaries if s['arm'] == arm.name]


def _arm_table(study: Study, summaries: Sequence[Summary], arms: Sequence[Arm],
               seeds: Optional[Sequence[int]] = None) -> List[str]:
    """One row per arm of every headline metric: 'n' is runs done / planned (of ``seeds`` only, when given)."""
    metrics = headline_metrics(study, summaries)
    rows = []
    for arm in arms:
        group = _runs_of(summaries, arm)
        planned = [s for s in arm.seeds if seeds is None or s in seeds]
        rows.append([arm.label, f'{len(group)}/{len(planned)}']
                    + [format_mean_std([f(s) for s in group], DIGITS.get(k, 2)) for k, (_, f) in metrics.items()])
    return markdown_table(['router', 'n'] + [title for title, _ in metrics.values()], rows)


def _severity_table(summaries: Sequence[Summary], arms: Sequence[Arm], key: str) -> List[str]:
    """Accuracy (with the clean column) or routing agreement per corruption severity, one row per arm."""
    severities = sorted(set(SEVERITIES) | {int(x) for s in summaries for x in s['corruption']['per_severity']})
    rows = []
    for arm in arms:
        group = _runs_of(summaries, arm)
        if key == 'accuracy':
            cells = [format_mean_std([s['eval']['clean_top1'] for s in group])]
            cells += [format_mean_std([s['corruption']['per_severity'].get(str(v)) for s in group])
                      for v in severities]
        else:
            cells = [format_mean_std([s['routing']['agreement'].get(str(v), {}).get('mean') for s in group], 3)
                     for v in severities]
        rows.append([arm.label] + cells)
    header = ['router'] + (['clean'] if key == 'accuracy' else []) + [f's{v}' for v in severities]
    return markdown_table(header, rows)


def _figures(study: Study, summaries: Sequence[Summary], family: Family, folder: Path) -> List[str]:
    """Fluctuation vs epoch, accuracy and agreement vs severity of the family's main arms (mean over seeds)."""
    groups = {a.label: _runs_of(summaries, a) for a in study.main_arms(family)}
    fluct = {k: pointwise_mean(dict(zip(s['fluctuation']['epochs'], s['fluctuation']['curves']['mean'], strict=True))
                               for s in g) for k, g in groups.items()}
    acc = {k: pointwise_mean({0: s['eval']['clean_top1'], **s['corruption']['per_severity']} for s in g)
           for k, g in groups.items()}
    agree = {k: pointwise_mean({x: v['mean'] for x, v in s['routing']['agreement'].items()} for s in g)
             for k, g in groups.items()}
    name = family.name
    made = [line_plot(fluct, folder / f'{name}_fluctuation.png', 'epoch', 'routing fluctuation (probe tokens)',
                      f'{name}: fluctuation vs epoch'),
            line_plot(acc, folder / f'{name}_accuracy_vs_severity.png', 'severity (0 = clean)', 'top-1 (%)',
                      f'{name}: accuracy vs severity'),
            line_plot(agree, folder / f'{name}_agreement_vs_severity.png', 'severity',
                      'clean vs corrupted top-1 expert agreement', f'{name}: routing agreement')]
    return [Path(m).name for m in made if m]


def _conclusions(study: Study, summaries: Sequence[Summary]) -> List[str]:
    """Paired per-seed differences of every main arm against its family's reference, then of every ablation against
    its baseline, stated mechanically."""
    metrics = headline_metrics(study, summaries)
    keys = ['test_top1', 'val_top1', 'corr_acc', 'rel_mce', *(k for k in metrics if k.startswith('fluct_')),
            'agree', *(k for k in metrics if k.startswith(('pgd_', 'aa_', 'diag_entropy')))]
    pairs = []
    for family in study.families:
        reference = study.arm(family.reference)
        main = study.main_arms(family)
        pairs += [(family, arm, reference) for arm in main if arm != reference]
        pairs += [(family, ablation, arm) for arm in main for ablation in study.ablations(arm)]
    lines = []
    for family, arm, reference in pairs:
        for key in keys:
            title, metric = metrics[key]
            deltas = paired_deltas(summaries, arm.name, reference.name, metric)
            if not deltas:
                continue
            unit = ' pp' if key in ('test_top1', 'val_top1', 'corr_acc') or key.startswith(('pgd_', 'aa_')) else ''
            lines.append(f'- {family.name} {arm.label} − {reference.label}, {title}: '
                         f'{format_mean_std(deltas, DIGITS.get(key, 2), sign=True)}{unit} over {len(deltas)} '
                         'seed(s)')
    return lines or ['- (no paired runs yet)']


def _entropy_section(study: Study, summaries: Sequence[Summary]) -> List[str]:
    """Did graph routing lower the entropy of expert selection (the paper's theorem)? Per graph arm: H(P) against
    the token's own gate H(G) in the same runs, and against the softmax reference's H(P) paired by seed."""
    def diag(key: str):
        return lambda s: s['routing'].get('diagnostics', {}).get(key)

    rows = []
    for family in study.families:
        reference = study.arm(family.reference)
        for arm in (a for a in study.arms if a.family == family and a.router != reference.router):
            runs = [s for s in _runs_of(summaries, arm) if 'diagnostics' in s['routing']]
            if not runs:
                continue
            own = [diag('entropy')(s) - diag('gate_entropy')(s) for s in runs]
            vs_softmax = paired_deltas(summaries, arm.name, reference.name, diag('entropy'))
            lower = sum(d < 0 for d in own)
            verdict = ('lowered' if lower == len(own) else 'raised' if lower == 0 else 'mixed') + \
                f' ({lower} of {len(own)} runs lower)'
            rows.append([f'{family.name}: {arm.label}', str(len(runs)),
                         format_mean_std([diag('entropy')(s) for s in runs], 3),
                         format_mean_std([diag('gate_entropy')(s) for s in runs], 3),
                         format_mean_std(own, 3, sign=True), format_mean_std(vs_softmax, 3, sign=True),
                         format_mean_std([diag('flip')(s) for s in runs], 3), verdict])
    if not rows:
        return []
    return ['## Entropy of expert selection', '',
            'The paper\'s theorem says graph routing lowers the entropy of expert selection. H(P): mean entropy '
            '(nats; uniform over 8 experts = 2.08) of the routing distribution the top-k is taken from, H(G): of '
            'the token\'s own gate, both on the evaluation images; the verdict compares H(P) with H(G) in the same '
            'runs; "vs softmax" is H(P) minus the softmax reference\'s H(P), paired by seed; flip: share of tokens '
            'whose top-1 expert under P differs from under G.', '',
            *markdown_table(['arm', 'n', 'H(P)', 'H(G)', 'H(P) − H(G)', 'H(P) vs softmax', 'flip',
                             'graph routing ... entropy'], rows), '']


def _human_section(previous: Optional[str]) -> str:
    """The human-written conclusion of an existing results file (between the markers), or a placeholder."""
    if previous and HUMAN_BEGIN in previous and HUMAN_END in previous:
        return previous[previous.index(HUMAN_BEGIN):previous.index(HUMAN_END) + len(HUMAN_END)]
    return '\n'.join([HUMAN_BEGIN, '_To be written by a person once the study is complete: what the numbers above do '
                      'and do not support, with their uncertainty._', HUMAN_END])


def _command_templates(study: Study) -> List[str]:
    """Each arm's train command for seed S, then the evaluate command of a run A_sS (the defaults of ``run``)."""
    runs_dir = REPO / study.runs_dir
    lines = []
    for arm in study.arms:
        seed = arm.seeds[0]
        train = command_text(train_command(Run(arm, seed), runs_dir, False))
        lines += [f'# {arm.name}: S in {", ".join(map(str, arm.seeds))}',
                  train.replace(f'--seed {seed}', '--seed S').replace(f'{arm.name}_s{seed}', f'{arm.name}_sS')]
    reference = f' [--reference {study.runs_dir}/R_sS/eval/results.json]'
    plans: Dict[EvalPlan, List[Family]] = {}
    for family in study.families:
        plans.setdefault(study.plan_for(family), []).append(family)
    for plan, families in plans.items():
        run = Run(study.arm(families[0].reference), study.arm(families[0].reference).seeds[0])
        evaluate = command_text(eval_command(run, runs_dir, plan, REPO / 'data' / 'cache' / 'corruptions'))
        which = 'every run' if len(plans) == 1 else f'every {"/".join(f.name for f in families)} run'
        only = (f' (the --attacks/--autoattack-* flags for seed {", ".join(map(str, plan.autoattack_seeds))} only'
                f'{"" if plan.autoattack_ablations else " and not for ablations"})'
                if plan.autoattack_subset and plan.autoattack_seeds is not None else '')
        lines += [f'# {which} A_sS; R: the reference arm of its family{only}', evaluate.replace(run.name, 'A_sS')
                  + reference]
    return lines


def _family_sections(study: Study, summaries: Sequence[Summary], docs: Path) -> List[str]:
    """Per family: the main comparison's tables and figures, then one table per ablated baseline."""
    lines = []
    for family in study.families:
        main = study.main_arms(family)
        group = [s for s in summaries if (arm := study.arm(s['arm'])) is not None and arm.family == family]
        lines += [f'## {family.title}', '', *_arm_table(study, summaries, main), '',
                  'Accuracy (%) per corruption severity (mean over corruptions):', '',
                  *_severity_table(summaries, main, 'accuracy'), '',
                  'Routing agreement clean vs corrupted per severity:', '',
                  *_severity_table(summaries, main, 'agreement'), '']
        for name in _figures(study, group, family, study.results_dir(docs)):
            lines += [f'![{name}]({study.results}/{name})', '']
        for baseline in main:
            ablations = study.ablations(baseline)
            if not ablations:
                continue
            seeds = sorted({s for a in ablations for s in a.seeds})
            plural = 's' if len(seeds) > 1 else ''
            lines += [f'### {family.name} ablations ({len(seeds)} seed{plural}; baseline: '
                      f'{baseline.description or baseline.label})', '',
                      *_arm_table(study, [s for s in summaries if s['seed'] in seeds], [baseline, *ablations],
                                  seeds), '']
    return lines


def _hardware_section(summaries: Sequence[Summary]) -> List[str]:
    if not summaries:
        return ['No runs yet.', '']
    rows = [[s['run'], s['hardware']['cpu'], str(s['hardware']['cpu_count']), s['hardware']['torch'],
             f'{s["timing"]["epoch_s"]:.0f}', f'{s["timing"]["wall_s"] / 60:.1f}'] for s in summaries]
    total = sum(s['timing']['wall_s'] for s in summaries)
    platforms = sorted({s['hardware']['platform'] for s in summaries})
    return markdown_table(['run', 'CPU', 'cores', 'torch', 's / epoch', 'wall (min)'], rows) + [
        '', f'Total wall time: {total / 3600:.1f} h over {len(summaries)} run(s). Platform(s): '
        + (', '.join(platforms) or '–') + '.', '']


def render_report(study: Study, summaries: Sequence[Summary], docs: Path, previous: Optional[str] = None) -> str:
    """The study's results file from its run summaries (figures are written to ``study.results_dir(docs)``)."""
    expected = [r.name for r in select_runs(study)]
    have = {s['run'] for s in summaries}
    missing = [r for r in expected if r not in have]
    lines = [f'# {study.title}', '',
             f'Generated by `{study.command("report")}` from the run summaries in `docs/{study.results}/runs/`; '
             'do not edit by hand except the conclusion between the markers.', '']
    if missing:
        lines += [f'**Study incomplete: {len(have & set(expected))} of {len(expected)} runs done.** Runs missing: '
                  + ', '.join(missing), '']
    else:
        lines += [f'All {len(expected)} runs done.', '']
    lines += ['## Setup', '', study.setup, '', *_family_sections(study, summaries, docs)]
    maps = [(s['run'], s['expert_map']) for s in summaries if s.get('expert_map')]
    if maps:
        lines += ['## Expert maps', '', 'Top-1 expert per token of the deepest MoE layer, clean vs corrupted, one run '
                  'per arm:', '']
        lines += [f'![{run}]({path})' for run, path in maps] + ['']
    lines += _entropy_section(study, summaries)
    lines += ['## Mechanical comparison (paired by seed)', '', *_conclusions(study, summaries), '',
              '## Conclusion', '', _human_section(previous), '', '## Commands', '',
              f'Everything: `{study.command("run")} --budget-minutes 150` (repeat per session; commit '
              f'`docs/{study.results}/` after each), then `{study.command("report")}`. Each run (arm A, seed S) is:',
              '', '```', *_command_templates(study), '```', '']
    if summaries:
        lines += ['The commands of each finished run, as recorded:', '', '```']
        for s in summaries:
            lines += [f'# {s["run"]}', *s['commands']]
        lines += ['```', '']
        lines += [study.commands_note, ''] if study.commands_note else []
    return '\n'.join(lines + ['## Hardware and wall time', '', *_hardware_section(summaries)])


def write_report(study: Study, docs: Path) -> Path:
    """Regenerate the study's results file under ``docs``, keeping its human-written conclusion."""
    path = study.report_path(docs)
    previous = path.read_text() if path.is_file() else None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report(study, load_summaries(study, docs), docs, previous))
    return path

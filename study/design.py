"""What a study is made of, as data: model families (one base ``train.py`` config each), arms (a family's base plus
the arm's router and settings, trained with some seeds), the ``evaluate.py`` settings every run is scored with, and
the study grouping them with its results file. The driver (plan, run, summarize, report) works on any ``Study``, so
a new study is a new declaration (see ``study/v1.py``), not new driver code."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from simoe_vision.engine.config import load_yaml, parse_config
from simoe_vision.robustness import CORRUPTIONS

__all__ = ['DEFAULT_STUDY', 'REPO', 'Arm', 'EvalPlan', 'Family', 'Run', 'Study', 'StudyError', 'arm_config',
           'arm_flags']

REPO = Path(__file__).resolve().parents[1]
DEFAULT_STUDY = 'v1'  # the study ``python -m study`` drives without --study


class StudyError(ValueError):
    """A study input is missing or invalid (unknown arm, missing config, a failed subprocess); the message says
    what to do."""


@dataclass(frozen=True)
class Family:
    """Arms compared with each other: one base config, and the arm every other one is measured against.

    ``images_per_second`` (training) and ``eval_seconds`` (one ``evaluate.py`` run) are the time estimates used
    before a run of the family has been measured; ``eval_plan`` replaces the study's evaluation for this family."""

    name: str
    title: str
    config: str
    reference: str
    images_per_second: float
    eval_seconds: float
    eval_plan: Optional[EvalPlan] = None


@dataclass(frozen=True)
class Arm:
    """One configuration of a study: ``family.config`` with ``router`` and ``settings`` (train.py config keys),
    trained once per seed.

    A ``settings`` value that is a mapping (``router_kwargs``, ``model_kwargs``) updates the base's mapping, so an
    arm names only what it changes. ``baseline`` makes the arm an ablation of that arm (reported in its own table);
    ``description`` spells the arm's settings out where it is an ablation baseline (its defaults included)."""

    name: str
    family: Family
    router: str
    seeds: Tuple[int, ...]
    settings: Mapping[str, Any] = field(default_factory=dict)
    baseline: Optional[str] = None
    description: Optional[str] = None

    @property
    def label(self) -> str:
        """The arm in tables: its router, then every setting it changes as ``key=value``."""
        leaves = [item for key, value in self.settings.items()
                  for item in (value.items() if isinstance(value, Mapping) else [(key, value)])]
        return ', '.join([self.router] + [f'{k}={v}' for k, v in leaves])


@dataclass(frozen=True)
class Run:
    """One training run of a study: an arm and a seed, stored as ``<runs-dir>/<arm>_s<seed>``."""

    arm: Arm
    seed: int

    @property
    def name(self) -> str:
        return f'{self.arm.name}_s{self.seed}'


@dataclass(frozen=True)
class EvalPlan:
    """The ``evaluate.py`` settings every run is scored with (one fixed seeded subset of the test set)."""

    eval_subset: int = 1000
    corruptions: Tuple[str, ...] = CORRUPTIONS
    eps: Tuple[float, ...] = (1.0, 4.0)
    pgd_steps: int = 10
    adv_subset: Optional[int] = None
    autoattack_subset: Optional[int] = None  # also run AutoAttack (standard, L-inf) on this many images
    autoattack_eps: Optional[Tuple[float, ...]] = None  # ... at these of ``eps`` (None: all)
    autoattack_seeds: Optional[Tuple[int, ...]] = None  # ... for the runs of these seeds only (None: all)
    autoattack_ablations: bool = True  # ... and for the ablation arms' runs too

    def flags(self, seed: int, ablation: bool = False) -> List[str]:
        """evaluate.py's flags for a run of ``seed`` (of an ablation arm: ``ablation``)."""
        flags = ['--suite', 'clean,c,adv,routing', '--eval-subset', str(self.eval_subset),
                 '--corruptions', ','.join(self.corruptions), '--eps', ','.join(f'{e:g}' for e in self.eps),
                 '--pgd-steps', str(self.pgd_steps)]
        flags += ['--adv-subset', str(self.adv_subset)] if self.adv_subset else []
        if (self.autoattack_subset and (self.autoattack_seeds is None or seed in self.autoattack_seeds)
                and (self.autoattack_ablations or not ablation)):
            flags += ['--attacks', 'fgsm,pgd,autoattack', '--autoattack-subset', str(self.autoattack_subset)]
            if self.autoattack_eps:
                flags += ['--autoattack-eps', ','.join(f'{e:g}' for e in self.autoattack_eps)]
        return flags


@dataclass(frozen=True)
class Study:
    """A set of arms in priority order and where its results go: ``docs/<results>.md``, summaries in
    ``docs/<results>/runs/``, plots in ``docs/<results>/``, expert maps in ``docs/<results>/maps/``.

    ``setup`` is the report's setup paragraph; ``commands_note`` follows the recorded commands there (e.g. what
    changed since they ran); ``smoke_arms`` are the arms ``run --smoke`` exercises."""

    name: str
    title: str
    families: Tuple[Family, ...]
    arms: Tuple[Arm, ...]
    setup: str
    smoke_arms: Tuple[str, ...]
    results: str = 'results'
    runs_dir: str = 'runs/study'
    eval_plan: EvalPlan = EvalPlan()
    commands_note: str = ''

    def __post_init__(self) -> None:
        names = {a.name for a in self.arms}
        wrong = [f'{a.name} (baseline {a.baseline})' for a in self.arms if a.baseline and a.baseline not in names]
        wrong += [f'family {f.name} (reference {f.reference})' for f in self.families if f.reference not in names]
        wrong += [f'{a.name} (family {a.family.name})' for a in self.arms if a.family not in self.families]
        wrong += [f'smoke arm {a}' for a in self.smoke_arms if a not in names]
        if wrong:
            raise StudyError(f'study {self.name} refers to what it does not declare: {", ".join(wrong)}')

    def arm(self, name: str) -> Optional[Arm]:
        return next((a for a in self.arms if a.name == name), None)

    def main_arms(self, family: Family) -> List[Arm]:
        """The family's router comparison (its reference first when declared first): every arm but ablations."""
        return [a for a in self.arms if a.family == family and a.baseline is None]

    def ablations(self, baseline: Arm) -> List[Arm]:
        return [a for a in self.arms if a.baseline == baseline.name]

    def plan_for(self, family: Family) -> EvalPlan:
        """How the family's runs are evaluated: its own plan where it has one, else the study's."""
        return family.eval_plan or self.eval_plan

    def command(self, verb: str) -> str:
        """How a user runs ``verb`` (plan, run, report) on this study."""
        return f'python -m study {verb}' + ('' if self.name == DEFAULT_STUDY else f' --study {self.name}')

    def report_path(self, docs: Path) -> Path:
        return docs / f'{self.results}.md'

    def results_dir(self, docs: Path) -> Path:
        """The folder of the plots, ``runs/`` (summaries) and ``maps/`` (expert maps)."""
        return docs / self.results

    def summaries_dir(self, docs: Path) -> Path:
        return self.results_dir(docs) / 'runs'

    def summary_path(self, docs: Path, run: str) -> Path:
        return self.summaries_dir(docs) / f'{run}.json'


def _flag_value(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (Mapping, list)) else str(value)


def arm_flags(arm: Arm) -> List[str]:
    """The train.py flags that turn the family's base config into the arm (flags win over ``-c`` files)."""
    base = _base_config(arm.family)
    flags = ['--router', arm.router]
    for key, value in arm.settings.items():
        if isinstance(value, Mapping):
            value = {**base.get(key, {}), **value}
        if isinstance(value, bool):
            flags.append(f'--{"" if value else "no-"}{key.replace("_", "-")}')
        else:
            flags += [f'--{key.replace("_", "-")}', _flag_value(value)]
    return flags


def arm_config(arm: Arm) -> Dict[str, Any]:
    """The arm's configuration resolved by train.py's own parser (defaults < base config < the arm's flags)."""
    return parse_config(['-c', str(REPO / arm.family.config), *arm_flags(arm)])


def _base_config(family: Family) -> Dict[str, Any]:
    path = REPO / family.config
    if not path.is_file():
        raise StudyError(f'{family.config} is missing: every study family needs its base config (configs/study/)')
    return load_yaml(path)

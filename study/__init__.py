"""The study driver: trains the arms of a declared study with ``train.py``, evaluates them with ``evaluate.py`` and
reports them, run by run and resumable across sessions. It drives the library from outside, beside ``train.py`` and
``evaluate.py``.

``python -m study plan|run|report [--study NAME]``; one module per job: ``plan`` (runs, status, estimates),
``run`` (train, evaluate, summarise within a budget), ``summarize`` (a run folder -> its committed JSON summary),
``compare`` and ``report`` (the results file from the summaries alone). A study is a declaration (``design``'s
``Study``: families with a base config, arms with their router settings and seeds, its results file): ``v1`` is the
study behind ``docs/results.md``, ``v2`` (49 tokens, 3 seeds, issue 17) the one behind ``docs/results_v2.md``;
another one is a new module listed in ``STUDIES``.
"""
from .v1 import V1
from .v2 import V2

STUDIES = {s.name: s for s in (V1, V2)}

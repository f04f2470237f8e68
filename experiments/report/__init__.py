"""Reports from workdirs alone: one experiment's table and learning curves, or a whole sweep's analysis.

    python -m experiments.report runs/tiny [runs/other ...]
    python -m experiments.report runs/lr_sweep          # a directory holding sweep.json: the sweep report

One experiment (``experiments.main``'s workdir): reads only what runs leave behind (``config.json`` and each
``<method>/metrics.jsonl``) and writes ``report.md`` and ``report.png`` (train loss and held-out NLL against steps, one
line per method) into the workdir. ``experiments.main`` calls it at the end of an experiment, and when a preemption
stops one: a run that has not reached the config's steps is marked unfinished, a method with no records yet as not
started.

A sweep (``experiments.sweep``'s directory: ``sweep.json`` and one experiment workdir per point): writes
``results.csv`` (one row per point x eval step), ``report.md`` (NLL tables over method x rank x LR, the optimal LR of
each condition by a quadratic fit in log LR with a seed-bootstrap interval, the LoRA/full optimal-LR ratio, seed noise,
figures, and "vs the study": a verdict per finding by the rules in ``experiments.analysis``, printed next to it),
``figures/*.png|pdf`` and ``tables/*.tex`` (booktabs). Deterministic: the same files give byte-identical outputs.

Which findings a sweep speaks to follows from what varies in it, not from its family's name: settings that differ in a
width field (the LoRA/full ratio across widths) or in the batch size (finding 5), LoRA groups that differ in targets
(finding 6) or in scaling (finding 4's early curves, from train loss logged every step), and runs that left
``lora_diagnostics.jsonl`` (finding 9); each gets its section, table and figure only when the sweep has what it needs.
``analyse_sweep`` computes everything without writing; ``sweep_verdicts`` gives just the verdict rows (for an index
over several sweeps).

The package, one module per concern: ``runs`` (one experiment), ``sweeps`` (a sweep's files and conditions),
``text`` (numbers and tables), ``tables``, ``findings`` (findings 1-4), one module per family judged across settings
or groups (``width``, ``batch``, ``layers``, ``early``, ``ba``, sharing ``parts``), ``study`` (the findings' rules
and the verdict table), ``figures``, ``sweep_report`` (a sweep's report) and ``rl`` (RL sweeps). The names below are
its public interface.
"""

from experiments.report.findings import FINDING_ORDER, STUDY, FindingRow
from experiments.report.layers import targets_class
from experiments.report.rl import INDEX_ORDER, INDEX_STUDY, INDEX_TITLES, is_rl_sweep, write_rl_sweep
from experiments.report.runs import summarize, write, write_rl
from experiments.report.study import FIGURES, RULES, TITLES
from experiments.report.sweep_report import (SECTIONS, SweepAnalysis, analyse_sweep, base_table, judgeable_fractions,
                                             stable_rows, sweep_verdicts, write_sweep)
from experiments.report.sweeps import (CSV_COLUMNS, SWEEP_FILE, Condition, SweepRun, conditions, flatten, judged_step,
                                       load_sweep)
from experiments.report.text import Table, _lr

__all__ = ["CSV_COLUMNS", "Condition", "FIGURES", "FINDING_ORDER", "FindingRow", "INDEX_ORDER", "INDEX_STUDY",
           "INDEX_TITLES", "RULES", "SECTIONS", "STUDY", "SWEEP_FILE", "SweepAnalysis", "SweepRun", "TITLES", "Table",
           "_lr", "analyse_sweep", "base_table", "conditions", "flatten", "is_rl_sweep", "judged_step",
           "judgeable_fractions", "load_sweep", "stable_rows", "summarize", "sweep_verdicts", "targets_class", "write",
           "write_rl", "write_rl_sweep", "write_sweep"]

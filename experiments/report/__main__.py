"""``python -m experiments.report DIR [DIR ...]``: the report of each experiment workdir or sweep directory."""

from __future__ import annotations

import sys

from etils import epath

from experiments.report.runs import write
from experiments.report.sweep_report import write_sweep
from experiments.report.sweeps import SWEEP_FILE


def main(argv: list[str]) -> None:
  if not argv:
    raise SystemExit("usage: python -m experiments.report WORKDIR|SWEEPDIR [...]")
  for workdir in argv:
    if (epath.Path(workdir) / SWEEP_FILE).exists():
      text = write_sweep(workdir)
      print(text[text.index("## vs the study"):] if "## vs the study" in text else text)
      print(f"wrote {epath.Path(workdir) / 'report.md'}, results.csv, figures/ and tables/")
    else:
      print(write(workdir)[0])
      print(f"wrote {epath.Path(workdir) / 'report.md'} and report.png")


if __name__ == "__main__":
  main(sys.argv[1:])

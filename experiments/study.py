"""The study in one command: every family's sweep of one variant, each family's report, and an index of verdicts.

    python -m experiments.study --variant quick --workdir runs/study          # lr_sweep + capacity, ~12 min on 2 cores
    python -m experiments.study --variant tiny --workdir runs/study_tiny --parallel 2   # every family, ~90 min
    python -m experiments.study --variant tiny --workdir runs/study_tiny --publish docs/results/tiny

For each family of the variant, in order, it runs ``python -m experiments.sweep --config
experiments/configs/FAMILY.py:VARIANT --workdir DIR/FAMILY`` (idempotent: a rerun skips finished points and resumes
interrupted ones), then ``python -m experiments.report DIR/FAMILY``. Then ``DIR/report.md``, the index: per family the
sweep command, its points (finished / failed) and a link to its report, and every family's "vs the study" verdicts in
one table per finding (also ``DIR/vs_study.tex`` and ``DIR/verdicts.csv``). A family with failed points is reported
with what finished and the next family goes on (exit status 1 at the end); SIGTERM or Ctrl-C stops the running points
after their checkpoints and starts nothing more (exit 143: the same command resumes). ``--report-only`` rewrites the
reports from the files already there. ``--publish DEST`` copies the files the reports are made from (configs, statuses,
metrics and LoRA diagnostics; no checkpoints, logs or TensorBoard events) into DEST and regenerates every report there,
so DEST can be committed and regenerated from itself.

Real-scale sweeps run per family (each config's docstring names its `real` variant) on GPU/TPU VMs, e.g.
``python -m tpu.sweep ... --config experiments/configs/lr_sweep.py:model=meta-llama/Llama-3.2-1B``; this index works
on any directory of family sweeps: ``--variant`` only names the configs' variant.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import shutil
import sys
from collections.abc import Sequence

from etils import epath

from experiments import analysis, report, sweep

FAMILIES = {  # variant -> the families it runs, in order (the LR findings first: the others build on their LRs)
    "quick": ("lr_sweep", "capacity"),
    "tiny": ("lr_sweep", "capacity", "layers", "batch_size", "parametrization", "lr_width"),
}
CONFIG_DIR = "experiments/configs"
PUBLISHED = ("sweep.json", "*/config.json", "*/status.json", "*/run_info.json", "*/*/metrics.jsonl",
             "*/*/lora_diagnostics.jsonl", "*/*/summary.txt")  # per family: what its report reads


def config_arg(family: str, variant: str) -> str:
  """The sweep's --config value for one family."""
  return f"{CONFIG_DIR}/{family}.py:{variant}"


def run_families(workdir: epath.Path, variant: str, families: Sequence[str], parallel: int) -> int:
  """Runs each family's sweep into workdir/FAMILY; stops at a signal. Returns the worst exit status."""
  worst = 0
  for i, family in enumerate(families):
    print(f"== study {variant}: family {i + 1}/{len(families)}: {family}", file=sys.stderr, flush=True)
    code = sweep.main(["--config", config_arg(family, variant), "--workdir", str(workdir / family),
                       "--parallel", str(parallel)])
    if code == sweep.EXIT_INTERRUPTED:
      print(f"== study interrupted during {family}: rerun the same command to resume", file=sys.stderr)
      return code
    worst = max(worst, code)
  return worst


def publish(workdir: epath.Path, dest: epath.Path, families: Sequence[str]) -> None:
  """Copies the report-making files of every family sweep from workdir to dest (replacing dest's copies)."""
  for family in families:
    src, out = workdir / family, dest / family
    if not (src / report.SWEEP_FILE).exists():
      raise FileNotFoundError(f"{src / report.SWEEP_FILE}: no sweep of {family} to publish")
    if out.exists():
      out.rmtree()
    names = {p["name"] for p in json.loads((src / report.SWEEP_FILE).read_text())["points"]}
    for pattern in PUBLISHED:
      for path in sorted(src.glob(pattern)):
        relative = path.relative_to(src)
        if len(relative.parts) > 1 and relative.parts[0] not in names:
          continue  # a point dir left from an older version of the sweep: not part of it
        target = out / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)


def _family_line(workdir: epath.Path, family: str) -> str:
  meta, runs = report.load_sweep(workdir / family)
  finished = sum(r.finished for r in runs)
  failed = sum(r.failed for r in runs)
  return (f"- **{family}** ([report]({family}/report.md)): `python -m experiments.sweep --config "
          f"{meta['config']}:{meta['arg']} --workdir {workdir / family}`; {len(meta['points'])} points, "
          f"{finished} runs finished, {failed} failed, {len(runs) - finished - failed} not finished.")


def summary_rows(rows: Sequence[tuple[str, report.FindingRow]]) -> list[list[str]]:
  """[finding: title, study's claim, family, overall verdict] per finding (in report order) and family."""
  out = []
  for finding in report.FINDING_ORDER:
    for family in dict.fromkeys(f for f, r in rows if r.finding == finding):
      mine = [r for f, r in rows if f == family and r.finding == finding]
      overall = [r.verdict for r in mine if "overall" in r.scope]
      judged = [r.verdict for r in mine if r.verdict in (analysis.AGREE, analysis.DISAGREE, analysis.INCONCLUSIVE)]
      verdict = overall[-1] if overall else analysis.combine([analysis.Verdict(v, "") for v in judged])
      out.append([f"{finding}: {report.TITLES[finding]}", report.STUDY[finding], family, f"**{verdict}**"])
  return out


def index(workdir: epath.Path, variant: str, families: Sequence[str]) -> str:
  """Writes every family's report, then workdir/report.md (the index), vs_study.tex and verdicts.csv; returns the text."""
  present = [f for f in families if (workdir / f / report.SWEEP_FILE).exists()]
  rows = []
  for family in present:
    report.write_sweep(workdir / family)
    rows += [(family, r) for r in report.sweep_verdicts(workdir / family)]
  out = [f"# LoRA Without Regret, reproduced: the `{variant}` study\n",
         f"Made by `python -m experiments.study --variant {variant} --workdir {workdir} --report-only` from the "
         "families' run files alone. Each family's report has its tables, figures (PNG and PDF), LaTeX tables, "
         "results.csv and the provenance of its runs (command, commit).\n", "## Families\n"]
  out += [_family_line(workdir, f) for f in present]
  missing = [f for f in families if f not in present]
  if missing:
    out.append("- not run yet: " + ", ".join(missing))
  summary = summary_rows(rows)
  if summary:
    out += ["", "## Summary\n", "One line per finding and family: the family's overall verdict (its `overall` row, "
            "else all its rows combined: disagree if any disagrees, agree if all agree, else inconclusive).\n",
            report.Table("", "", ["finding", "study", "family", "verdict"], summary).markdown()]
  out += ["", "## vs the study\n",
          "Every verdict below is decided by the rule its family report prints beside it (`experiments.analysis`), "
          "never by hand; **inconclusive** means the rule found the data unable to tell.\n"]
  header = ["finding", "family", "scope", "ours", "verdict"]
  table_rows = []
  for finding in report.FINDING_ORDER:
    mine = [(f, r) for f, r in rows if r.finding == finding]
    if not mine:
      continue
    out.append(f"### Finding {finding}: {report.TITLES[finding]}\n")
    out.append(f"Study: {report.STUDY[finding]}.\n")
    out.append(report.Table("", "", header[1:], [[f, r.scope, r.ours or "—", f"**{r.verdict}**"]
                                                for f, r in mine]).markdown())
    table_rows += [[str(finding), f, r.scope, r.ours or "—", r.verdict] for f, r in mine]
  (workdir / "vs_study.tex").write_text(
      report.Table("vs_study", "Findings of the study and this study's verdicts", header, table_rows).latex())
  buffer = io.StringIO()
  writer = csv.writer(buffer, lineterminator="\n")
  writer.writerow(["family", "finding", "scope", "ours", "verdict", "why"])
  writer.writerows([f, r.finding, r.scope, r.ours, r.verdict, r.why] for f, r in rows)
  (workdir / "verdicts.csv").write_text(buffer.getvalue())
  text = "\n".join(out) + "\n"
  (workdir / "report.md").write_text(text)
  return text


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m experiments.study", description=__doc__.splitlines()[0])
  p.add_argument("--variant", default="quick", choices=sorted(FAMILIES), help="the configs' CPU variant")
  p.add_argument("--workdir", required=True, help="DIR: each family's sweep goes to DIR/FAMILY")
  p.add_argument("--families", help="comma-separated subset of the variant's families (default: all, in order)")
  p.add_argument("--parallel", type=int, default=1, help="points run at once within a family (default 1)")
  p.add_argument("--report-only", action="store_true", help="run nothing: rewrite the reports from the files")
  p.add_argument("--publish", metavar="DEST", help="copy the report-making files to DEST and report there")
  return p


def main(argv: Sequence[str] | None = None) -> int:
  """The command line (module docstring). Returns the exit status."""
  p = _parser()
  args = p.parse_args(argv)
  families = FAMILIES[args.variant]
  if args.families:
    chosen = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in chosen if f not in families]
    if unknown:
      p.error(f"--families {unknown}: not in the {args.variant} study's families {list(families)}")
    families = tuple(f for f in families if f in chosen)
  workdir = epath.Path(args.workdir)
  code = 0 if args.report_only else run_families(workdir, args.variant, families, args.parallel)
  if code == sweep.EXIT_INTERRUPTED:
    return code
  text = index(workdir, args.variant, families)
  if args.publish:
    dest = epath.Path(args.publish)
    publish(workdir, dest, families)
    text = index(dest, args.variant, families)
  print(text[text.index("## vs the study"):])
  print(f"wrote {(epath.Path(args.publish) if args.publish else workdir) / 'report.md'} (index) and each family's "
        "report.md, results.csv, figures/ and tables/")
  return code


if __name__ == "__main__":
  sys.exit(main())

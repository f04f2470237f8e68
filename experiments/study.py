"""The study in one command: every family's sweep of one variant, each family's report, and an index of verdicts.

    python -m experiments.study --variant quick --workdir runs/study          # lr_sweep quick, ~8 min with set-up
    python -m experiments.study --variant tiny --workdir runs/study_tiny   # every family, ~2.2 h on 2 cores
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
so DEST can be committed and regenerated from itself; it refuses runs from a dirty tree or from more than one commit
(each run's run_info.json) unless ``--allow-mixed``, and then the index says so at the top.

Real-scale sweeps run per family (each config's docstring names its `real` variant) on GPU/TPU VMs, e.g.
``python -m tpu.sweep ... --config experiments/configs/lr_sweep.py:model=meta-llama/Llama-3.2-1B``; this index works
on any directory of family sweeps: ``--variant`` only names the configs' variant.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import io
import json
import math
import platform
import random
import shutil
import subprocess
import sys
from collections.abc import Sequence

from etils import epath

from experiments import analysis, provenance, report, sweep
from lora_jax import lock

FAMILIES = {  # variant -> the families it runs, in order (the LR findings first: the others build on their LRs)
    "quick": ("lr_sweep",),  # findings 3 and 4 with intervals, ~8 min with set-up on a fresh clone
    "tiny": ("lr_sweep", "capacity", "layers", "batch_size", "parametrization", "rl"),  # lr_width: its own study
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


def run_commits(workdir: epath.Path, families: Sequence[str]) -> dict[str, int]:
  """The code every run of the families came from (its run_info.json): "commit", "commit (uncommitted changes, diff
  sha256 H)" or "unknown (no run_info.json)", with the number of runs."""
  out = {}
  for family in families:
    sweep_file = workdir / family / report.SWEEP_FILE
    if not sweep_file.exists():
      continue
    for name in dict.fromkeys(p["name"] for p in json.loads(sweep_file.read_text())["points"]):
      path = workdir / family / name / "run_info.json"
      if not (workdir / family / name / "config.json").exists():
        continue  # never started
      info = json.loads(path.read_text()) if path.exists() else None
      if info is None:
        key = "unknown (no run_info.json)"
      else:
        key = provenance.describe(info)
        earlier = {provenance.describe(e) for e in info.get("earlier_starts", [])} - {key}
        if earlier:  # resumed under other code: never one clean commit
          key += " (resumed; started under " + ", ".join(sorted(earlier)) + ")"
      out[key] = out.get(key, 0) + 1
  return dict(sorted(out.items()))


def clean(commits: dict[str, int]) -> bool:
  """One commit, no uncommitted changes, nothing unknown: what ``--publish`` accepts without ``--allow-mixed``."""
  return len(commits) == 1 and all(" " not in k and k != "unknown" for k in commits)


def _family_line(workdir: epath.Path, family: str) -> str:
  meta, runs = report.load_sweep(workdir / family)
  rl = report.is_rl_sweep(runs)  # RL runs log rewards, not a final eval NLL: finished is their status
  finished = sum(r.state == "done" if rl else r.finished for r in runs)
  failed = sum(r.failed for r in runs)
  return (f"- **{family}** ([report]({family}/report.md)): `python -m experiments.sweep --config "
          f"{meta['config']}:{meta['arg']} --workdir {workdir / family}`; {len(meta['points'])} points, "
          f"{finished} runs finished, {failed} failed, {len(runs) - finished - failed} not finished.")


def summary_rows(rows: Sequence[tuple[str, report.FindingRow]]) -> list[list[str]]:
  """[finding: title, study's claim, family, overall verdict] per finding (in report order) and family."""
  out = []
  for finding in report.INDEX_ORDER:
    for family in dict.fromkeys(f for f, r in rows if r.finding == finding):
      mine = [r for f, r in rows if f == family and r.finding == finding]
      overall = [r.verdict for r in mine if "overall" in r.scope]  # one per setting or LoRA group: all count
      judged = [r.verdict for r in mine if r.verdict in (analysis.AGREE, analysis.DISAGREE, analysis.INCONCLUSIVE,
                                                          analysis.UNSTABLE)]
      verdict = analysis.combine([analysis.Verdict(v, "") for v in (overall or judged)])
      out.append([f"{finding}: {report.INDEX_TITLES[finding]}", report.INDEX_STUDY[finding], family,
                  f"**{verdict}**"])
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
  commits = run_commits(workdir, present)
  if commits and not clean(commits):
    out.insert(1, "**Provenance warning: these runs did not all come from one clean commit** (publishing them "
               "needs `--allow-mixed`); their code: " + "; ".join(f"`{k}`: {n}" for k, n in commits.items()) + ".\n")
  out += [_family_line(workdir, f) for f in present]
  if commits:
    out += ["", "## Provenance\n", "The code of the runs (each run's `run_info.json`):\n",
            *(f"- `{k}`: {n} run{'s' * (n != 1)}" for k, n in commits.items())]
  if (workdir / VERIFY_FILE).exists():
    verified = (workdir / VERIFY_FILE).read_text().split("\n", 2)[2]
    out += ["", "## Checked on another machine\n", verified.strip() + "\n"]
  else:
    out += ["", "## Checked on another machine\n", "Not yet: `python -m experiments.study --variant "
            f"{variant} --workdir SCRATCH --verify K {workdir}` reruns K random points here and writes "
            f"{VERIFY_FILE}.\n"]
  missing = [f for f in families if f not in present]
  if missing:
    out.append("- not run yet: " + ", ".join(missing))
  summary = summary_rows(rows)
  if summary:
    out += ["", "## Summary\n", "One line per finding and family: the family's overall verdict (its `overall` rows, "
            "else all its rows, combined: disagree if any disagrees, agree if all agree, else inconclusive).\n",
            report.Table("", "", ["finding", "study", "family", "verdict"], summary).markdown()]
  out += ["", "## vs the study\n",
          "Every verdict below is decided by the rule its family report prints beside it (`experiments.analysis`), "
          "never by hand; **inconclusive** means the rule found the data unable to tell.\n"]
  header = ["finding", "family", "scope", "ours", "verdict"]
  table_rows = []
  for finding in report.INDEX_ORDER:
    mine = [(f, r) for f, r in rows if r.finding == finding]
    if not mine:
      continue
    out.append(f"### Finding {finding}: {report.INDEX_TITLES[finding]}\n")
    out.append(f"Study: {report.INDEX_STUDY[finding]}.\n")
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


VERIFY_FILE = "verify.md"  # What --verify measured, kept beside the index (which quotes it).


def _cpu() -> str:
  """This machine's CPU model (from /proc/cpuinfo where there is one)."""
  try:
    for line in open("/proc/cpuinfo"):
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def verify(dest: epath.Path, families: Sequence[str], k: int, seed: int, scratch: epath.Path) -> str:
  """Reruns ``k`` random finished points of the study in ``dest`` on this machine (``experiments.main`` into
  ``scratch``) and compares each one's final eval NLL with the recorded one, beside its setting's pooled seed noise
  and whether the base model's fingerprint matched; writes ``dest/VERIFY_FILE`` and returns its text."""
  candidates = []
  for family in families:
    if not (dest / family / report.SWEEP_FILE).exists():
      continue
    meta, runs = report.load_sweep(dest / family)
    noise = {id(r): c.noise for c in report.conditions(runs) for r in c.runs}
    candidates += [(family, meta, r, noise[id(r)]) for r in runs if r.finished]
  if not candidates:
    raise SystemExit(f"--verify: no finished runs under {dest} for {list(families)}")
  chosen = random.Random(seed).sample(candidates, min(k, len(candidates)))
  rows = []
  for i, (family, meta, run, noise) in enumerate(chosen):
    out = scratch / family / run.name
    if out.exists():
      out.rmtree()  # a fresh rerun, never an earlier --verify's files
    argv = sweep.point_command(meta["config"], run.point, str(out), list(meta.get("overrides", [])))
    print(f"== verify {i + 1}/{len(chosen)}: {family} {run.point}", file=sys.stderr, flush=True)
    done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
      raise SystemExit(f"--verify: the rerun of {run.point} failed (exit {done.returncode}): {done.stderr[-2000:]}")
    metrics = [json.loads(line) for line in (out / run.method / "metrics.jsonl").read_text().splitlines()]
    steps = run.config["train"]["steps"]
    again = next(m["eval/nll"] for m in metrics if m.get("step") == steps and "eval/nll" in m)
    recorded = run.evals[steps]
    ours = json.loads((dest / family / run.name / "run_info.json").read_text()).get("base_fingerprint", "—")
    theirs = json.loads((out / "run_info.json").read_text()).get("base_fingerprint", "—")
    rows.append([family, f"`{run.point}`", f"{recorded:.4f}", f"{again:.4f}", f"{again - recorded:+.4f}",
                 "—" if math.isnan(noise.sd) else f"{noise.sd:.4f}",
                 "—" if math.isnan(noise.sd) else f"{abs(again - recorded) / noise.sd:.2f}",
                 "yes" if ours == theirs else f"no ({ours} vs {theirs})"])
  table = report.Table("verify", "", ["family", "point", "recorded NLL", "rerun NLL", "difference", "seed noise",
                                      "|difference| / noise", "same base"], rows)
  text = (f"# Verification on another machine\n\n{len(rows)} random finished points (seed {seed}) of this study "
          f"rerun with `python -m experiments.study --verify {k} {dest}` on {_cpu()} ({platform.machine()}), "
          f"{datetime.date.today().isoformat()}. The difference is the rerun's final eval NLL minus the published "
          f"one; seed noise is the point's setting's pooled seed std (the report's). float32 rounding differs between "
          f"CPUs (the base's pretraining included), so a difference well inside the seed noise is what to expect; "
          f"'same base' says whether the rebuilt base model had the same weights.\n\n" + table.markdown())
  (dest / VERIFY_FILE).write_text(text)
  return text


README_START = "<!-- results table: generated from {path} by `python -m experiments.study --readme-table {path}` -->"
README_END = "<!-- end of the results table -->"


def verdict_rows(workdir: epath.Path) -> list[tuple[str, report.FindingRow]]:
  """(family, verdict row) of every line of workdir/verdicts.csv (the index's, as written by ``index``)."""
  with open(workdir / "verdicts.csv") as f:
    return [(r["family"], report.FindingRow(r["finding"], r["scope"], r["ours"], r["verdict"], r["why"]))
            for r in csv.DictReader(f)]


def readme_table(workdir: epath.Path) -> str:
  """The README's results table, from workdir/verdicts.csv: every family's overall verdict on each finding, between
  the README_START and README_END markers."""
  rows, seen = [], set()
  for title, claim, family, verdict in summary_rows(verdict_rows(workdir)):
    rows.append(["" if title in seen else title, "" if title in seen else claim, f"`{family}`", verdict])
    seen.add(title)
  table = report.Table("", "", ["finding", "study", "family", "verdict"], rows).markdown()
  return f"{README_START.format(path=workdir)}\n\n{table}\n{README_END}"


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m experiments.study", description=__doc__.splitlines()[0])
  p.add_argument("--variant", default="quick", choices=sorted(FAMILIES), help="the configs' CPU variant")
  p.add_argument("--workdir", help="DIR: each family's sweep goes to DIR/FAMILY (required but for --readme-table)")
  p.add_argument("--families", help="comma-separated subset of the variant's families (default: all, in order)")
  p.add_argument("--parallel", type=int, default=1, help="points run at once within a family (default 1)")
  p.add_argument("--report-only", action="store_true", help="run nothing: rewrite the reports from the files")
  p.add_argument("--publish", metavar="DEST", help="copy the report-making files to DEST and report there (refused "
                 "unless every run came from one clean commit)")
  p.add_argument("--readme-table", metavar="DIR", help="print the README's results table from DIR/verdicts.csv "
                 "and exit")
  p.add_argument("--verify", nargs=2, metavar=("K", "DIR"), help="rerun K random finished points of the study in "
                 "DIR on this machine and compare with the recorded NLLs (writes DIR/verify.md); runs nothing else")
  p.add_argument("--verify-seed", type=int, default=0, help="which points --verify picks (default 0)")
  p.add_argument("--allow-mixed", action="store_true", help="publish runs from several commits or uncommitted trees "
                 "(the index then says so at the top)")
  return p


def main(argv: Sequence[str] | None = None) -> int:
  """The command line (module docstring). Returns the exit status."""
  p = _parser()
  args = p.parse_args(argv)
  if args.readme_table:
    print(readme_table(epath.Path(args.readme_table)))
    return 0
  if not args.workdir:
    p.error("--workdir is required")
  families = FAMILIES[args.variant]
  if args.families:
    chosen = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in chosen if f not in families]
    if unknown:
      p.error(f"--families {unknown}: not in the {args.variant} study's families {list(families)}")
    families = tuple(f for f in families if f in chosen)
  if args.verify:
    k, dest = args.verify
    if not k.isdigit() or int(k) < 1:
      p.error(f"--verify K DIR: K must be a positive integer, got {k!r}")
    print(verify(epath.Path(dest), families, int(k), args.verify_seed, epath.Path(args.workdir) / "verify"))
    return 0
  workdir = epath.Path(args.workdir)
  if args.report_only:
    code = 0
  else:
    try:
      with lock.hold(workdir):  # one study runner per directory (each family's sweep locks its own too)
        code = run_families(workdir, args.variant, families, args.parallel)
    except lock.DirectoryLocked as e:
      p.error(str(e))
  if code == sweep.EXIT_INTERRUPTED:
    return code
  text = index(workdir, args.variant, families)
  if args.publish:
    commits = run_commits(workdir, families)
    if not clean(commits) and not args.allow_mixed:
      print(f"--publish refused: the runs in {workdir} did not all come from one clean commit ("
            + "; ".join(f"{k}: {n}" for k, n in commits.items()) + "). Rerun them from one committed tree, or pass "
            "--allow-mixed to publish them with a warning at the top of the index.", file=sys.stderr)
      return 2
    dest = epath.Path(args.publish)
    publish(workdir, dest, families)
    text = index(dest, args.variant, families)
  print(text[text.index("## vs the study"):])
  print(f"wrote {(epath.Path(args.publish) if args.publish else workdir) / 'report.md'} (index) and each family's "
        "report.md, results.csv, figures/ and tables/")
  return code


if __name__ == "__main__":
  sys.exit(main())

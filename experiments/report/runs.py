"""One experiment's report (``experiments.main``'s workdir): its table and learning curves, from its files alone."""

from __future__ import annotations

import json

from etils import epath

from experiments import analysis
from experiments.report.sweeps import _read_records
from lora_jax import metrics


def summarize(workdir: str | epath.PathLike) -> dict:
  """Per method with train and eval records: LR, trainable params, steps (done and planned), whether it finished,
  base and last eval NLL (and its step), perplexity, accuracy; from the files."""
  workdir = epath.Path(workdir)
  config = json.loads((workdir / "config.json").read_text())
  runs = {}
  for method in config["methods"]:
    records = metrics.read_metrics(workdir / method) if (workdir / method / "metrics.jsonl").exists() else []
    train = [r for r in records if "train/loss" in r]
    evals = [r for r in records if "eval/nll" in r]
    if not train or not evals:
      continue  # not started (or stopped before its first logged step): see ``not_started``
    steps = max(r["step"] for r in records)
    runs[method] = {
        "lr": train[-1]["train/lr"], "trainable": train[-1]["params/trainable"], "steps": steps,
        "planned_steps": config["train"]["steps"], "finished": steps >= config["train"]["steps"],
        "base_nll": evals[0]["eval/nll"] if evals[0]["step"] == 0 else None, "eval_nll": evals[-1]["eval/nll"],
        "eval_step": evals[-1]["step"], "perplexity": evals[-1]["eval/perplexity"],
        "accuracy": evals[-1].get("eval/accuracy"),
        "curve": {"train": [(r["step"], r["train/loss"]) for r in train],
                  "eval": [(r["step"], r["eval/nll"]) for r in evals]},
    }
  return runs


def not_started(workdir: str | epath.PathLike, runs: dict) -> list[str]:
  """The config's methods with no results in ``runs`` (``summarize``)."""
  config = json.loads((epath.Path(workdir) / "config.json").read_text())
  return [m for m in config["methods"] if m not in runs]


def markdown(workdir: epath.Path, runs: dict) -> str:
  """The results table (the base model's NLL is the first run's step-0 evaluation); unfinished runs say so."""
  base = next((r["base_nll"] for r in runs.values() if r["base_nll"] is not None), None)
  lines = ["| method | LR | trainable params | eval NLL | perplexity | accuracy | steps |",
           "|---|---|---|---|---|---|---|"]
  if base is not None:
    lines.append(f"| base model | - | - | {base:.4f} | - | - | 0 |")
  for method, r in runs.items():
    accuracy = "-" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
    steps = str(r["steps"])
    if not r["finished"]:
      steps = f"{r['steps']} of {r['planned_steps']} (unfinished; eval NLL at step {r['eval_step']})"
    lines.append(f"| {method} | {r['lr']:g} | {r['trainable']:,} | {r['eval_nll']:.4f} | {r['perplexity']:.3f} | "
                 f"{accuracy} | {steps} |")
  for method in not_started(workdir, runs):
    lines.append(f"| {method} | - | - | - | - | - | not started |")
  return "\n".join(lines) + "\n"


def plot(path: epath.Path, runs: dict, title: str) -> None:
  """Train loss and eval NLL against steps, one line per method."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  for method, r in runs.items():
    for ax, key in zip(axes, ("train", "eval")):
      steps, values = zip(*r["curve"][key])
      ax.plot(steps, values, marker="o" if key == "eval" else None, markersize=3, label=method)
  for ax, label in zip(axes, ("train loss (NLL per loss token)", "held-out NLL per loss token")):
    ax.set_xlabel("step")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend()
  fig.suptitle(title)
  fig.tight_layout()
  with path.open("wb") as f:
    fig.savefig(f, format="png", dpi=120)
  plt.close(fig)


def write(workdir: str | epath.PathLike) -> tuple[str, dict]:
  """Writes report.md and report.png into the workdir; returns the Markdown table and the summary it came from
  (an RL experiment: ``write_rl``)."""
  workdir = epath.Path(workdir)
  if "rl" in json.loads((workdir / "config.json").read_text()):
    return write_rl(workdir)
  runs = summarize(workdir)
  table = markdown(workdir, runs)
  plot(workdir / "report.png", runs, str(workdir))
  unfinished = [m for m, r in runs.items() if not r["finished"]] + not_started(workdir, runs)
  warning = (f"**Unfinished: {', '.join(unfinished)}.** The experiment stopped early (e.g. preempted); its runs are "
             "not comparable yet. Rerun the same command to resume.\n\n") if unfinished else ""
  (workdir / "report.md").write_text(f"# Results: {workdir}\n\n{warning}{table}\n![learning curves](report.png)\n\n"
                                     + "\n".join(f"- {m}: `{workdir / m}`" for m in runs) + "\n")
  return table, runs


def write_rl(workdir: str | epath.PathLike) -> tuple[str, dict]:
  """report.md of an RL experiment (configs/rl.py): per method, greedy held-out accuracy at step 0 and at the end,
  the first round's sampled reward and the mean over the last quarter of steps; returns the table and, per method,
  those numbers."""
  workdir = epath.Path(workdir)
  config = json.loads((workdir / "config.json").read_text())
  lines = ["| method | LR | trainable params | greedy accuracy (step 0 → last) | sampled reward (first step → "
           "mean of the last quarter) | steps |", "|---|---|---|---|---|---|"]
  runs = {}
  for method in config["methods"]:
    path = workdir / method / "metrics.jsonl"
    records = _read_records(path) if path.exists() else []
    evals = [r for r in records if "eval/accuracy" in r]
    trains = {r["step"]: r for r in records if "train/reward" in r}
    if not evals or not trains:
      lines.append(f"| {method} | - | - | - | - | not started |")
      continue
    last = trains[max(trains)]
    score = analysis.final_reward({t: r["train/reward"] for t, r in trains.items()}, max(trains))
    runs[method] = {"lr": last["train/lr"], "start_accuracy": evals[0]["eval/accuracy"],
                    "accuracy": evals[-1]["eval/accuracy"], "start_reward": trains[min(trains)]["train/reward"],
                    "final_reward": score, "steps": max(trains)}
    done = "" if max(trains) >= config["train"]["steps"] else f" of {config['train']['steps']} (unfinished)"
    lines.append(f"| {method} | {last['train/lr']:g} | {last['params/trainable']:,} | "
                 f"{evals[0]['eval/accuracy']:.3f} → {evals[-1]['eval/accuracy']:.3f} | "
                 f"{runs[method]['start_reward']:.3f} → {score:.3f} | {max(trains)}{done} |")
  table = "\n".join(lines) + "\n"
  (workdir / "report.md").write_text(f"# RL results: {workdir}\n\nTask `{config['data']['task']}`, group size "
                                     f"{config['rl']['group_size']}, {config['rl']['prompts_per_step']} prompts per "
                                     f"round.\n\n{table}\n"
                                     + "\n".join(f"- {m}: `{workdir / m}`" for m in config["methods"]) + "\n")
  return table, runs

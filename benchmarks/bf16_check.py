"""bf16 compute against fp32 on the same run: the mixed-precision path's loss curves must stay close.

    python -m benchmarks.bf16_check [--steps 40] [--methods lora,full] [--tolerance 0.03] [--config.KEY=VALUE ...]

Trains the tiny experiment (``finetune.py:tiny``: the tiny pretrained base, synthetic additions, batch 16 x 64, its
LRs) twice per method through ``train.fit`` from the same base, adapters and batches:

- fp32: float32 weights, activations and matmuls;
- bf16: the frozen base stored in bfloat16, activations and matmuls in bfloat16 (softmax, RMSNorm statistics,
  logits and the loss in float32), trained values (adapters, or every weight for full FT) and Adam moments float32.

It compares the loss curves averaged over windows of ``--window`` steps: the check passes when every window's
|mean loss_bf16 - mean loss_fp32| is at most ``--tolerance`` times the fp32 mean. Single steps are not compared:
bf16 rounding moves the trajectory, and one batch's loss then differs by as much as batches differ (9.7% at one
step of the first run here, LoRA, while its 10-step means agreed within 1.3%); a real fault, such as updates lost to
bf16 rounding, shows as a curve that stops falling, a gap that grows window after window. The per-step gap and the
held-out NLL at the end are reported beside it. Writes ``benchmarks/results/bf16_check.json`` (``python -m
benchmarks.results`` puts it in ``benchmarks/RESULTS.md``); the last line is ``bf16 vs fp32: max relative gap of
N-step loss means X (tolerance T): PASS|FAIL``, and the exit status is 1 on FAIL.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

RESULTS = pathlib.Path(__file__).parent / "results" / "bf16_check.json"


def run(method: str, dtype: str, steps: int, config_overrides=()) -> dict:
  """One tiny-experiment run of ``method`` with compute dtype ``dtype``: per-step train loss and the final eval NLL."""
  import jax

  from benchmarks import overhead
  from experiments import run as run_lib
  from lora_jax import hf, train

  config, model_dir, fp32_config, sources, evals, mesh = overhead.tiny_experiment(config_overrides)
  model_config = fp32_config.replace(dtype=dtype, param_dtype=dtype)
  spec, optim_config = run_lib.make_spec(method, config, model_config), run_lib.make_optim(method, config)
  s = train.setup(model_config, spec, optim_config,
                  lambda sh: hf.load_params(model_dir, model_config, shardings=sh), mesh=mesh, seed=config.seed)
  loop = train.LoopConfig(steps=steps, log_every=1, eval_every=steps, checkpoint_every=steps,
                          steps_per_call=config.train.steps_per_call, seed=config.seed)
  with tempfile.TemporaryDirectory() as workdir:
    _, last = train.fit(s.model, s.state, optim_config, loop, run_lib.train_batches(config, sources), lambda: evals,
                        workdir, setup=s, progress=False)
    records = [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
  dtypes = sorted({str(x.dtype) for x in jax.tree.leaves(s.state.frozen)})
  return {"losses": [r["train/loss"] for r in records if "train/loss" in r], "eval_nll": last["eval/nll"],
          "frozen_dtypes": dtypes}


def compare(fp32: dict, bf16: dict, window: int = 10) -> dict:
  """Relative loss gaps of a bf16 run against its fp32 twin: of the means over windows of ``window`` steps (the
  checked figure), of single steps, and of the final held-out NLL."""
  a, b = fp32["losses"], bf16["losses"]
  gaps = [abs(y - x) / x for x, y in zip(a, b)]
  means = lambda xs: [sum(xs[i:i + window]) / len(xs[i:i + window]) for i in range(0, len(xs), window)]  # noqa: E731
  windows = [abs(y - x) / x for x, y in zip(means(a), means(b))]
  return {"window": window, "window_gaps": windows, "max_window_gap": max(windows),
          "max_relative_gap": max(gaps), "max_gap_step": gaps.index(max(gaps)) + 1,
          "mean_relative_gap": sum(gaps) / len(gaps),
          "eval_nll_relative_gap": abs(bf16["eval_nll"] - fp32["eval_nll"]) / fp32["eval_nll"]}


def markdown(results_dir: pathlib.Path) -> list[str]:
  """The RESULTS.md section of the bf16 check (``bf16_check.json``), or nothing when it has not run."""
  path = results_dir / "bf16_check.json"
  if not path.exists():
    return []
  r = json.loads(path.read_text())
  lines = ["## bf16 compute vs fp32 (same run)", "",
           f"`{r['command']}` on {r['device']}, {r['date']} (load average {r['loadavg'][0]:.1f}). The tiny experiment "
           f"for {r['steps']} steps, from the same base, adapters and batches; bf16: bf16 frozen base, activations "
           "and matmuls, fp32 trainables and Adam. Tolerance: the mean loss over each window of "
           f"{r['window']} steps within {r['tolerance']:.0%} of fp32's (single steps differ as batches do once the "
           "trajectories part; they are shown, not checked).", "",
           "| method | fp32 loss: first -> last | bf16 loss: first -> last | gap of the window means | max single-step "
           "gap (step) | mean single-step gap | eval NLL fp32 / bf16 | result |", "|---|---|---|---|---|---|---|---|"]
  for method, m in r["methods"].items():
    a, b, c = m["fp32"], m["bf16"], m["comparison"]
    lines.append(f"| {method} | {a['losses'][0]:.4f} -> {a['losses'][-1]:.4f} | {b['losses'][0]:.4f} -> "
                 f"{b['losses'][-1]:.4f} | {', '.join(f'{g:.2%}' for g in c['window_gaps'])} | "
                 f"{c['max_relative_gap']:.2%} ({c['max_gap_step']}) | {c['mean_relative_gap']:.2%} | "
                 f"{a['eval_nll']:.4f} / {b['eval_nll']:.4f} | "
                 f"{'PASS' if c['max_window_gap'] <= r['tolerance'] else 'FAIL'} |")
  return lines + [""]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=40)
  parser.add_argument("--methods", default="lora,full")
  parser.add_argument("--tolerance", type=float, default=0.03, help="largest allowed relative gap of window means")
  parser.add_argument("--window", type=int, default=10, help="steps per window of the compared loss means")
  parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
  args, config_overrides = parser.parse_known_args(argv)
  from experiments import overrides

  if overrides.bad_syntax(config_overrides):
    parser.error(f"unrecognized arguments: {' '.join(overrides.bad_syntax(config_overrides))} (the tiny experiment's "
                 "config takes --config.KEY=VALUE overrides)")
  methods = args.methods.split(",")
  if any(m not in ("lora", "full") for m in methods):
    raise SystemExit(f"--methods {args.methods!r}: give lora and/or full")
  if args.steps < 2:
    raise SystemExit(f"--steps must be >= 2, got {args.steps}")
  import jax

  result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": jax.devices()[0].device_kind,
            "command": "python -m benchmarks.bf16_check " + " ".join(sys.argv[1:] if argv is None else argv),
            "steps": args.steps, "tolerance": args.tolerance, "window": args.window, "loadavg": list(os.getloadavg()),
            "methods": {}}
  ok = True
  for method in methods:
    fp32, bf16 = (run(method, dtype, args.steps, config_overrides) for dtype in ("float32", "bfloat16"))
    c = compare(fp32, bf16, args.window)
    ok &= c["max_window_gap"] <= args.tolerance
    result["methods"][method] = {"fp32": fp32, "bf16": bf16, "comparison": c}
    print(f"{method}: fp32 loss {fp32['losses'][0]:.4f} -> {fp32['losses'][-1]:.4f}, bf16 {bf16['losses'][0]:.4f} "
          f"-> {bf16['losses'][-1]:.4f}; gaps of {args.window}-step means "
          f"{', '.join(f'{g:.2%}' for g in c['window_gaps'])} (single steps: up to {c['max_relative_gap']:.2%}); "
          f"eval NLL {fp32['eval_nll']:.4f} vs {bf16['eval_nll']:.4f}", flush=True)
  worst = max(m["comparison"]["max_window_gap"] for m in result["methods"].values())
  result["passed"] = bool(ok)
  if args.out:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"recorded in {args.out}")
  print(f"bf16 vs fp32: max relative gap of {args.window}-step loss means {worst:.2%} (tolerance "
        f"{args.tolerance:.0%}): "
        f"{'PASS' if ok else 'FAIL'}")
  if not ok:
    sys.exit(1)


if __name__ == "__main__":
  main()

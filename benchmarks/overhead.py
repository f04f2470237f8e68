"""The trainer loop's own overhead at the tiny experiment's shape: loop time per step minus the compiled step's time.

    python -m benchmarks.overhead [--steps 200] [--repeats 3] [--steps-per-call 1,10] [--methods lora,full]

Builds the tiny experiment exactly as ``experiments.main`` does (``finetune.py:tiny``: the tiny pretrained base,
synthetic additions, batch 16 x 64, a one-device mesh) and, per method, alternates two measurements:

- compiled step: the real jitted train step (``train.setup``'s) called back to back on batches already on the
  device, blocking once at the end: seconds per step;
- loop: ``train.fit`` for ``--steps`` steps (evaluation only at the start and the end); seconds per step between the
  data iterator's calls for steps 20 and ``steps - 20`` (compilation, evaluations and the final checkpoint excluded).

overhead = loop - compiled step, as a fraction of the compiled step; medians over ``--repeats`` interleaved repeats.
Other jobs on the machine make absolute times noisy (the load average is recorded); the fraction, measured back to
back in one process, is the figure to compare. Writes ``benchmarks/results/overhead.json``; the last line is
``trainer overhead: X% of the step (lora, steps_per_call N)``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import tempfile
import time

import numpy as np

RESULTS = pathlib.Path(__file__).parent / "results" / "overhead.json"


class _Stamped:
  """A batch iterator that records when each batch is asked for (one call per step)."""

  def __init__(self, inner):
    self.inner, self.stamps = inner, []

  def __next__(self):
    self.stamps.append((time.perf_counter(), time.process_time(), time.thread_time()))
    return next(self.inner)

  def state(self):
    return self.inner.state()

  def restore(self, state):
    self.inner.restore(state)


def tiny_experiment(config_overrides=()):
  """The tiny experiment's model config, data and mesh (``finetune.py:tiny`` with ``--config.KEY=VALUE``
  overrides), as ``experiments.main`` builds them."""
  from transformers import AutoTokenizer

  from experiments import run as run_lib
  from experiments import tiny_base
  from experiments.configs import finetune
  from lora_jax import sharding

  from experiments import overrides

  config = overrides.apply(finetune.get_config("tiny"), config_overrides)
  model_dir = tiny_base.pretrained(config.tiny_base)
  model_config = run_lib.load_model_config(config, model_dir)
  sources, evals = run_lib.load_data(config, AutoTokenizer.from_pretrained(str(model_dir)))
  return config, model_dir, model_config, sources, evals, sharding.make_mesh(config.mesh.to_dict())


def measure(method: str, steps: int, steps_per_call: int, experiment) -> dict:
  """One interleaved pair for ``method``: the compiled step's seconds per step and ``fit``'s seconds per step."""
  import jax

  from experiments import run as run_lib
  from lora_jax import hf, sharding, train

  config, model_dir, model_config, sources, evals, mesh = experiment
  spec, optim_config = run_lib.make_spec(method, config, model_config), run_lib.make_optim(method, config)

  def fresh():
    return train.setup(model_config, spec, optim_config, lambda sh: hf.load_params(model_dir, model_config,
                                                                                   shardings=sh),
                       mesh=mesh, seed=config.seed)

  s = fresh()
  data = run_lib.train_batches(config, sources)
  batches = [sharding.global_batch(next(data), mesh) for _ in range(10)]
  frozen, state = s.state.frozen, s.state.replace(frozen=None)
  state, m = s.train_step(frozen, state, batches[0])  # compile
  jax.block_until_ready(m)
  n = steps - 40  # as many steps as the loop's timed window
  t0, c0, h0 = time.perf_counter(), time.process_time(), time.thread_time()
  for i in range(n):
    state, m = s.train_step(frozen, state, batches[i % len(batches)])
  h1 = time.thread_time()
  jax.block_until_ready((state, m))
  step_s, step_cpu = (time.perf_counter() - t0) / n, (time.process_time() - c0) / n

  s = fresh()
  kw = {f.name: getattr(config.train, f.name) for f in dataclasses.fields(train.LoopConfig)
        if f.name in config.train}
  kw.update(steps=steps, eval_every=steps, checkpoint_every=steps, seed=config.seed)
  if "steps_per_call" in {f.name for f in dataclasses.fields(train.LoopConfig)}:
    kw["steps_per_call"] = steps_per_call
  elif steps_per_call != 1:
    raise SystemExit("this trainer has no LoopConfig.steps_per_call; measure it with --steps-per-call 1")
  stamped = _Stamped(run_lib.train_batches(config, sources))
  with tempfile.TemporaryDirectory() as workdir:
    train.fit(s.model, s.state, optim_config, train.LoopConfig(**kw), stamped, lambda: evals, workdir,
              setup=s, progress=False)
  lo, hi = 20, steps - 20
  (t_lo, c_lo, h_lo), (t_hi, c_hi, h_hi) = stamped.stamps[lo], stamped.stamps[hi]
  # The host thread's CPU time per step (the Python loop: data, dispatch, metric fetches, logs; XLA computes on
  # its own threads): the loop's work that other jobs' load does not inflate.
  return {"step_s": step_s, "loop_s": (t_hi - t_lo) / (hi - lo), "step_cpu_s": step_cpu,
          "loop_cpu_s": (c_hi - c_lo) / (hi - lo), "step_host_s": (h1 - h0) / n,
          "loop_host_s": (h_hi - h_lo) / (hi - lo)}


def markdown(results_dir: pathlib.Path) -> list[str]:
  """The RESULTS.md section of the overhead figures (``overhead_before.json``: the old loop; ``overhead.json``)."""
  found = [(n, results_dir / f) for n, f in (("before", "overhead_before.json"), ("now", "overhead.json"))
           if (results_dir / f).exists()]
  if not found:
    return []
  lines = ["## Trainer overhead at the tiny experiment's shape", "",
           "Loop time per step of `train.fit` minus the compiled step's own time (the real jitted step called back "
           "to back), as a fraction of the step; medians of interleaved repeats. CPU time (the process's) is "
           "less disturbed by other jobs than wall-clock time.", "",
           "| code | method | steps per call | compiled step ms | loop ms/step | overhead | CPU: compiled ms | "
           "CPU: loop ms | CPU overhead | loop's host thread ms/step (of step CPU) | load average | date |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for name, path in found:
    r = json.loads(path.read_text())
    load = ", ".join("%.1f" % x[0] for x in r["loadavg"])
    for row in r["rows"]:
      lines.append(f"| {r['label'] or name + ': ' + r['command']} | {row['method']} | {row['steps_per_call']} | "
                   f"{1e3 * row['compiled_step_s']:.2f} | {1e3 * row['loop_step_s']:.2f} | "
                   f"{100 * row['overhead_fraction']:.1f}% | {1e3 * row['compiled_step_cpu_s']:.2f} | "
                   f"{1e3 * row['loop_step_cpu_s']:.2f} | {100 * row['overhead_cpu_fraction']:.1f}% | "
                   f"{1e3 * row['loop_host_s']:.2f} ({100 * row['host_fraction']:.1f}%) | {load} | "
                   f"{r['date']} |")
  return lines + [""]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=200, help="steps of each fit (>= 60)")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--steps-per-call", default="1,10", help="LoopConfig.steps_per_call values to compare")
  parser.add_argument("--methods", default="lora,full")
  parser.add_argument("--label", default="", help="a note stored with the figures (e.g. 'before')")
  parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
  args = parser.parse_args(argv)
  if args.steps < 60:
    raise SystemExit(f"--steps {args.steps}: give at least 60 (steps 20..steps-20 are timed)")
  import jax

  experiment = tiny_experiment()
  load = [os.getloadavg()]
  runs = {}
  for repeat in range(args.repeats):  # interleaved: every variant once per repeat
    for method in args.methods.split(","):
      for k in (int(x) for x in args.steps_per_call.split(",")):
        r = measure(method, args.steps, k, experiment)
        runs.setdefault(f"{method},{k}", []).append(r)
        print(f"repeat {repeat}: {method:<5} steps_per_call {k:>3}: compiled step {1e3 * r['step_s']:.2f} ms "
              f"({1e3 * r['step_cpu_s']:.2f} ms CPU), loop {1e3 * r['loop_s']:.2f} ms/step "
              f"({1e3 * r['loop_cpu_s']:.2f} ms CPU)", flush=True)
    load.append(os.getloadavg())
  rows = []
  for key, rs in runs.items():
    method, k = key.split(",")
    med = lambda key: float(np.median([r[key] for r in rs]))  # noqa: E731
    frac = lambda a, b: float(np.median([(r[a] - r[b]) / r[b] for r in rs]))  # noqa: E731
    rows.append({"method": method, "steps_per_call": int(k), "compiled_step_s": med("step_s"),
                 "loop_step_s": med("loop_s"), "overhead_s": med("loop_s") - med("step_s"),
                 "overhead_fraction": frac("loop_s", "step_s"), "compiled_step_cpu_s": med("step_cpu_s"),
                 "loop_step_cpu_s": med("loop_cpu_s"), "overhead_cpu_fraction": frac("loop_cpu_s", "step_cpu_s"),
                 "step_host_s": med("step_host_s"), "loop_host_s": med("loop_host_s"),
                 "host_fraction": float(np.median([r["loop_host_s"] / r["step_cpu_s"] for r in rs])),
                 "repeats": rs})
  print("medians; wall-clock time, and the process's CPU time (less sensitive to other jobs on the machine)")
  print(f"{'method':<7}{'steps/call':>11}{'compiled ms':>13}{'loop ms':>10}{'overhead':>10}"
        f"{'CPU: compiled':>15}{'loop':>8}{'overhead':>10}{'host thread':>13}{'of step CPU':>13}")
  for r in rows:
    print(f"{r['method']:<7}{r['steps_per_call']:>11}{1e3 * r['compiled_step_s']:>13.2f}"
          f"{1e3 * r['loop_step_s']:>10.2f}{100 * r['overhead_fraction']:>9.1f}%"
          f"{1e3 * r['compiled_step_cpu_s']:>15.2f}{1e3 * r['loop_step_cpu_s']:>8.2f}"
          f"{100 * r['overhead_cpu_fraction']:>9.1f}%{1e3 * r['loop_host_s']:>13.2f}"
          f"{100 * r['host_fraction']:>12.1f}%")
  result = {"label": args.label, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "device": str(jax.devices()[0]), "jax": jax.__version__, "loadavg": load,
            "command": "python -m benchmarks.overhead " + " ".join(argv if argv is not None else os.sys.argv[1:]),
            "steps": args.steps, "rows": rows}
  if args.out is not None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"recorded in {args.out}")
  best = min((r for r in rows if r["method"] == rows[0]["method"]), key=lambda r: r["overhead_fraction"])
  print(f"trainer overhead: {100 * best['overhead_fraction']:.1f}% of the step ({best['method']}, steps_per_call "
        f"{best['steps_per_call']}; CPU time: {100 * best['overhead_cpu_fraction']:.1f}%; the loop's host thread: "
        f"{100 * best['host_fraction']:.1f}% of the step's CPU time)")


if __name__ == "__main__":
  main()

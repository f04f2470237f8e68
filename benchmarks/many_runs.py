"""Many runs in one step: K sweep points trained as K separate runs vs one stacked run (``lora_jax.stack``).

    python -m benchmarks.many_runs [--ks 1,8] [--step-ks 1,4,8,16] [--vectorize 1,2,0] [--skip-end-to-end]

(a) End to end: the first K points of ``experiments/configs/lr_sweep.py:tiny`` (the CPU study's LoRA points: same
steps, evaluations and checkpoints as the study; different LRs and seeds, so each run draws its own data order) run
through the sweep runner as K separate ``experiments.main`` processes one after another, and as one
``experiments.stacked`` process. Wall time of each, and the speedup.
(b) The compiled step alone: K separate jitted LoRA r4 train steps (one per run, called one after another) vs one
stacked step over K runs, grouped ``vectorize`` runs per vmap (0 = all K; ``stack.make_steps``), on the study's tiny
shape and on a ~3M-parameter shape; median seconds per step for all K runs after warm-up. One shared batch here (as
a sweep of LRs over one data order).

(c) Where the vmapped program loses on a CPU: the XLA profiler's time per compiled op of the stacked tiny step at K=8,
looped one run at a time vs all runs in one vmap, summed by kind (matmul fusions, other dots, copies/transposes,
elementwise fusions); and one matmul of the tiny shape's MLP (128 -> 384) at one run's rows (B x T) and at 8 runs'
rows in one dot, in GFLOP/s.
The step floor of (a): the config's steps times (b)'s stacked step at the same K (the CPU default grouping): the
stacked run's wall time cannot go below it, so ``separate_s / step_floor_s`` bounds its speedup.

Writes ``benchmarks/results/many_runs.json`` (with the machine's load average: on a shared machine the times move)
and prints a table; the last line is ``stacked/sequential speedup at K=8: X`` for (a) (or for the largest K run).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import overrides, sweep, tiny_base
from lora_jax import lora, optim, stack, train
from lora_jax.models import transformer

RESULTS = pathlib.Path(__file__).parent / "results" / "many_runs.json"
CONFIG_FILE = "experiments/configs/lr_sweep.py"
SHAPES = {  # name -> (ModelConfig fields, batch, seq)
    "tiny (study point, hidden 128)": (dict(vocab_size=64, hidden_size=128, intermediate_size=384, num_layers=2,
                                            num_heads=4, num_kv_heads=2, head_dim=32), 16, 64),
    "~3M params (hidden 256, 4 layers)": (dict(vocab_size=2048, hidden_size=256, intermediate_size=768, num_layers=4,
                                               num_heads=8, num_kv_heads=4, head_dim=32), 8, 64),
}


TINY = next(iter(SHAPES))


def _setup(shape: str, k: int):
  """``(model, plans, batch, stack)`` of ``k`` LoRA r4 runs (LRs a factor 2 apart, one seed each) at a ``SHAPES``
  shape, on one random batch."""
  fields, batch_size, seq = SHAPES[shape]
  config = transformer.ModelConfig(architecture="llama", **fields)
  model = transformer.CausalLM(config)
  params = transformer.init_params(config, jax.random.key(0))
  spec = lora.LoraSpec(rank=4, targets=("all-linear", "unembed"))
  plans = [stack.RunPlan(spec, optim.OptimConfig(lr=1e-3 * 2 ** (i % 5 - 2)), seed=i) for i in range(k)]
  tokens = np.random.default_rng(0).integers(0, config.vocab_size, (batch_size, seq + 1))
  batch = {"inputs": jnp.asarray(tokens[:, :-1], jnp.int32), "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
           "loss_mask": jnp.ones((batch_size, seq), jnp.float32)}
  return model, plans, batch, stack.init(params, plans)


def end_to_end(k: int, workdir: pathlib.Path) -> dict:
  """Wall seconds of the first ``k`` tiny study points run separately (one process each) and stacked (one)."""
  module = overrides.load_config_module(CONFIG_FILE)
  points = [p for p in sweep.sweep_points(module, "tiny") if "method=lora" in p.arg][:k]
  out = {"k": k, "points": [p.arg for p in points]}
  tiny_base.pretrained(module.get_config(points[0].arg).tiny_base)  # built (or found) before the clock starts
  for mode, groups in (("separate", [[p] for p in points]), ("stacked", [points])):
    d = workdir / f"k{k}_{mode}"
    runner = sweep.Sweep(CONFIG_FILE, points, d, groups=groups, stream=open(os.devnull, "w"))
    t0 = time.perf_counter()
    code = runner.run()
    out[f"{mode}_s"] = time.perf_counter() - t0
    if code != 0:
      raise RuntimeError(f"{mode} run of {k} points failed: see {d}/*/log.txt")
    print(f"  end to end, K={k}, {mode}: {out[f'{mode}_s']:.1f} s", flush=True)
  out["speedup"] = out["separate_s"] / out["stacked_s"]
  return out


def _median_time(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def step_alone(shape: str, k: int, repeats: int, vectorize: list[int]) -> dict:
  """Seconds per step of all ``k`` runs: ``k`` separate jitted steps vs one stacked step, with each ``vectorize``
  (runs per vmapped group, the groups looped: ``stack.make_steps``; 0 = all ``k`` in one vmap); median after
  warm-up, the variants' repeats interleaved so that a change in the machine's load hits them alike."""
  model, plans, batch, s = _setup(shape, k)

  def stacked_variant(v):
    step, _ = stack.make_steps(model, plans, vectorize=v or k)
    box = {"state": jax.tree.map(jnp.copy, s.state.replace(frozen=None))}

    def run():
      box["state"], m = step(s.state.frozen, box["state"], batch, s.hyper)
      return m["train/loss"]

    return run

  singles = [s.run_state(i) for i in range(k)]
  steps = [train.jit_train_step(train.make_train_step(model, optim.make_optimizer(p.optim))) for p in plans]
  frozen = singles[0].frozen
  rests = [st.replace(frozen=None) for st in singles]

  def separate():
    losses = []
    for i in range(k):
      rests[i], m = steps[i](frozen, rests[i], batch)
      losses.append(m["train/loss"])
    return losses

  variants = {"separate": separate, **{f"vectorize={v or k}": stacked_variant(v)
                                      for v in dict.fromkeys(v if v < k else 0 for v in vectorize)}}
  for fn in variants.values():  # compile and warm up
    fn(), fn()
  times = {name: [] for name in variants}
  for _ in range(repeats):
    for name, fn in variants.items():
      times[name].append(_median_time(fn, 1))
  out = {"shape": shape, "k": k, "params": sum(x.size for x in jax.tree.leaves(s.state.frozen)),
         "separate_s": statistics.median(times["separate"]),
         "stacked_s": {name[len("vectorize="):]: statistics.median(t) for name, t in times.items() if name != "separate"}}
  out["speedup"] = {v: out["separate_s"] / t for v, t in out["stacked_s"].items()}
  print(f"  step alone, {shape}, K={k}: separate {out['separate_s'] * 1e3:.1f} ms; stacked " + ", ".join(
      f"vectorize {v}: {t * 1e3:.1f} ms ({out['speedup'][v]:.2f}x)" for v, t in out["stacked_s"].items()), flush=True)
  return out


def hlo_counts(k: int) -> dict:
  """Where a vmapped stacked step's time goes at the tiny shape: dots, batched dots, transposes and copies in the
  compiled HLO of the stacked step over ``k`` runs (all in one vmap) and of one run's own step."""
  import re

  model, plans, batch, s = _setup(TINY, k)
  stacked_step, _ = stack.make_steps(model, plans, vectorize=k)  # the vmapped program
  one = s.run_state(0)
  single = train.jit_train_step(train.make_train_step(model, optim.make_optimizer(plans[0].optim)))

  def count(text):
    dots = re.findall(r" dot\((.*?)\)(, lhs_batch_dims=\{[^}]*\})?", text)
    return {"dots": len(dots), "batched_dots": sum(1 for d in dots if d[1]), "transposes": text.count(" transpose("),
            "copies": text.count(" copy(")}

  return {"k": k,
          "stacked": count(stacked_step.lower(s.state.frozen, s.state.replace(frozen=None), batch, s.hyper)
                           .compile().as_text()),
          "one_run": count(single.lower(one.frozen, one.replace(frozen=None), batch).compile().as_text())}


def matmul_rates(repeats: int) -> list[dict]:
  """GFLOP/s of the tiny shape's MLP up-projection (128 -> 384, float32) at one run's rows and at 8 runs' rows in
  one dot (what vmapping 8 runs over a shared W makes of it)."""
  fields, batch_size, seq = SHAPES[TINY]
  d, f = fields["hidden_size"], fields["intermediate_size"]
  w = jax.random.normal(jax.random.key(0), (d, f), jnp.float32)
  dot = jax.jit(jnp.dot)
  out = []
  for runs in (1, 8):
    x = jax.random.normal(jax.random.key(1), (runs * batch_size * seq, d), jnp.float32)
    dot(x, w).block_until_ready()
    t = statistics.median(_median_time(lambda: dot(x, w), 1) for _ in range(repeats))  # noqa: B023
    out.append({"runs": runs, "shape": [x.shape[0], d, f], "seconds": t, "gflop_per_s": 2 * x.shape[0] * d * f / t / 1e9})
    print(f"  matmul {x.shape[0]}x{d} @ {d}x{f} ({runs} run(s)' rows): {t * 1e6:.0f} us, "
          f"{out[-1]['gflop_per_s']:.1f} GFLOP/s", flush=True)
  return out


def _op_kind(name: str) -> str:
  if name.startswith("ynn_fusion"):
    return "matmul fusions (YNNPACK)"
  if name.startswith("dot") or "_dot" in name:
    return "other dots"
  if "copy" in name or "transpose" in name:
    return "copies and transposes"
  return "elementwise and other fusions"


def op_breakdown(k: int, vectorize: list[int], steps: int = 5) -> dict:
  """Milliseconds per stacked tiny step (all ``k`` runs) spent in each kind of compiled op (``_op_kind``), from the
  XLA profiler's trace, for each grouping in ``vectorize`` (ops on the 2 cores overlap, so kinds add up to more than
  the step)."""
  import collections
  import gzip
  import shutil

  model, plans, batch, s = _setup(TINY, k)
  out = {}
  for v in vectorize:
    step, _ = stack.make_steps(model, plans, vectorize=v or k)
    state = jax.tree.map(jnp.copy, s.state.replace(frozen=None))
    for _ in range(2):
      state, m = step(s.state.frozen, state, batch, s.hyper)
    jax.block_until_ready(m)
    trace_dir = tempfile.mkdtemp()
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    t0 = time.perf_counter()
    for _ in range(steps):
      state, m = step(s.state.frozen, state, batch, s.hyper)
      jax.block_until_ready(m)
    wall = (time.perf_counter() - t0) / steps
    jax.profiler.stop_trace()
    trace = next(pathlib.Path(trace_dir).rglob("*.trace.json.gz"))
    kinds = collections.Counter()
    for e in json.load(gzip.open(trace))["traceEvents"]:
      name = e.get("name", "")
      if e.get("ph") == "X" and name[:1].islower() and not name.startswith("$"):  # compiled ops, not runtime spans
        kinds[_op_kind(name)] += e["dur"] / 1e3 / steps
    shutil.rmtree(trace_dir, ignore_errors=True)
    out[str(v or k)] = {"step_ms": wall * 1e3, **dict(kinds.most_common())}
    print(f"  ops of the stacked step, K={k}, {v or k} run(s) per vmap: step {wall * 1e3:.0f} ms; " + ", ".join(
        f"{kind} {ms:.0f} ms" for kind, ms in kinds.most_common()), flush=True)
  return out


def step_floor(e2e: dict, steps_alone: list[dict]) -> dict:
  """(a)'s floor: the points' steps times (b)'s stacked tiny step at the same K and the default grouping."""
  module = overrides.load_config_module(CONFIG_FILE)
  steps = module.get_config(e2e["points"][0]).train.steps
  v = str(stack.default_vectorize(e2e["k"]))
  step = next((r for r in steps_alone if r["k"] == e2e["k"] and r["shape"] == TINY
               and v in r["stacked_s"]), None)
  if step is None:
    return {}
  floor = steps * step["stacked_s"][v]
  return {"step_floor_s": floor, "step_floor_from": f"{steps} steps x {step['stacked_s'][v]:.4f} s (stacked step, "
          f"K={e2e['k']}, {v} run(s) per vmap, rank 4)", "max_speedup": e2e["separate_s"] / floor,
          "stacked_beyond_floor_s": e2e["stacked_s"] - floor}


def _ints(text: str) -> list[int]:
  return [int(x) for x in text.split(",") if x]


def main(argv=None) -> dict:
  """Runs the benchmark (module docstring), writes the JSON, prints the table and the speedup line."""
  p = argparse.ArgumentParser(prog="python -m benchmarks.many_runs", description=__doc__.splitlines()[0])
  p.add_argument("--ks", type=_ints, default=[1, 8], help="K of the end-to-end comparison (default 1,8)")
  p.add_argument("--step-ks", type=_ints, default=[1, 4, 8, 16], help="K of the compiled-step comparison")
  p.add_argument("--repeats", type=int, default=15, help="timed steps per variant in (b)")
  p.add_argument("--vectorize", type=_ints, default=[1, 2, 0],
                 help="runs per vmapped group of the stacked step in (b); 0 = all K (default 1,2,0)")
  p.add_argument("--skip-end-to-end", action="store_true", help="only (b)")
  p.add_argument("--out", default=str(RESULTS), help="where the JSON goes")
  args = p.parse_args(argv)
  record = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join(["python -m benchmarks.many_runs", *(argv if argv is not None else sys.argv[1:])]),
            "device": str(jax.devices()[0]), "cpu_count": os.cpu_count(), "machine": platform.processor(),
            "jax": jax.__version__, "load_average_start": os.getloadavg(), "end_to_end": [], "step_alone": []}
  print("(b) the compiled step alone", flush=True)
  for shape in SHAPES:
    for k in args.step_ks:
      record["step_alone"].append(step_alone(shape, k, args.repeats, args.vectorize))
  record["hlo"] = [hlo_counts(k) for k in (1, 8)]
  for h in record["hlo"]:
    print(f"  HLO, tiny shape, K={h['k']}: stacked {h['stacked']}; one run's step {h['one_run']}", flush=True)
  print("(c) where the time goes: compiled ops by kind; one matmul, one run's rows vs 8 runs' rows", flush=True)
  record["ops"] = op_breakdown(8, [1, 0])
  record["matmul"] = matmul_rates(args.repeats)
  if not args.skip_end_to_end:
    print("(a) end to end through the sweep runner", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
      for k in args.ks:
        e2e = end_to_end(k, pathlib.Path(tmp))
        e2e.update(step_floor(e2e, record["step_alone"]))
        record["end_to_end"].append(e2e)
  record["load_average_end"] = os.getloadavg()
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(record, indent=2) + "\n")
  print("\n| measure | shape | K | runs per vmap | separate (s) | stacked (s) | speedup |\n|---|---|---|---|---|---|---|")
  for r in record["end_to_end"]:
    print(f"| end to end ({r['k']} sweep points) | tiny study point | {r['k']} | default | {r['separate_s']:.1f} | "
          f"{r['stacked_s']:.1f} | {r['speedup']:.2f} |")
    if "step_floor_s" in r:
      print(f"| step floor of the stack ({r['step_floor_from']}) | tiny study point | {r['k']} | default | "
            f"{r['separate_s']:.1f} | {r['step_floor_s']:.1f} | {r['max_speedup']:.2f} (bound) |")
  for r in record["step_alone"]:
    for v, t in r["stacked_s"].items():
      print(f"| compiled step (all K runs) | {r['shape']} | {r['k']} | {v} | {r['separate_s']:.4f} | {t:.4f} | "
            f"{r['speedup'][v]:.2f} |")
  print(f"load average: {record['load_average_start']} at the start, {record['load_average_end']} at the end")
  if record["end_to_end"]:
    best = next((r for r in record["end_to_end"] if r["k"] == 8), record["end_to_end"][-1])
    print(f"stacked/sequential speedup at K={best['k']}: {best['speedup']:.2f}")
  return record


if __name__ == "__main__":
  main()

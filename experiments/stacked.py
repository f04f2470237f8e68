"""Several points of one config file trained together as one stacked run (``lora_jax.stack``), each into its own
workdir exactly as ``experiments.main`` would leave it.

    python -m experiments.stacked --config experiments/configs/lr_sweep.py \\
        --point tiny,rank=4,lr=0.001 --workdir runs/a --point tiny,rank=16,lr=0.002 --workdir runs/b \\
        [--overwrite] [--vectorize N] [-- --config.train.steps=100 ...]

The points must be one method each and differ only in ``STACKABLE_FIELDS`` (LR, LoRA+ ratio, weight decay, rank,
alpha, scaling, A's init, seeds; ``stack_key`` says what else they must share). They share one process, one base,
one tokenised dataset and one compiled step; the frozen base is shared, and so is each batch among the points whose
``data_seed`` agree. Each workdir gets ``config.json``, ``run_info.json``, ``<method>/`` (metrics.jsonl,
lora_diagnostics.jsonl, summary.txt, lora_spec.json, adapter-only checkpoints, TensorBoard) and ``report.md``, plus
``stack.json``: how the point ended ("done" or "failed" with the error a run alone would have raised) and which
points it was stacked with.
``experiments.sweep --stack`` runs points this way. Exit status: 0 when every point is done, 1 when one failed,
143 after SIGTERM (checkpoints saved; the same command resumes).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import jax
import ml_collections
from etils import epath

from experiments import run as run_lib
from experiments import overrides, report, tiny_base
from lora_jax import hf, loop, model_lora, stack, train
from lora_jax.models import transformer

# Config fields in which the points of one stack may differ (``lora.rank_pattern.*`` and ``alpha_pattern.*`` too).
STACKABLE_FIELDS = ("seed", "data_seed", "optim.lr", "optim.lr_b_ratio", "optim.weight_decay", "lora.rank",
                    "lora.alpha", "lora.scaling", "lora.init_a", "lora.rank_policy", "wandb.project")
_STACKABLE_PREFIXES = ("lora.rank_pattern.", "lora.alpha_pattern.")
EXIT_FAILED = 1
STACK_FILE = "stack.json"


def _stackable(key: str) -> bool:
  return key in STACKABLE_FIELDS or key.startswith(_STACKABLE_PREFIXES)


def stack_key(config: ml_collections.ConfigDict) -> str | None:
  """What the points of one stack must share: the config without ``STACKABLE_FIELDS`` (as JSON), or None when the
  config cannot be stacked at all (more than one method, pissa init, a quantized base, or an RL run)."""
  if "rl" in config:  # policy-gradient runs (configs/rl.py) have their own loop (experiments.rl_run)
    return None
  if "methods" not in config or "lora" not in config or len(config.methods) != 1 or config.lora.init_a == "pissa":
    return None
  if config.get("quant") is not None and config.quant.kind != "none" and config.methods[0] == "lora":
    return None  # a quantized base (QLoRA) trains through train.setup, which stacks do not use
  flat = report.flatten(json.loads(run_lib.config_json(config)))
  return json.dumps({k: v for k, v in sorted(flat.items()) if not _stackable(k)}, sort_keys=True)


def check_group(configs: Sequence[ml_collections.ConfigDict]) -> None:
  """Raises ValueError naming the fields that keep these configs from one stack."""
  for i, c in enumerate(configs):
    if stack_key(c) is None:
      raise ValueError(f"point {i} cannot be stacked: it has methods {tuple(c.methods)}, init_a {c.lora.init_a!r} "
                       f"and quant.kind {c.get('quant', {}).get('kind', 'none')!r} (a stack needs one method per "
                       "point, no pissa init and a full-precision base)")
  ref = report.flatten(json.loads(run_lib.config_json(configs[0])))
  for i, c in enumerate(configs[1:], 1):
    flat = report.flatten(json.loads(run_lib.config_json(c)))
    diff = sorted(k for k in set(ref) | set(flat) if not _stackable(k) and ref.get(k) != flat.get(k))
    if diff:
      raise ValueError(f"point {i} cannot be stacked with point 0: they differ in {diff}; the points of a stack may "
                       f"differ only in {list(STACKABLE_FIELDS)} and lora.rank_pattern/alpha_pattern")


def run(configs: Sequence[ml_collections.ConfigDict], workdirs: Sequence[str | epath.PathLike],
        overwrite: bool = False, vectorize: int | None = None) -> list[loop.RunResult]:
  """Trains the points as one stack, each into its workdir with its report and ``stack.json``; returns each result.

  Everything is checked before any workdir is touched, as ``experiments.main.run`` does (one writer per workdir:
  ``run.one_writer``).
  """
  workdirs = [epath.Path(w) for w in workdirs]
  if len(configs) != len(workdirs) or not configs:
    raise SystemExit(f"give one workdir per point: {len(configs)} point(s), {len(workdirs)} workdir(s)")
  with run_lib.one_writer(workdirs):
    return _run(configs, workdirs, overwrite, vectorize)


def _run(configs: Sequence[ml_collections.ConfigDict], workdirs: list[epath.Path], overwrite: bool,
         vectorize: int | None) -> list[loop.RunResult]:
  conflicts = [run_lib.workdir_conflict(w, c) for w, c in zip(workdirs, configs)]
  if any(conflicts) and not overwrite:
    raise SystemExit(next(c for c in conflicts if c))
  if jax.process_count() > 1:
    raise SystemExit("experiments.stacked runs in one process; run a multi-host point with experiments.main")
  config = configs[0]
  try:
    check_group(configs)
    for c in configs:
      run_lib.check_config(c)
    model_dir = tiny_base.pretrained(config.tiny_base) if config.model.name == "tiny" else config.model.name
    model_config = run_lib.load_model_config(config, model_dir)
    method = config.methods[0]
    plans = [stack.RunPlan(run_lib.make_spec(method, c, model_config), run_lib.make_optim(method, c), c.seed)
             for c in configs]
    stack.check_stackable(plans)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    sources, evals = run_lib.load_data(config, tokenizer)
    # One iterator per data order (data_seed): shared by every run when they all agree, else a list with each
    # run's iterator, runs of one order sharing theirs (drawn once a step).
    by_seed = {}
    for c in configs:
      if c.data_seed not in by_seed:
        by_seed[c.data_seed] = run_lib.train_batches(c, sources)
    batches = by_seed[config.data_seed] if len(by_seed) == 1 else [by_seed[c.data_seed] for c in configs]
  except ValueError as e:
    raise SystemExit(f"not started, {', '.join(map(str, workdirs))} untouched: {e}") from e
  for w, c, conflict in zip(workdirs, configs, conflicts):
    run_lib.start_workdir(w, c, overwrite=conflict is not None, model_dir=model_dir)
  params = hf.load_params(model_dir, model_config)
  model = transformer.CausalLM(model_config)
  layouts = model_lora.layouts(model_config)
  s = stack.init(params, plans, layouts)
  del params
  run_dirs = [w / method for w in workdirs]
  records, writers = zip(*(run_lib.start_run_dir(d, s.run_state(k), plans[k].spec, method, model_dir, model_config,
                                                  c, f"{w.name}/{method}")
                           for k, (d, c, w) in enumerate(zip(run_dirs, configs, workdirs))))
  loop = train.LoopConfig(**config.train.to_dict(), seed=config.seed)
  print(f"== stack of {len(plans)} {method} run(s): " + ", ".join(
      f"lr {p.optim.lr:g}" + (f" r{p.spec.rank}" if method == "lora" else "") + f" seed {c.seed}"
      for p, c in zip(plans, configs)), flush=True)
  names = [w.name for w in workdirs]
  try:
    _, results = stack.fit(model, s, loop, batches, lambda: evals, run_dirs, records=records, writers=writers,
                           eval_hook=run_lib.arithmetic_accuracy_hook(config, model, tokenizer), vectorize=vectorize)
  except train.Preempted:
    for w in workdirs:
      report.write(w)
    raise
  finally:
    for writer in writers:
      writer.close()
  for k, (w, r) in enumerate(zip(workdirs, results)):
    report.write(w)
    (w / STACK_FILE).write_text(json.dumps({"state": r.state, "error": r.error, "index": k, "stacked_with": names},
                                           indent=2) + "\n")
    print(f"{w.name}: {r.state}" + (f" ({r.error})" if r.error else ""), flush=True)
  return results


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m experiments.stacked", description=__doc__.splitlines()[0])
  p.add_argument("--config", required=True, metavar="FILE.py", help="config file; get_config(POINT) builds a point")
  p.add_argument("--point", action="append", required=True, help="a point's arg string (repeat, one per run)")
  p.add_argument("--workdir", action="append", required=True, help="that point's workdir (repeat, in order)")
  p.add_argument("--overwrite", action="store_true", help="delete a workdir that holds a run of another config")
  p.add_argument("--vectorize", type=int, default=None, metavar="N",
                 help="runs per vmapped group of the step (default: all on GPU/TPU, 1 on CPU; stack.default_vectorize)")
  p.add_argument("overrides", nargs="*", metavar="-- --config.KEY=VALUE", help="overrides for every point")
  return p


def main(argv: Sequence[str] | None = None) -> int:
  """The command line (module docstring); returns the exit status."""

  p = _parser()
  args = p.parse_args(argv)
  if len(args.point) != len(args.workdir):
    p.error(f"{len(args.point)} --point but {len(args.workdir)} --workdir: give one workdir per point")
  if args.vectorize is not None and args.vectorize < 1:
    p.error(f"--vectorize must be >= 1, got {args.vectorize}")
  try:
    module = overrides.load_config_module(args.config)
    configs = [overrides.apply(module.get_config(point), args.overrides) for point in args.point]
  except ValueError as e:
    p.error(str(e))
  try:
    results = run(configs, args.workdir, args.overwrite, args.vectorize)
  except train.Preempted as e:
    print(f"{e}; rerun the same command to resume.", flush=True)
    return run_lib.EXIT_PREEMPTED
  return 0 if all(r.state == "done" for r in results) else EXIT_FAILED


if __name__ == "__main__":
  sys.exit(main())

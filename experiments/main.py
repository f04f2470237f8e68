"""Fine-tune with LoRA and/or full fine-tuning from an ml-collections config; ends in a report.

    python -m experiments.main --config experiments/configs/finetune.py:tiny --workdir runs/tiny \\
        [--config.optim.lr=1e-3] [--overwrite]

Each method in ``config.methods`` trains into ``WORKDIR/<method>`` through the same set-up, data, step, evaluation
and logging (``lora_jax.train``); rerunning the same command resumes from the newest checkpoints. ``WORKDIR`` holds
``config.json``, ``run_info.json`` and ``report.md``; each run dir holds ``metrics.jsonl``, TensorBoard events,
``summary.txt`` (what was adapted) and Orbax checkpoints (adapter-only for LoRA). Nothing is written before the
config, the model, the shardings and the data have been checked. SIGTERM (preemption) saves a checkpoint and stops
the whole experiment with exit status 143; the same command resumes it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import ml_collections
from absl import logging
from etils import epath

from experiments import overrides, rl_run
from experiments import run as run_lib
from lora_jax import distributed, train


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, ml_collections.ConfigDict]:
  """The command line's flags and its config: ``--config FILE[:ARG]`` built by the file's ``get_config(ARG)``, then
  every ``--config.KEY=VALUE`` applied (``overrides.apply``: typed by the field; a key that names no field is an
  error naming it)."""
  p = argparse.ArgumentParser(prog="python -m experiments.main", description=__doc__.splitlines()[0])
  p.add_argument("--config", required=True, metavar="FILE[:ARG]", help="config file and its get_config argument")
  p.add_argument("--workdir", required=True, help="directory for this experiment's runs and report")
  p.add_argument("--overwrite", action="store_true", help="delete a workdir that holds a run of a different config")
  p.add_argument("--coordinator_address", help="host:port of process 0 for a manual multi-process run (TPU pods "
                 "and tpu.gpu_launch need none)")
  p.add_argument("--num_processes", type=int, help="processes of a manual multi-process run")
  p.add_argument("--process_id", type=int, help="this process's index in a manual multi-process run")
  p.add_argument("--initialization_timeout", type=int, default=300, help="seconds a multi-process run waits for all "
                 "its processes before failing with the coordinator's address")
  args, extra = p.parse_known_args(argv)
  extra = [a for a in extra if a != "--"]
  bad = overrides.bad_syntax(extra)
  if bad:
    p.error(f"unrecognized arguments: {' '.join(bad)} (config overrides take the form --config.KEY=VALUE)")
  path, _, arg = args.config.partition(":")
  try:
    module = overrides.load_config_module(path)
    config = overrides.apply(module.get_config(arg) if arg else module.get_config(), extra)
  except ValueError as e:
    p.error(f"--config {args.config}: {e}")
  return args, config


def check_config(config: ml_collections.ConfigDict) -> None:
  """Checks a config before anything runs: ``rl_run``'s checks for an RL config (an ``rl`` section), else
  ``run``'s; raises ValueError naming the field."""
  (rl_run if "rl" in config else run_lib).check_config(config)


def run(config: ml_collections.ConfigDict, workdir: str | epath.PathLike, overwrite: bool = False) -> dict:
  """Runs a config into ``workdir``: policy-gradient RL (``rl_run.run``) for an RL config, else every method of
  ``config.methods`` (``run.run``); returns the report's summary on process 0."""
  return (rl_run if "rl" in config else run_lib).run(config, workdir, overwrite)


def main(argv: Sequence[str] | None = None) -> int:
  """``python -m experiments.main``; returns the exit status (143 after a preemption: rerun to resume)."""
  logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
  args, config = parse_args(sys.argv[1:] if argv is None else argv)
  distributed.initialize(args.coordinator_address, args.num_processes, args.process_id, args.initialization_timeout)
  try:
    run(config, args.workdir, args.overwrite)
  except train.Preempted as e:
    print(f"{e}; the remaining runs were not started. Rerun the same command to resume.", flush=True)
    return run_lib.EXIT_PREEMPTED
  return 0


if __name__ == "__main__":
  sys.exit(main())

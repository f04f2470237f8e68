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

import sys

import ml_collections
from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from experiments import rl_run
from experiments import run as run_lib
from lora_jax import distributed, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file[:arg].", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for this experiment's runs and report.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Delete a workdir that holds a run of a different config.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for a manual multi-process "
                                   "run (TPU pods and tpu.gpu_launch need none).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes of a manual multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in a manual multi-process run.")
_INIT_TIMEOUT = flags.DEFINE_integer("initialization_timeout", 300, "Seconds a multi-process run waits for all its "
                                     "processes before failing with the coordinator's address.")


def check_config(config: ml_collections.ConfigDict) -> None:
  """Checks a config before anything runs: ``rl_run``'s checks for an RL config (an ``rl`` section), else
  ``run``'s; raises ValueError naming the field."""
  (rl_run if "rl" in config else run_lib).check_config(config)


def run(config: ml_collections.ConfigDict, workdir: str | epath.PathLike, overwrite: bool = False) -> dict:
  """Runs a config into ``workdir``: policy-gradient RL (``rl_run.run``) for an RL config, else every method of
  ``config.methods`` (``run.run``); returns the report's summary on process 0."""
  return (rl_run if "rl" in config else run_lib).run(config, workdir, overwrite)


def main(argv):
  logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _WORKDIR.value is None:
    raise app.UsageError("--workdir is required")
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _INIT_TIMEOUT.value)
  try:
    run(_CONFIG.value, _WORKDIR.value, _OVERWRITE.value)
  except train.Preempted as e:
    print(f"{e}; the remaining runs were not started. Rerun the same command to resume.", flush=True)
    sys.exit(run_lib.EXIT_PREEMPTED)


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)

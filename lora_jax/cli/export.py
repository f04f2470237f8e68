"""``python -m lora_jax.cli.export``: export a trained run for serving, or check an adapter directory for vLLM.

    python -m lora_jax.cli.export --run RUN_DIR --out OUT --merged [--base MODEL_DIR_OR_ID [--force]]
    python -m lora_jax.cli.export --run RUN_DIR --out OUT --peft [--for-serving]
    python -m lora_jax.cli.export --check ADAPTER_DIR [--base MODEL_DIR_OR_ID]

The modes are ``lora_jax.export``'s (its docstring and docs/serving.md). Exit status: 0, 1 when ``--check`` finds a
problem, 2 when the run can't be exported (wrong base, unreadable checkpoint).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from lora_jax import checkpoint, hf, peft_io
from lora_jax.export import check_adapter, export_run


def _architecture(adapter_dir: pathlib.Path, base: str | None) -> str | None:
  """The base model's architecture: from --base, else from a local base_model_name_or_path, else unknown."""
  if base:
    return hf.load_config(base).architecture
  try:
    name = json.loads((adapter_dir / peft_io.PEFT_CONFIG_FILE).read_text()).get("base_model_name_or_path")
  except (OSError, ValueError):
    return None
  if name and (pathlib.Path(name) / "config.json").exists():
    return hf.load_config(name).architecture
  return None


def main(argv: list[str] | None = None) -> int:
  """Command line entry point; returns the exit status."""
  parser = argparse.ArgumentParser(prog="python -m lora_jax.cli.export",
                                   description=__doc__.split("\n\n")[0].strip('"'))
  parser.add_argument("--run", help="Run directory written by experiments.main (its checkpoints/ describe themselves).")
  parser.add_argument("--base", help="Base model: local HF directory or hub id (default: the one the run recorded).")
  parser.add_argument("--out", help="Output directory.")
  mode = parser.add_mutually_exclusive_group()
  mode.add_argument("--merged", action="store_true", help="Write an HF model with the adapters merged in.")
  mode.add_argument("--peft", action="store_true", help="Write a PEFT LoRA adapter directory.")
  mode.add_argument("--check", metavar="ADAPTER_DIR", help="Check an adapter directory for vLLM.")
  parser.add_argument("--force", action="store_true",
                      help="Apply the run's adapters to a --base whose weights differ from the recorded one.")
  parser.add_argument("--for-serving", action="store_true",
                      help="With --peft: fold scales into B, pad ranks to a vLLM rank, drop patterns and rsLoRA.")
  args = parser.parse_args(argv)

  if args.check:
    adapter_dir = pathlib.Path(args.check)
    architecture = _architecture(adapter_dir, args.base)
    problems = check_adapter(adapter_dir, architecture)
    for p in problems:
      print(f"PROBLEM: {p}")
    if problems:
      print(f"{adapter_dir}: {len(problems)} problem(s) for vLLM")
      return 1
    with open(adapter_dir / peft_io.PEFT_CONFIG_FILE) as f:
      r = json.load(f)["r"]
    print(f"{adapter_dir}: OK for vLLM ({architecture or 'architecture not checked'}); serve with "
          f"--enable-lora --max-lora-rank {r} or more")
    return 0
  if not (args.merged or args.peft):
    parser.error("choose one of --merged, --peft or --check")
  if args.for_serving and not args.peft:
    parser.error("--for-serving goes with --peft")
  missing = [f"--{k}" for k in ("run", "out") if not getattr(args, k)]
  if missing:
    parser.error(f"{', '.join(missing)} required with --merged/--peft")
  try:
    print(export_run(args.run, args.base, args.out, merged=args.merged, for_serving=args.for_serving,
                     force=args.force))
  except (checkpoint.BaseMismatch, checkpoint.CheckpointError, FileNotFoundError) as err:
    print(f"error: {err}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())

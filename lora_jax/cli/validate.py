"""``python -m lora_jax.cli.validate``: check training data before a run (``lora_jax.data.validate``): bad records
with file:line, token counts, packed rows, steps and epochs.

    python -m lora_jax.cli.validate --data train.jsonl:0.7 extra.jsonl:0.3 --tokenizer DIR --seq-len 2048 \\
        --batch-size 16 --steps 1000
    python -m lora_jax.cli.validate --config experiments/configs/finetune.py:tiny

Exits with status 1 when any record is bad (the run would stop on it), 0 otherwise.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from collections.abc import Sequence

from lora_jax import synthetic
from lora_jax.data.validate import format_report, validate


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point."""
  parser = argparse.ArgumentParser(prog="python -m lora_jax.cli.validate",
                                   description="Check training data before a run: bad records with file:line, "
                                   "token counts, packed rows, steps and epochs.")
  parser.add_argument("--config", help="experiment config FILE[:ARG]: take data, tokenizer, lengths and steps from it")
  parser.add_argument("--data", nargs="+", help="FILE[:weight] (jsonl, json, parquet or hub name)")
  parser.add_argument("--tokenizer", help="tokenizer directory or hub name")
  parser.add_argument("--seq-len", type=int, help="positions per packed row")
  parser.add_argument("--batch-size", type=int, help="rows per step (global)")
  parser.add_argument("--steps", type=int, help="planned training steps, to report epochs")
  parser.add_argument("--format", default="auto", help="auto, chat, alpaca or text")
  parser.add_argument("--template", default="alpaca", help="Alpaca prompt template name or .json file")
  parser.add_argument("--train-on-inputs", action="store_true", help="loss on prompt tokens too")
  parser.add_argument("--no-packing", action="store_true", help="one example per row")
  parser.add_argument("--overflow", choices=("error", "skip"),
                      help="a prompt too long for seq_len: a problem (error, the default) or skipped and counted")
  parser.add_argument("--json", action="store_true", help="print the report as JSON")
  args = parser.parse_args(argv)
  if args.config:
    _from_config(args, parser)
  missing = [f"--{k.replace('_', '-')}" for k in ("data", "tokenizer", "seq_len", "batch_size")
             if getattr(args, k) is None]
  if missing:
    parser.error(f"give --config, or all of {', '.join(missing)}")
  if isinstance(args.tokenizer, str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
  else:
    tokenizer = args.tokenizer
  report = validate(args.data, tokenizer, args.seq_len, args.batch_size, steps=args.steps, fmt=args.format,
                    template=args.template, train_on_inputs=args.train_on_inputs, packing=not args.no_packing,
                    overflow=args.overflow or "error")
  print(json.dumps(report, indent=1) if args.json else format_report(report))
  return 1 if report["errors"] else 0


def _from_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
  """Fills the data arguments from an experiment config file's ``get_config(arg)`` (explicit flags still win)."""
  path, _, arg = args.config.partition(":")
  if not os.path.isfile(path):
    parser.error(f"--config: no such file {path}")
  module_spec = importlib.util.spec_from_file_location("experiment_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(arg) if arg else module.get_config()
  d = config.data
  args.data = args.data or [synthetic.materialize(s, n=d.synthetic_examples, seed=d.synthetic_seed,
                                                  max_operand=d.get("synthetic_max_operand", 99),
                                                  cache_dir=d.cache_dir) for s in d.train]
  if args.tokenizer is None:
    args.tokenizer = synthetic.char_tokenizer() if config.model.name == "tiny" else config.model.name
  args.seq_len = args.seq_len or d.seq_len
  args.batch_size = args.batch_size or d.batch_size
  args.steps = args.steps or config.train.steps
  args.template, args.train_on_inputs, args.no_packing = d.template, d.train_on_inputs, not d.packing
  args.overflow = args.overflow or d.overflow


if __name__ == "__main__":
  sys.exit(main())

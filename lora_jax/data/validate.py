"""Check training data before a run: bad records with file:line, token counts, packed rows, steps and epochs.

    python -m lora_jax.data.validate --data train.jsonl:0.7 extra.jsonl:0.3 --tokenizer DIR --seq-len 2048 \\
        --batch-size 16 --steps 1000

Exits with status 1 when any record is bad (the run would stop on it), 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from lora_jax.data.dataset import tokenize
from lora_jax.data.formats import DataError, check_tokenizer, resolve_template
from lora_jax.data.pack import BatchIterator
from lora_jax.data.sources import Source, parse_sources

_COUNTS = ("records", "examples", "bad", "skipped", "truncated", "empty", "tokens", "loss_tokens")


def validate(paths: Sequence[str | Source], tokenizer, seq_len: int, batch_size: int, *, steps: int | None = None,
             fmt: str = "auto", template: str = "alpaca", train_on_inputs: bool = False, packing: bool = True,
             overflow: str = "error", seed: int = 0) -> dict[str, Any]:
  """Read, check and tokenise every source as training would; report problems and the numbers of a run."""
  errors: list[str] = []
  report: dict[str, Any] = {"errors": errors, "sources": [], "seq_len": seq_len, "batch_size": batch_size}
  try:
    sources = parse_sources(paths)
    check_tokenizer(tokenizer)
    resolve_template(template)
  except DataError as e:
    errors.append(str(e))
    return report
  tokenized = []
  for source in sources:
    try:
      result = tokenize(source, tokenizer, max_len=seq_len + 1, fmt=fmt, template=template,
                        train_on_inputs=train_on_inputs, overflow=overflow, problems=errors)
    except DataError as e:  # the whole source is unusable (missing file, no records)
      errors.append(str(e))
      continue
    tokenized.append(result)
    report["sources"].append({"path": source.path, "weight": source.weight, **result.stats})
  for key in _COUNTS:
    report[key] = sum(s[key] for s in report["sources"])
  usable = [s for s in tokenized if len(s)]
  if not usable:
    return report
  iterator = BatchIterator(usable, batch_size=batch_size, seq_len=seq_len, seed=seed, packing=packing,
                           drop_remainder=False)
  plan = iterator.plan(0)
  rows = len(plan.row_starts) - 1
  steps_per_epoch = rows // batch_size
  report.update(rows=rows, fill=int(plan.lengths.sum()) / max(rows * seq_len, 1), steps_per_epoch=steps_per_epoch,
                tokens_per_step=batch_size * seq_len)
  if not steps_per_epoch:
    errors.append(f"the data fills {rows} rows of {seq_len} positions, fewer than one batch of {batch_size}")
  if steps is not None:
    report.update(steps=steps, epochs=steps / steps_per_epoch if steps_per_epoch else float("inf"))
  return report


def format_report(report: dict[str, Any], max_errors: int = 20) -> str:
  """The report as text for a terminal."""
  lines = []
  for s in report["sources"]:
    weight = "" if s["weight"] is None else f" weight {s['weight']:g}"
    lines.append(f"{s['path']} ({s['format']}{weight}): {s['records']} records, {s['examples']} examples, "
                 f"{s['bad']} bad, {s['skipped']} prompts too long, {s['truncated']} truncated, "
                 f"{s['empty']} empty; {s['tokens']} tokens, {s['loss_tokens']} loss-bearing")
  errors = report["errors"]
  if errors:
    lines.append(f"{len(errors)} problem(s):")
    lines += [f"  {e}" for e in errors[:max_errors]]
    if len(errors) > max_errors:
      lines.append(f"  ... and {len(errors) - max_errors} more")
  if "tokens" in report:
    lines.append(f"total: {report['examples']} examples, {report['tokens']} tokens, "
                 f"{report['loss_tokens']} loss-bearing")
  if "rows" in report:
    lines.append(f"{report['rows']} rows of seq_len {report['seq_len']} per epoch ({100 * report['fill']:.1f}% "
                 f"filled); batch {report['batch_size']}: {report['steps_per_epoch']} steps per epoch, "
                 f"{report['tokens_per_step']} token slots per step")
  if "steps" in report:
    lines.append(f"{report['steps']} steps = {report['epochs']:.2f} epochs")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point."""
  parser = argparse.ArgumentParser(prog="python -m lora_jax.data.validate", description=__doc__.split("\n")[0])
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
  import importlib.util

  from lora_jax import synthetic

  path, _, arg = args.config.partition(":")
  if not os.path.isfile(path):
    parser.error(f"--config: no such file {path}")
  module_spec = importlib.util.spec_from_file_location("experiment_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(arg) if arg else module.get_config()
  d = config.data
  args.data = args.data or [synthetic.materialize(s, n=d.synthetic_examples, seed=d.synthetic_seed,
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

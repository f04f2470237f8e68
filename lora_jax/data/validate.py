"""Check training data before a run: bad records with file:line, token counts, packed rows, steps and epochs
(``validate``; the command line is ``lora_jax.cli.validate``)."""

from __future__ import annotations

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


if __name__ == "__main__":  # the command line moved: say where, rather than run nothing and exit 0
  raise SystemExit("python -m lora_jax.data.validate moved: run python -m lora_jax.cli.validate")

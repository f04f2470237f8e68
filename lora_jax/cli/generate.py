"""``python -m lora_jax.cli.generate``: generate from a base model with optional LoRA adapters (alpaca-lora's
``generate.py``, for this library).

    python -m lora_jax.cli.generate --model DIR_OR_HUB_ID [--adapter PEFT_OR_RUN_DIR ...] --prompt "2+2=" \\
        [--temperature 0.7]

A run directory records its base (``--model`` may then be left out); several ``--adapter`` answer every prompt under
each, in one batch (per-row adapters).
"""

from __future__ import annotations

import argparse
import functools
import pathlib
from collections.abc import Sequence

import jax

from lora_jax import checkpoint, hf, lora, model_lora, peft_io
from lora_jax.generate import SamplingConfig, generate_text
from lora_jax.models import transformer


def main(argv=None):
  """CLI: generate from a base model (an HF directory or hub id) with optional LoRA adapters."""
  from transformers import AutoTokenizer

  p = argparse.ArgumentParser(prog="python -m lora_jax.cli.generate",
                              description="Generate text with a base model and optional LoRA adapters.")
  p.add_argument("--model", help="Hugging Face directory or hub id of the base model (default with a run "
                 "directory: the base it recorded)")
  p.add_argument("--adapter", action="append", default=[],
                 help="a PEFT adapter directory, or a LoRA run directory (WORKDIR/lora) whose newest checkpoint to "
                 "use; repeat it to answer every prompt under each adapter, all in one batch")
  p.add_argument("--force", action="store_true", help="apply a run's adapters to a --model whose weights differ "
                 "from the base the run recorded")
  p.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
  p.add_argument("--max-new-tokens", type=int, default=64)
  p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  p.add_argument("--top-p", type=float, default=1.0)
  p.add_argument("--top-k", type=int, default=0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                 help="apply the tokenizer's chat template (default: when it has one)")
  args = p.parse_args(argv)
  try:
    model_name, config, params, adapters = _load_adapters(args.adapter, args.model, args.force)
  except (checkpoint.BaseMismatch, checkpoint.CheckpointError, FileNotFoundError, ValueError) as err:
    raise SystemExit(f"error: {err}") from None
  if model_name is None:
    p.error("--model is required (unless --adapter is a run directory, which records its base)")
  model = transformer.CausalLM(config)
  tokenizer = AutoTokenizer.from_pretrained(str(hf.resolve_checkpoint(model_name)))
  chat = bool(tokenizer.chat_template) if args.chat is None else args.chat
  n = max(1, len(args.adapter))
  if n > 1:  # every prompt under every adapter, in one batch: row i uses adapter rows[i]
    adapters = lora.stack_adapters(adapters)
  prompts = [prompt for _ in range(n) for prompt in args.prompt]
  texts = generate_text(model, params, adapters, tokenizer, prompts, max_new_tokens=args.max_new_tokens,
                        init_cache=functools.partial(transformer.init_cache, config), chat=chat,
                        sampling=SamplingConfig(args.temperature, args.top_k, args.top_p),
                        rng=jax.random.key(args.seed),
                        rows=[k for k in range(n) for _ in args.prompt] if n > 1 else None)
  for i, (prompt, text) in enumerate(zip(prompts, texts)):
    where = f" [{args.adapter[i // len(args.prompt)]}]" if n > 1 else ""
    print(f"###{where} {prompt}\n{text}")


def _load_adapters(adapter_dirs: Sequence[str], model: str | None, force: bool):
  """``(base name, config, params, adapters)`` for the CLI: the base once, then each adapter on it (one tree, or a
  list of trees for several). A run directory records its base; every further run must record the same weights
  (fingerprint) unless ``force``."""
  peft = [bool(d) and (pathlib.Path(d) / peft_io.PEFT_CONFIG_FILE).exists() for d in adapter_dirs]
  first_run = next((i for i, is_peft in enumerate(peft) if not is_peft), None)
  trees, record = {}, None
  if first_run is not None:  # a run directory of experiments.main: its checkpoint names its base
    config, params, trees[first_run], record = checkpoint.load_trained(adapter_dirs[first_run], model, force=force)
    model = model or record["base_model"]
  elif model is None:
    return None, None, None, None
  else:
    config, params = hf.load(model)
  layouts = model_lora.layouts(config)
  for i, d in enumerate(adapter_dirs):
    if i in trees:
      continue
    if peft[i]:
      trees[i], _ = peft_io.load_peft(d, params, config, layouts)
      continue
    run = checkpoint.open_run(d)
    try:
      if run.record.get("base_fingerprint") != record["base_fingerprint"] and not force:
        raise checkpoint.BaseMismatch(f"run {d} was trained on {run.record.get('base_model')} (fingerprint "
                              f"{run.record.get('base_fingerprint')}), not on the base of {adapter_dirs[first_run]} "
                              f"({record['base_fingerprint']}); answer them in separate calls, or --force")
      _, trees[i] = checkpoint.restore_trained(run, params, layouts)
    finally:
      run.checkpointer.close()
  for i, d in enumerate(adapter_dirs if len(adapter_dirs) > 1 else ()):
    if not lora.adapter_items(trees[i]):
      raise ValueError(f"{d} holds no LoRA adapters (a full fine-tuning run?): give its merged model as --model")
  adapters = [trees[i] for i in range(len(adapter_dirs))]
  return model, config, params, adapters[0] if len(adapters) == 1 else adapters if adapters else {}


if __name__ == "__main__":
  main()

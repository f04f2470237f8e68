"""Export a trained run for serving, and check adapter directories the way vLLM loads them.

    python -m lora_jax.cli.export --run RUN_DIR --out OUT --merged [--base MODEL_DIR_OR_ID [--force]]
    python -m lora_jax.cli.export --run RUN_DIR --out OUT --peft [--for-serving]
    python -m lora_jax.cli.export --check ADAPTER_DIR [--base MODEL_DIR_OR_ID]

`--merged` writes an HF model directory with W + s·A·B folded into the weights (plus the base's tokenizer);
`--peft` writes a PEFT LoRA directory (`peft_io.save_peft`), `--for-serving` one that vLLM and SGLang compute exactly
(scales folded into B, ranks zero-padded to a vLLM rank, no patterns). `--check` lists every reason vLLM would
refuse an adapter or compute a different function from it, and exits 1 if there is one. RUN_DIR is a run written
by `experiments.main` (or its `checkpoints/`): its checkpoint records the base model (path or hub id, and a
fingerprint: another `--base` is refused unless `--force`), the layout and the LoRA spec. A tied model's output-side
(`unembed`) adapter is merged into an untied model with its own `lm_head`. See docs/serving.md.
"""

from __future__ import annotations

import json
import pathlib
import re

from lora_jax import checkpoint, hf, lora, model_lora, peft_io

_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
_EMBEDDINGS = ("embed_tokens", "lm_head")
# HF module leaf names vLLM has LoRA layers for, per architecture (its packed modules qkv_proj and gate_up_proj
# unpacked to the HF names); MoE experts are named `experts.{e}.{gate,up,down}_proj`.
VLLM_MODULES = {
    "llama": _ATTENTION + _MLP + _EMBEDDINGS,
    "mistral": _ATTENTION + _MLP + _EMBEDDINGS,
    "qwen3": _ATTENTION + _MLP + _EMBEDDINGS,
    "qwen3_moe": _ATTENTION + _MLP + _EMBEDDINGS,
}
_EXPERT_MODULE = re.compile(r"experts\.\d+\.(gate_proj|up_proj|down_proj)")


def export_run(run_dir: str | pathlib.Path, base: str | None, out: str | pathlib.Path, merged: bool,
               for_serving: bool = False, force: bool = False) -> str:
  """Writes a run's trained adapters as a merged HF model (`merged`) or a PEFT directory; returns a summary line.

  The base is the one the run recorded unless `base` names another (checked by fingerprint; `force` overrides).
  """
  out = pathlib.Path(out)
  config, params, adapters, record = checkpoint.load_trained(run_dir, base, force=force)
  base_name = str(base) if base else record["base_model"]
  if merged:
    # A tied model's unembed adapter is on the output side only: written as an untied model with its own lm_head.
    untied = config.tie_word_embeddings and any(ad.layout.tied for _, ad in lora.adapter_items(adapters))
    if untied:
      config, params, adapters = model_lora.untie_embeddings(config, params, adapters)
    params, errors = lora.merge(params, adapters)
    hf.save_params(params, config, out)
    tokenizer = _copy_tokenizer(hf.resolve_checkpoint(base_name), out)
    worst = max((float(e) for e in errors.values()), default=0.0)
    return (f"merged {len(errors)} adapters into {out} ({config.param_dtype}, largest rounding error {worst:.3g})"
            + ("; untied the embeddings (the output head has its own adapter)" if untied else "")
            + ("" if tokenizer else "; the base has no tokenizer, none copied"))
  spec = lora.LoraSpec.from_dict(record["lora_spec"])
  peft_io.save_peft(config, adapters, spec, out, base_name, for_serving=for_serving)
  with open(out / peft_io.PEFT_CONFIG_FILE) as f:
    r = json.load(f)["r"]
  return f"wrote the PEFT adapter {out} (r={r}{', for serving' if for_serving else ''})"


def _copy_tokenizer(root: pathlib.Path, out: pathlib.Path) -> bool:
  from transformers import AutoTokenizer

  try:
    tokenizer = AutoTokenizer.from_pretrained(str(root))
  except (OSError, ValueError, TypeError):
    return False
  tokenizer.save_pretrained(str(out))
  return True


def check_adapter(adapter_dir: str | pathlib.Path, architecture: str | None = None) -> list[str]:
  """Every reason vLLM would refuse this PEFT adapter or serve a different function from it (empty when clean)."""
  try:
    config, tensors = peft_io.read_peft(adapter_dir)
  except (FileNotFoundError, ValueError) as err:
    return [str(err)]
  problems = []
  if config.get("peft_type") != "LORA":
    problems.append(f"peft_type is {config.get('peft_type')!r}: vLLM serves LORA adapters only")
  r = config.get("r")
  if not isinstance(r, int) or r not in peft_io.VLLM_RANKS:
    problems.append(f"r={r!r} is not a rank vLLM accepts {peft_io.VLLM_RANKS}; re-export with --for-serving, which "
                    "zero-pads to the next one")
  if config.get("use_dora"):
    problems.append("use_dora=true: vLLM does not serve DoRA")
  if config.get("modules_to_save"):
    problems.append(f"modules_to_save={config['modules_to_save']}: vLLM refuses fully trained modules; merge them")
  for field in ("rank_pattern", "alpha_pattern"):
    if config.get(field):
      problems.append(f"{field}={config[field]}: vLLM ignores it and scales every module by lora_alpha/r, a "
                      "different function; re-export with --for-serving, which folds the scales into B")
  if config.get("bias", "none") != "none" or config.get("lora_bias"):
    problems.append(f"bias={config.get('bias')!r}, lora_bias={config.get('lora_bias', False)!r}: vLLM serves "
                    "bias-free LoRA only")
  if config.get("target_parameters"):
    problems.append(f"target_parameters={config['target_parameters']}: fused-parameter LoRA (PEFT's layout for "
                    "transformers 5 MoE experts); vLLM expects one module per expert (experts.{e}.gate_proj)")

  known = VLLM_MODULES.get(architecture) if architecture else sorted({m for v in VLLM_MODULES.values() for m in v})
  if architecture and known is None:
    problems.append(f"architecture {architecture!r}: no vLLM module list known here; supported: "
                    f"{sorted(VLLM_MODULES)}")
    known = ()
  moe = architecture in (None, "qwen3_moe")

  def unknown(name: str) -> bool:
    if ".experts." in name or name.startswith("experts."):
      return not (moe and _EXPERT_MODULE.fullmatch(name[name.index("experts."):]))
    return name.rsplit(".", 1)[-1] not in known

  targets = config.get("target_modules")
  if isinstance(targets, list):
    bad = sorted(t for t in targets if t.rsplit(".", 1)[-1] not in known)
    if bad:
      problems.append(f"target_modules {bad}: not a module vLLM has LoRA for "
                      f"({architecture or 'any supported architecture'}: {list(known)})")
  modules, parse_problems = peft_io.peft_modules(tensors)
  problems += parse_problems
  odd = sorted((n for n in modules if unknown(n)), key=_natural_key)
  if odd:
    problems.append(f"{len(odd)} LoRA modules vLLM does not know for {architecture or 'these architectures'}: "
                    f"{odd[:5]}{' ...' if len(odd) > 5 else ''}")
  ranks = {n: m["a"].shape[0] for n, m in modules.items() if "a" in m}
  off = sorted((n for n, rank in ranks.items() if rank != r), key=_natural_key)
  if off and isinstance(r, int):
    problems.append(f"{len(off)} modules have tensors of another rank than r={r} (e.g. {off[0]}: rank "
                    f"{ranks[off[0]]}): vLLM scales them by lora_alpha/r of the global r")
  if not modules:
    problems.append("no LoRA tensors in the adapter")
  return problems


def _natural_key(name: str):
  return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", name)]


if __name__ == "__main__":  # the command line moved: say where, rather than run nothing and exit 0
  raise SystemExit("python -m lora_jax.export moved: run python -m lora_jax.cli.export")

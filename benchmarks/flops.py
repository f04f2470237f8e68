"""FLOPs of one training step (forward, backward, Adam update), LoRA vs full fine-tuning, counted by XLA.

    python -m benchmarks.flops [--hidden 1024 --layers 4 --seq 512 --batch 4 --vocab 32000 --rank 16]

Compiles (never runs) three train steps on a Llama-shaped model from ``lora_jax.models`` and prints XLA's
``cost_analysis()`` FLOPs and the optimizer-state bytes of each:

- full fine-tuning: gradient and Adam over every parameter;
- LoRA (this library): x·W + s·(x·A)·B, gradient and Adam over A, B only;
- naive merged LoRA: x·(W + s·A·B), the densifying implementation, for comparison.

The study's estimate per adapted N×N matrix is (2N² + 6NR) / 3N² = 2/3 + 2R/N; attention scores and the
unembedding cost the same in both (the unembedding's weight gradient is skipped by LoRA too). Results are written
to ``benchmarks/results/flops.json``; the last printed line is ``lora/full flops ratio: X``.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import jax
import jax.numpy as jnp
import optax

from lora_jax import lora
from lora_jax.models import transformer

RESULTS = pathlib.Path(__file__).parent / "results" / "flops.json"


def llama_shaped(hidden: int, layers: int, vocab: int) -> transformer.ModelConfig:
  """A Llama-3-style config (4x MLP, GQA with 4 query heads per KV head, head_dim 64) of the given size."""
  heads = max(1, hidden // 64)
  return transformer.ModelConfig(
      architecture="llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_layers=layers,
      num_heads=heads, num_kv_heads=max(1, heads // 4), head_dim=hidden // heads, rope_theta=500000.0)


def _xent(logits, tokens):
  logp = jax.nn.log_softmax(logits[:, :-1])
  return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


def _compiled(step, *args):
  compiled = jax.jit(step).lower(*args).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


def _nbytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


def measure(config: transformer.ModelConfig, batch: int, seq: int, rank: int,
            targets: tuple[str, ...] = ("attention", "mlp")) -> dict:
  """Compiles the three train steps from abstract shapes and returns their FLOPs and optimizer-state bytes."""
  model = transformer.CausalLM(config)
  params = transformer.abstract_params(config)
  tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
  tx = optax.adam(1e-4)
  spec = lora.LoraSpec(rank=rank, targets=targets)
  _, adapters = jax.eval_shape(lambda p: lora.create(p, spec, jax.random.key(0)), params)

  def full_step(params, opt_state, tokens):
    grads = jax.grad(lambda p: _xent(model.apply({"params": p}, tokens), tokens))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  lora_tx = lora.optimizer(tx)
  trainable, frozen = jax.eval_shape(lambda p, a: lora.split(p, a, spec), params, adapters)

  def lora_step(trainable, frozen, opt_state, tokens):
    def loss(tr):
      p, a = lora.combine(tr, frozen)
      return _xent(lora.apply(model, p, a, tokens), tokens)

    grads = jax.grad(loss)(trainable)
    updates, opt_state = lora_tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state

  def merged_step(trainable, frozen, opt_state, tokens):
    def loss(tr):
      p, a = lora.combine(tr, frozen)
      merged, _ = lora.merge(p, a)
      return _xent(model.apply({"params": merged}, tokens), tokens)

    grads = jax.grad(loss)(trainable)
    updates, opt_state = lora_tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state

  full_opt = jax.eval_shape(tx.init, params)
  lora_opt = jax.eval_shape(lora_tx.init, trainable)
  result = {
      "shape": {"hidden": config.hidden_size, "layers": config.num_layers, "intermediate": config.intermediate_size,
                "vocab": config.vocab_size, "batch": batch, "seq": seq, "rank": rank, "targets": list(targets)},
      "params": sum(x.size for x in jax.tree.leaves(params)),
      "lora_params": lora.count(adapters),
      "full_flops": _compiled(full_step, params, full_opt, tokens),
      "lora_flops": _compiled(lora_step, trainable, frozen, lora_opt, tokens),
      "merged_lora_flops": _compiled(merged_step, trainable, frozen, lora_opt, tokens),
      "full_opt_state_bytes": _nbytes(full_opt),
      "lora_opt_state_bytes": _nbytes(lora_opt),
  }
  result["lora_ratio"] = result["lora_flops"] / result["full_flops"]
  result["merged_ratio"] = result["merged_lora_flops"] / result["full_flops"]
  result["study_estimate"] = 2 / 3 + 2 * rank / config.hidden_size
  return result


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--hidden", type=int, default=1024)
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--seq", type=int, default=512)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--vocab", type=int, default=32000)
  parser.add_argument("--rank", type=int, default=16)
  parser.add_argument("--out", type=pathlib.Path, default=RESULTS, help="JSON file to record the figures in")
  args = parser.parse_args(argv)
  r = measure(llama_shaped(args.hidden, args.layers, args.vocab), args.batch, args.seq, args.rank)
  s = r["shape"]
  print(f"model: hidden {s['hidden']}, {s['layers']} layers, mlp {s['intermediate']}, vocab {s['vocab']}, "
        f"batch {s['batch']} x seq {s['seq']}; LoRA rank {s['rank']} on {', '.join(s['targets'])}")
  print(f"params: {r['params']:,}; LoRA params: {r['lora_params']:,} ({100 * r['lora_params'] / r['params']:.2f}%)")
  print(f"{'train step':<28}{'XLA flops':>16}{'vs full':>10}{'optimizer state':>18}")
  print(f"{'full fine-tuning':<28}{r['full_flops']:>16.4e}{1.0:>10.3f}{r['full_opt_state_bytes'] / 2**20:>14.1f} MiB")
  print(f"{'LoRA (factored, lora_jax)':<28}{r['lora_flops']:>16.4e}{r['lora_ratio']:>10.3f}"
        f"{r['lora_opt_state_bytes'] / 2**20:>14.1f} MiB")
  print(f"{'LoRA (naive merged W+sAB)':<28}{r['merged_lora_flops']:>16.4e}{r['merged_ratio']:>10.3f}"
        f"{r['lora_opt_state_bytes'] / 2**20:>14.1f} MiB")
  print(f"study's per-matrix estimate 2/3 + 2r/N: {r['study_estimate']:.3f}")
  if args.out is not None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(r, indent=2) + "\n")
    print(f"recorded in {args.out}")
  print(f"lora/full flops ratio: {r['lora_ratio']:.4f}")


if __name__ == "__main__":
  main()

"""benchmarks.fit plans per-device memory from abstract shapes: sharding must shrink the per-device arguments."""

import json
import subprocess
import sys

import pytest

from benchmarks import fit


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  transformers = pytest.importorskip("transformers")
  path = tmp_path_factory.mktemp("tiny")
  transformers.LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                           architectures=["LlamaForCausalLM"]).save_pretrained(path)
  return path


def test_plan_on_one_device_counts_the_whole_state(tiny_dir):
  import jax

  lora = fit.plan(str(tiny_dir), "lora", 8, 4, 64, {"fsdp": 1}, jax.devices()[:1])
  full = fit.plan(str(tiny_dir), "full", 8, 4, 64, {"fsdp": 1}, jax.devices()[:1])
  assert lora["trainable"] < full["trainable"] == full["params"]
  # Full FT carries fp32 weights and two Adam moments of everything: at least 3 x 4 bytes per parameter.
  assert full["arguments"] >= 12 * full["params"] > lora["arguments"]
  assert lora["total"] > 0 and full["total"] > lora["total"]


def test_qlora_plans_a_quarter_of_the_linear_layers_bytes(tiny_dir):
  """--method qlora: the frozen base's linear kernels as NF4 (4 bits a value plus ~0.13 of scales) in the step's
  arguments; the embedding, the head and the norms stay bf16."""
  import jax

  lora = fit.plan(str(tiny_dir), "lora", 8, 4, 64, {"fsdp": 1}, jax.devices()[:1])
  qlora = fit.plan(str(tiny_dir), "qlora", 8, 4, 64, {"fsdp": 1}, jax.devices()[:1])
  linear = 2 * (4 * 128 * 128 - 2 * 128 * 64 + 3 * 128 * 256)  # q, o (k, v are 64 wide), gate, up, down per layer
  saved = lora["frozen_bytes"] - qlora["frozen_bytes"]
  assert saved == pytest.approx(linear * (2 - 0.5 - 1 / 64 - 4 / 64 / 256), abs=8 * 2 * 7)  # bf16 -> NF4 + scales
  assert qlora["trainable"] == lora["trainable"]
  assert lora["arguments"] - qlora["arguments"] == pytest.approx(saved, rel=0.01)


@pytest.mark.slow
def test_cli_on_eight_fake_devices_shards_the_arguments(tiny_dir):
  def run(devices, mesh):
    out = subprocess.run([sys.executable, "-m", "benchmarks.fit", "--model", str(tiny_dir), "--method", "full",
                          "--devices", str(devices), "--mesh", mesh, "--batch", "8", "--seq", "64"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    line = next(l for l in out.splitlines() if l.strip().startswith("arguments"))
    return float(line.split()[1]), out

  one, _ = run(1, "fsdp=1")
  eight, out = run(8, "fsdp=4,tensor=2")
  assert "on 8 cpu devices" in out and "fits in 16 GiB: yes" in out
  assert eight < one / 4  # weights and optimizer state are split over the devices
  bad = subprocess.run([sys.executable, "-m", "benchmarks.fit", "--model", str(tiny_dir), "--devices", "8",
                        "--mesh", "fsdp=8", "--batch", "4"], capture_output=True, text=True, timeout=300)
  assert bad.returncode != 0 and "--batch 4 is not divisible by the data x fsdp mesh size 8" in bad.stderr


@pytest.mark.slow
def test_chunked_loss_and_remat_policies_change_the_planned_temporaries(tmp_path):
  import jax

  transformers = pytest.importorskip("transformers")
  transformers.LlamaConfig(vocab_size=8192, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                           architectures=["LlamaForCausalLM"]).save_pretrained(tmp_path)

  def temporaries(**how):
    return fit.plan(str(tmp_path), "lora", 8, 4, 256, {"fsdp": 1}, jax.devices()[:1], **how)["temporaries"]

  full_logits = temporaries(loss_chunk_size=0, remat="full")
  chunked = temporaries(loss_chunk_size=32, remat="full")
  # Float32 logits of 4 x 256 tokens over 8192 words are 32 MiB (and their gradient as much); chunks of 32
  # positions are 4 MiB. Measured on XLA:CPU: 120 MiB of temporaries become 26 MiB.
  assert chunked < full_logits - 2 * 2**25
  assert temporaries(loss_chunk_size=32, remat="none") > chunked  # every layer's activations kept
  with pytest.raises(SystemExit, match="does not compile for cpu"):
    fit.plan(str(tmp_path), "lora", 8, 4, 256, {"fsdp": 1}, jax.devices()[:1], attention="splash")


def test_table_markdown_lists_cached_cases_in_order(tmp_path):
  gib = fit.GIB
  first, second = fit.table_cases()[:2]
  cache = tmp_path / "cases.json"
  cache.write_text(json.dumps({
      fit._key(second): {"attention": "splash", "arguments": 0.5 * gib, "temporaries": 1.5 * gib, "total": 2 * gib},
      fit._key(first): {"attention": "xla", "arguments": float("nan"), "temporaries": 20 * gib,
                        "total": float("inf"), "oom": "RESOURCE_EXHAUSTED"}}))
  rows = fit.table_markdown(cache, 16, 16.0).splitlines()[2:]
  assert rows == [
      f"| {first['model']} | LoRA r=16 | 8 | 32 x 1024 | before | xla | - | 20.00 | - | no (compiler: 20.0 GiB of "
      "temporaries) |",
      f"| {second['model']} | LoRA r=16 | 8 | 32 x 1024 | after | splash | 0.50 | 1.50 | 2.00 | yes |"]


def test_only_filters_choose_and_order_the_table_cases():
  cases = fit.table_cases()
  chosen = fit.select_cases(cases, ["method=full,devices=8", "batch=128"])
  assert [(c["method"], c["devices"]) for c in chosen[:3]] == [("full", 8)] * 3
  assert {c["model"] for c in chosen[:3]} == set(fit.TABLE_MODELS)
  assert chosen[3:] and all(c["batch"] == 128 for c in chosen[3:])
  everything = fit.select_cases(cases, ["method=full,devices=8", ""])  # the chosen first, then all the rest once
  assert everything[:3] == chosen[:3] and sorted(map(fit._key, everything)) == sorted(map(fit._key, cases))
  assert fit.select_cases(cases, []) == cases
  with pytest.raises(SystemExit, match="no case field \\['chips'\\]"):
    fit.select_cases(cases, ["chips=8"])

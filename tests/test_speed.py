"""The speed benchmarks and the GPU check: their CPU dry run end to end (so the GPU script cannot rot), and the figures
they derive (MFU, goals, ratios, the bf16 comparison). No timing is asserted: speed is recorded, not tested."""

import json
import math
import pathlib
import subprocess
import sys

import pytest

from benchmarks import bf16_check, speed

ROOT = pathlib.Path(__file__).parent.parent


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("gpu_check")
  proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", str(out), "--dry-run"], cwd=ROOT, capture_output=True,
                        text=True, timeout=900, env={**__import__("os").environ, "PYTHON": sys.executable})
  return out, proc


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_step_on_cpu(dry_run):
  out, proc = dry_run
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  log = (out / "log.txt").read_text()
  for name in ("speed", "bf16_check", "tiny_experiment", "mfu"):
    assert f"== {name}: " in log
  assert "MFU tiny lora_jax LoRA r16: " in log and "of the measured float32 matmul peak" in log
  assert "bf16 vs fp32: max relative gap of 10-step loss means" in log and ": PASS" in log
  assert (out / "tiny" / "report.md").exists() and (out / "tiny" / "lora" / "metrics.jsonl").exists()
  results = (out / "RESULTS.md").read_text()
  assert "## Training speed" in results and "## bf16 compute vs fp32" in results


@pytest.mark.slow
def test_speed_compares_every_variant_on_the_same_task(dry_run):
  out, _ = dry_run
  r = json.loads((out / "speed.json").read_text())
  rows = {row["variant"]: row for row in r["rows"]}
  assert set(rows) == {"lora_jax full", "lora_jax LoRA r16", "merged LoRA r16", "PEFT full", "PEFT LoRA r16",
                       "lora_jax DoRA r16", "PEFT DoRA r16"}
  # The same task for every implementation: random tokens on a freshly initialised model score about ln(vocab).
  for name, row in rows.items():
    assert abs(row["loss"] - math.log(256)) < 0.1, (name, row["loss"])
    assert row["step_s"] > 0 and row["tokens_per_s"] == pytest.approx(2 * 32 / row["step_s"])
  # XLA's counts: factored LoRA does less work than full FT, the merged form more than the factored one; PEFT's
  # FLOPs are lora_jax's count of the same method.
  assert rows["lora_jax LoRA r16"]["xla_flops"] < rows["lora_jax full"]["xla_flops"]
  assert rows["merged LoRA r16"]["xla_flops"] > rows["lora_jax LoRA r16"]["xla_flops"]
  assert rows["PEFT LoRA r16"]["xla_flops"] == rows["lora_jax LoRA r16"]["xla_flops"]
  assert rows["PEFT full"]["flops_are_lora_jax_count"] and not rows["lora_jax full"]["flops_are_lora_jax_count"]
  assert rows["lora_jax full"]["time_vs_full"] == 1.0
  assert rows["lora_jax LoRA r16"]["tokens_per_s_vs_peft"] == pytest.approx(
      rows["lora_jax LoRA r16"]["tokens_per_s"] / rows["PEFT LoRA r16"]["tokens_per_s"])
  assert 0 < rows["lora_jax full"]["peak_fraction"] == pytest.approx(
      rows["lora_jax full"]["flops_per_s"] / r["matmul_peak_flops"])
  assert rows["lora_jax LoRA r16"]["memory_bytes"] < rows["lora_jax full"]["memory_bytes"]  # no Adam on W
  for framework in ("lora_jax", "PEFT"):  # DoRA's step against the same framework's LoRA step
    dora, plain = rows[f"{framework} DoRA r16"], rows[f"{framework} LoRA r16"]
    assert dora["time_vs_lora"] == pytest.approx(dora["step_s"] / plain["step_s"]) and plain["time_vs_lora"] is None
  assert "| time vs own LoRA |" in speed.speed_table(r)
  assert speed.headline(r).startswith("lora_jax LoRA vs PEFT tokens/s: ") and speed.headline(r).endswith(
      "(hidden 64, r16)")


def result_with(lora_flops_per_s, vs_peft, device="NVIDIA H100 80GB HBM3"):
  row = {"shape": "1b", "variant": "lora_jax LoRA r16", "flops_per_s": lora_flops_per_s,
         "tokens_per_s_vs_peft": vs_peft}
  return {"device": device, "matmul_peak_flops": 800e12, "compute_dtype_of_peak": "bfloat16",
          "rows": [row, {**row, "variant": "PEFT LoRA r16"}]}


def test_mfu_report_against_the_measured_and_the_nominal_peak_and_the_goals():
  (line,) = speed.mfu_report(result_with(480e12, 1.6))  # PEFT rows get no MFU line
  assert line.startswith("MFU 1b lora_jax LoRA r16: 60.0% of the measured bfloat16 matmul peak (800 TFLOP/s)")
  assert "48.5% of the nominal 989 TFLOP/s" in line and "1.60x PEFT's tokens/s" in line and ": met)" in line
  assert ": not met)" in speed.mfu_report(result_with(480e12, 1.2))[0]
  assert ": not met)" in speed.mfu_report(result_with(320e12, 2.0))[0]
  assert "nominal" not in speed.mfu_report(result_with(480e12, 1.6, device="cpu"))[0]


def test_bf16_comparison_checks_window_means_relative_to_fp32():
  fp32 = {"losses": [4.0, 2.0, 1.0], "eval_nll": 1.0}
  bf16 = {"losses": [4.06, 1.94, 1.02], "eval_nll": 1.01}
  c = bf16_check.compare(fp32, bf16, window=2)
  assert c["window_gaps"] == pytest.approx([0.0, 0.02]) and c["max_window_gap"] == pytest.approx(0.02)
  assert c["max_relative_gap"] == pytest.approx(0.03) and c["max_gap_step"] == 2  # single steps: shown, not checked
  assert c["mean_relative_gap"] == pytest.approx(0.065 / 3) and c["eval_nll_relative_gap"] == pytest.approx(0.01)


@pytest.mark.parametrize("args", [[], ["a", "--cpu"], ["--dry-run"]], ids=["none", "unknown-flag", "no-outdir"])
def test_gpu_check_usage_errors(args):
  proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=60)
  assert proc.returncode == 2 and "usage: bash benchmarks/gpu_check.sh OUTDIR [--dry-run]" in proc.stderr

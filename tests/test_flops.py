"""XLA's own FLOP count shows LoRA's cost advantage (FLOP counts are deterministic, unlike timings)."""

from benchmarks import flops


def test_lora_train_step_costs_about_two_thirds_of_full_finetuning():
  r = flops.measure(flops.llama_shaped(hidden=256, layers=2, vocab=1000), batch=2, seq=128, rank=8)
  assert r["lora_ratio"] <= 0.75, r
  # The densifying form pays for W + s·A·B and its gradient: clearly more than the factored form.
  assert r["merged_ratio"] > r["lora_ratio"] + 0.15, r
  # The study's 2/3 + 2r/N estimate, give or take what attention scores and the softmax add.
  assert abs(r["lora_ratio"] - r["study_estimate"]) < 0.05, r
  # Adam state: two moments per trainable parameter only.
  assert 0 <= r["lora_opt_state_bytes"] - 2 * 4 * r["lora_params"] < 64, r  # + Adam's int32 step counters
  assert 0 <= r["full_opt_state_bytes"] - 2 * 4 * r["params"] < 64, r

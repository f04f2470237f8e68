"""Tests for lora_jax.stack: K runs in one vmapped step equal K separate runs; zero-padded ranks are their unpadded
selves; each run writes its own run directory; a killed stack resumes bitwise; runs spread over devices."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax import lora, metrics, optim, stack, train
from lora_jax.models import transformer
from tests import _base, _devices, _tolerance
from tests.test_train import CONFIG, MODEL, CountingBatches, eval_batches


LOOP = dict(steps=12, log_every=1, eval_every=6, checkpoint_every=6)
# Stacks run 3 steps per jitted call (a scan), the separate runs they are compared with one: the calls change no
# result, and a preempted stack is resumed mid-call.
STACK_LOOP = {**LOOP, "steps_per_call": 3}


def lora_spec(rank, alpha=32.0, dtype="float32"):
  return lora.LoraSpec(rank=rank, alpha=alpha, targets=("all-linear", "unembed"), dtype=dtype)


def lora_plans(dtype="float32"):
  """Two ranks, three LRs, three seeds, a LoRA+ ratio, weight decay and another alpha in one stack."""
  return [stack.RunPlan(lora_spec(2, dtype=dtype), optim.OptimConfig(lr=1e-2), seed=0),
          stack.RunPlan(lora_spec(4, dtype=dtype), optim.OptimConfig(lr=3e-3, weight_decay=0.1), seed=1),
          stack.RunPlan(lora_spec(4, alpha=8.0, dtype=dtype), optim.OptimConfig(lr=2e-2, lr_b_ratio=4.0), seed=2)]


PLANS = lora_plans()
FULL = [stack.RunPlan(lora.LoraSpec.full(), optim.OptimConfig(lr=lr), seed=s) for lr, s in ((1e-3, 0), (3e-3, 1))]


MODEL64 = transformer.CausalLM(CONFIG.replace(dtype="float64", param_dtype="float64"))


def base_params():
  params = transformer.init_params(CONFIG, jax.random.key(0))
  return jax.tree.map(lambda x: x.astype(jnp.float64), params) if jax.config.jax_enable_x64 else params


def model():
  """The test model, computing in float64 under x64 (where equality with separate runs is checked)."""
  return MODEL64 if jax.config.jax_enable_x64 else MODEL


def separate(tmp_path, plan, name, batches=None):
  params, adapters = lora.create(base_params(), plan.spec, jax.random.key(plan.seed))
  state = train.init_state(params, adapters, plan.spec, plan.optim, plan.seed)
  loop = train.LoopConfig(**LOOP)
  return train.fit(model(), state, plan.optim, loop, batches or CountingBatches(), eval_batches, tmp_path / name,
                   record={"base": "test"}, progress=False)


def stacked(tmp_path, plans, names, batches=None, steps=None, **kw):
  s = stack.init(base_params(), plans)
  loop = train.LoopConfig(**{**STACK_LOOP, **({"steps": steps} if steps else {})})
  return stack.fit(model(), s, loop, batches or CountingBatches(), eval_batches, [tmp_path / n for n in names],
                   records=[{"base": "test"}] * len(plans), progress=False, **kw)


def read(path):
  return [json.loads(line) for line in path.read_text().splitlines()]


# Stacked and separate runs differ only in rounding (batched vs single matmuls). In float32 those differences grow
# chaotically over Adam steps at these LRs (measured: 3e-9 after one step, 3e-2 after 24), so equality is checked in
# float64, where after 12 steps they stay near 1e-12.
EQUAL = 1e-8


def order(start):
  """Training batches from position ``start`` (another data seed's order)."""
  batches = CountingBatches()
  batches.index = start
  return batches


@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.slow
def test_stacked_runs_equal_separate_runs_and_write_the_same_files(tmp_path, x64, method):  # noqa: F811
  """LoRA: three runs with their own data orders, two of them sharing one iterator (drawn once a step, as
  experiments.stacked passes runs of one data_seed); full FT: two runs on one shared batch."""
  plans = lora_plans("float64") if method == "lora" else FULL
  names = [f"run{k}" for k in range(len(plans))]
  starts = [0, 0, 500] if method == "lora" else [0, 0]
  shared = order(0)
  batches = [shared, shared, order(500)] if method == "lora" else None
  final, results = stacked(tmp_path / "stack", plans, names, batches=batches)
  assert [r.state for r in results] == ["done"] * len(plans)
  for k, plan in enumerate(plans):
    state, _ = separate(tmp_path / "alone", plan, names[k], batches=order(starts[k]))
    own = final.run_state(k)
    for a, b in zip(jax.tree.leaves(own.trainable), jax.tree.leaves(state.trainable)):
      assert a.shape == b.shape and a.dtype == b.dtype  # the true rank, not the padded one
      _tolerance.assert_close(a, b, EQUAL)
    got, want = read(tmp_path / "stack" / names[k] / "metrics.jsonl"), read(tmp_path / "alone" / names[k] /
                                                                              "metrics.jsonl")
    assert [sorted(r) for r in got] == [sorted(r) for r in want]  # the same records, the same metric names
    for g, w in zip(got, want):
      for key in ("train/loss", "train/grad_norm", "eval/nll", "train/lr", "lora/norm_b_mean", "params/trainable"):
        if key in w:
          np.testing.assert_allclose(g[key], w[key], rtol=EQUAL, err_msg=f"run {k} {key} at step {w['step']}")
    assert sorted(p.name for p in (tmp_path / "stack" / names[k] / "checkpoints").iterdir()) == ["12", "6"]
    times = [r["train/step_time_s"] for r in got if "train/loss" in r]  # one call's steps share its time
    assert len(times) == 12 and all(len(set(times[i:i + 3])) == 1 for i in range(0, 12, 3))
    if plan.spec.targets:
      assert len(read(tmp_path / "stack" / names[k] / metrics.DIAGNOSTICS_FILE)) == 3  # steps 0, 6 and 12
  # The runs really differ (rank, LR, seed): a stack is not K copies of one run.
  losses = [[r for r in read(tmp_path / "stack" / n / "metrics.jsonl") if "train/loss" in r][-1]["train/loss"]
            for n in names]
  assert len(set(losses)) == len(plans)


@pytest.mark.parametrize("vectorize", [1, 2])  # runs looped (lax.map: the CPU default) or vmapped (GPU/TPU)
def test_a_padded_rank_is_its_unpadded_self_in_float64(x64, vectorize):  # noqa: F811
  params = base_params()
  spec2 = lora.LoraSpec(rank=2, targets=("all-linear",), dtype="float64")
  spec8 = lora.LoraSpec(rank=8, targets=("all-linear",), dtype="float64")
  plans = [stack.RunPlan(spec2, optim.OptimConfig(lr=1e-2), seed=0),
           stack.RunPlan(spec8, optim.OptimConfig(lr=1e-2), seed=0)]
  s = stack.init(params, plans)
  step, _ = stack.make_steps(MODEL64, plans, vectorize=vectorize)
  alone = train.jit_train_step(train.make_train_step(MODEL64, optim.make_optimizer(plans[0].optim)))
  single = s.run_state(0)
  frozen, state = s.state.frozen, s.state.replace(frozen=None)
  batches = CountingBatches()
  for _ in range(5):
    batch = next(batches)
    state, m = step(frozen, state, batch, s.hyper)
    rest, m0 = alone(single.frozen, single.replace(frozen=None), batch)
    single = rest.replace(frozen=single.frozen)
  s = stack.Stack(state.replace(frozen=frozen), s.hyper, s.plans, s.like)
  got = s.run_state(0)
  for a, b in zip(jax.tree.leaves(got.checkpoint_tree()), jax.tree.leaves(single.checkpoint_tree())):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-14)
  np.testing.assert_allclose(float(m["train/loss"][0]), float(m0["train/loss"]), rtol=1e-12)
  # The padding itself never moved: A's extra columns and B's extra rows, and their Adam moments, are exactly 0.
  for path, leaf in jax.tree_util.tree_flatten_with_path(state.trainable["lora"])[0]:
    which = jax.tree_util.keystr(path)
    run0 = np.asarray(leaf[0])
    extra = run0[..., 2:] if which.endswith(".a") else run0[..., 2:, :]
    assert np.all(extra == 0), which
  mu = [x for x in jax.tree.leaves(state.opt_state) if x.ndim >= 3]
  assert mu and all(np.all(np.asarray(x[0])[..., 2:, :] == 0) or np.all(np.asarray(x[0])[..., 2:] == 0)
                    for x in mu)


def test_a_sweeps_adapters_evaluated_in_one_batch_equal_each_alone_in_float64(x64):  # noqa: F811
  """stack.make_eval_runs: three runs' adapters of ranks 2, 4 and 3 (zero-padded to 4) on a batch repeated per run,
  row block r answered by run r, give each run's own NLL sum, with LoRA on the unembedding too."""
  params = base_params()
  trees = []
  for k, rank in enumerate((2, 4, 3)):
    _, adapters = lora.create(params, lora_spec(rank, dtype="float64"), jax.random.key(k))
    # B starts at zero; give it values, so that every run's adapters change the output.
    trees.append(jax.tree.map(lambda ad, k=k: ad.replace(b=0.05 * jax.random.normal(jax.random.key(10 + k), ad.b.shape,
                                                                                     ad.b.dtype)),
                              adapters, is_leaf=lambda x: isinstance(x, lora.Adapter)))
  batch = next(CountingBatches())
  totals, counts = stack.make_eval_runs(MODEL64, 3)(params, lora.stack_adapters(trees), batch)
  alone = [lora.apply(MODEL64, params, t, batch["inputs"], batch["targets"], batch["loss_mask"], method="nll_sum",
                      **train._model_kwargs(batch)) for t in trees]  # noqa: SLF001
  np.testing.assert_allclose(np.asarray(totals), [float(t) for t, _ in alone], rtol=1e-12)
  np.testing.assert_allclose(np.asarray(counts), [float(c) for _, c in alone])
  assert len({round(float(t), 6) for t, _ in alone}) == 3  # the runs really differ


def test_runs_that_differ_beyond_the_stackable_fields_are_refused():
  with pytest.raises(ValueError, match=r"spec.targets"):
    stack.check_stackable([PLANS[0], stack.RunPlan(lora.LoraSpec(rank=2, targets=("attention",)), PLANS[0].optim)])
  with pytest.raises(ValueError, match=r"optim.schedule"):
    stack.check_stackable([PLANS[0], stack.RunPlan(PLANS[0].spec, optim.OptimConfig(lr=1e-2, schedule="linear",
                                                                                    total_steps=10))])
  with pytest.raises(ValueError, match="pissa"):
    stack.check_stackable([stack.RunPlan(lora.LoraSpec(rank=2, init_a="pissa"), PLANS[0].optim)])
  with pytest.raises(ValueError, match="spec.extra_trainable"):
    stack.init(base_params(), [PLANS[0], FULL[0]])
  with pytest.raises(ValueError, match="another structure"):
    stack.stack_trees([{"a": jnp.zeros(2)}, {"b": jnp.zeros(2)}])


@pytest.mark.slow
def test_a_killed_or_preempted_stack_resumes_bitwise(tmp_path):
  import os
  import signal

  names, plans = ["a", "b"], PLANS[1:]
  full, _ = stacked(tmp_path / "straight", plans, names)
  with pytest.raises(RuntimeError, match="simulated crash"):  # dies fetching step 10's batch, inside call 10-12
    stacked(tmp_path / "killed", plans, names, batches=CountingBatches(fail_at=9))
  # As if killed between the two runs' saves: b lacks a's newest checkpoint (here its only one). The stack resumes
  # from the newest step both have (here a fresh start); a's newer one is deleted and written again (it used to stop
  # with StepAlreadyExistsError there).
  saved = sorted(int(p.name) for p in (tmp_path / "killed" / "b" / "checkpoints").iterdir() if p.name.isdigit())
  shutil.rmtree(tmp_path / "killed" / "b" / "checkpoints" / str(saved[-1]))
  resumed, results = stacked(tmp_path / "killed", plans, names)
  assert [r.state for r in results] == ["done"] * 2

  def term(index):
    if index == 4:  # while fetching step 5's batch: the call 4-6 ends at step 5 (step 6 masked), saved there
      os.kill(os.getpid(), signal.SIGTERM)

  with pytest.raises(train.Preempted, match="at step 5"):
    stacked(tmp_path / "preempted", plans, names, batches=CountingBatches(on_batch=term))
  for name in names:
    assert sorted(int(p.name) for p in (tmp_path / "preempted" / name / "checkpoints").iterdir()) == [5]
  after_preemption, results = stacked(tmp_path / "preempted", plans, names)
  assert [r.state for r in results] == ["done"] * 2
  for name, final in (("killed", resumed), ("preempted", after_preemption)):
    for k in range(2):
      for a, b in zip(jax.tree.leaves(final.run_state(k).checkpoint_tree()),
                      jax.tree.leaves(full.run_state(k).checkpoint_tree())):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)  # a short call: the same program
      steps = [r["step"] for r in read(tmp_path / name / names[k] / "metrics.jsonl") if "train/loss" in r]
      assert steps == list(range(1, 13)), name  # the steps after the checkpoint were redone, and logged once


def test_a_diverging_run_fails_alone_and_the_others_finish(tmp_path):
  plans = [PLANS[0], stack.RunPlan(lora_spec(4), optim.OptimConfig(lr=float("inf")), seed=1)]  # NaN updates
  final, results = stacked(tmp_path, plans, ["ok", "nan"])
  assert results[0].state == "done" and results[0].error is None
  assert results[1].state == "failed" and "NonFiniteLoss" in results[1].error and "at step 2" in results[1].error
  # Its parameters went non-finite in step 1, its loss at step 2, inside the call of steps 1-3: nothing after step 1
  # is logged for it, while the other run logs every step.
  assert [r["step"] for r in read(tmp_path / "nan" / "metrics.jsonl") if "train/loss" in r] == [1]
  assert [r["step"] for r in read(tmp_path / "ok" / "metrics.jsonl") if "train/loss" in r] == list(range(1, 13))
  assert (tmp_path / "ok" / "checkpoints" / "12").exists()
  assert not (tmp_path / "nan" / "checkpoints" / "12").exists()
  assert np.isfinite([r for r in read(tmp_path / "ok" / "metrics.jsonl") if "train/loss" in r][-1]["train/loss"])


def test_a_run_that_failed_before_a_preemption_stays_failed_and_the_others_resume_from_their_checkpoint(tmp_path):
  """The diverging run fails at step 2, before the first checkpoint (6): a stack preempted at step 8 resumes the
  good run from its checkpoint at 8 (not from step 0, as waiting for the failed run's checkpoints would) and ends
  bitwise as an uninterrupted stack."""
  import os
  import signal

  plans, names = [PLANS[1], stack.RunPlan(lora_spec(4), optim.OptimConfig(lr=float("inf")), seed=1)], ["ok", "nan"]
  straight, _ = stacked(tmp_path / "straight", plans, names)

  def term(index):
    if index == 7:  # while fetching step 8's batch: the call 7-9 ends at step 8, saved there
      os.kill(os.getpid(), signal.SIGTERM)

  with pytest.raises(train.Preempted, match="at step 8"):
    stacked(tmp_path / "run", plans, names, batches=CountingBatches(on_batch=term))
  failed = json.loads((tmp_path / "run" / "nan" / metrics.FAILED_FILE).read_text())["error"]
  assert "NonFiniteLoss" in failed and "at step 2" in failed
  assert not (tmp_path / "run" / "nan" / "checkpoints").exists() or \
      not list((tmp_path / "run" / "nan" / "checkpoints").iterdir())
  drawn = []
  final, results = stacked(tmp_path / "run", plans, names, batches=CountingBatches(on_batch=drawn.append))
  assert drawn == [8, 9, 10, 11]  # the batches of steps 9-12, after restoring the position of step 8
  assert results[0].state == "done" and (results[1].state, results[1].error) == ("failed", failed)
  for a, b in zip(jax.tree.leaves(final.run_state(0).checkpoint_tree()),
                  jax.tree.leaves(straight.run_state(0).checkpoint_tree())):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert [r["step"] for r in read(tmp_path / "run" / "ok" / "metrics.jsonl") if "train/loss" in r] == \
      list(range(1, 13))
  assert [r["step"] for r in read(tmp_path / "run" / "nan" / "metrics.jsonl") if "train/loss" in r] == [1]


def spread_over_eight_devices(tmp_path):
  """With the rule runs -> data on an 8-device mesh, each of 8 runs lives on its own device and equals the stack on
  one device. Run in a process with 8 fake CPU devices (``test_runs_spread_over_eight_devices``)."""
  from lora_jax import sharding

  assert jax.device_count() == 8
  jax.config.update("jax_enable_x64", True)  # equality is claimed: float64 (see EQUAL)
  plans = [stack.RunPlan(lora_spec(2 + 2 * (k % 2), dtype="float64"), optim.OptimConfig(lr=1e-3 * (k + 1)), seed=k)
           for k in range(8)]
  mesh = sharding.make_mesh({"data": 8, "fsdp": 1, "tensor": 1})
  param_sh = sharding.param_shardings(transformer.abstract_params(CONFIG), transformer.logical_axes(CONFIG), mesh,
                                      sharding.DEFAULT_RULES)
  rules = {**sharding.DEFAULT_RULES, stack.RUN_AXIS: "data"}
  names = [f"r{k}" for k in range(8)]
  spread, _ = stacked(tmp_path / "mesh", plans, names, steps=6, mesh=mesh, param_shardings=param_sh, rules=rules)
  a_leaf = jax.tree.leaves(spread.state.trainable)[0]
  assert a_leaf.sharding.spec[0] == "data" and len(a_leaf.addressable_shards) == 8
  assert all(shard.data.shape[0] == 1 for shard in a_leaf.addressable_shards)  # one run per device
  one, _ = stacked(tmp_path / "one", plans, names, steps=6, vectorize=8)  # the same vmapped program
  for a, b in zip(jax.tree.leaves(spread.state.trainable), jax.tree.leaves(one.state.trainable)):
    _tolerance.assert_exact(a, b)


@pytest.mark.slow
def test_runs_spread_over_eight_devices(tmp_path):
  import subprocess
  import sys

  env = _devices.env_with_devices(8)
  code = f"import pathlib; from tests.test_stack import spread_over_eight_devices as f; f(pathlib.Path({str(tmp_path)!r}))"
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def test_the_sweep_stacks_what_can_share_a_step():
  """--stack auto groups points that can share a step (any rank, LR and seed of one method; at most AUTO_STACK a
  stack, in sweep order) and never mixes LoRA with full FT; --stack 1 stacks nothing."""
  from experiments import sweep
  from experiments.configs import lr_sweep

  points = sweep.sweep_points(lr_sweep, "quick")
  groups = sweep.stack_groups(lr_sweep, points, [], "auto")
  assert [p for g in groups for p in g] == points and all(len(g) <= sweep.AUTO_STACK for g in groups)
  assert all(len({p.arg.split(",")[1] for p in g}) == 1 for g in groups)  # one method a stack
  assert [len(g) for g in groups] == [8, 4, 6]  # 12 LoRA points (ranks 4 and 16 together), 6 full FT points
  assert len({p.arg.split(",rank=")[1].split(",")[0] for p in groups[0]}) == 2
  assert sweep.stack_groups(lr_sweep, points, [], 1) == [[p] for p in points]


@pytest.mark.slow
def test_a_sweep_with_and_without_stacking_gives_the_same_results(tmp_path):
  """experiments.sweep --stack (two real tiny LoRA points of two ranks and two LRs in one experiments.stacked
  process) and --stack 1 (two experiments.main processes) leave the same results.csv rows within float32 tolerance,
  and the same files in every point directory (which points share a stack: test_the_sweep_stacks_what_can_share_a_step)."""
  import csv
  import subprocess
  import sys

  from experiments import report

  lora_points = "rank=4,lr=0.00283,seed=0|rank=16,lr=0.00566,seed=0"
  overrides = ["--", "--config.train.steps=6", "--config.train.eval_every=3", "--config.data.eval_size=20",
               *_base.overrides()]
  for name, stack_arg, only in (("stacked", "auto", lora_points), ("separate", "1", lora_points)):
    out = subprocess.run([sys.executable, "-m", "experiments.sweep", "--config", "experiments/configs/lr_sweep.py:quick",
                          "--only", only, "--workdir", str(tmp_path / name), "--stack", stack_arg, *overrides],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    report.write_sweep(tmp_path / name)
  status = json.loads((tmp_path / "stacked" / "quick_method=lora_rank=4_lr=0.00283_seed=0" / "status.json").read_text())
  assert len(status["stacked_with"]) == 2 and "experiments.stacked" in status["command"]
  rows = {name: list(csv.DictReader(open(tmp_path / name / "results.csv"))) for name in ("stacked", "separate")}
  rows = {name: [r for r in got if r["method"] == "lora"] for name, got in rows.items()}  # the points both ran
  assert len(rows["stacked"]) == len(rows["separate"]) > 3
  for a, b in zip(rows["stacked"], rows["separate"]):
    assert {k: v for k, v in a.items() if k not in ("eval_nll", "train_loss")} == \
        {k: v for k, v in b.items() if k not in ("eval_nll", "train_loss")}
    for key in ("eval_nll", "train_loss"):
      if b[key]:
        np.testing.assert_allclose(float(a[key]), float(b[key]), rtol=1e-4, err_msg=f"{a['point']} {key}")
  for point in (tmp_path / "separate").iterdir():
    if (point / "status.json").exists():
      alone = {p.relative_to(point).as_posix() for p in point.rglob("*") if "checkpoints/" not in p.as_posix()
               and "tensorboard" not in p.as_posix()}
      stacked_files = {p.relative_to(tmp_path / "stacked" / point.name).as_posix()
                       for p in (tmp_path / "stacked" / point.name).rglob("*")
                       if "checkpoints/" not in p.as_posix() and "tensorboard" not in p.as_posix()}
      assert stacked_files - {"stack.json"} == alone, point.name
      assert json.loads((tmp_path / "stacked" / point.name / "stack.json").read_text())["state"] == "done"
  # experiments.evaluate: the sweep's two LoRA runs in one batch (ranks 4 and 16) give the final eval NLL each run
  # logged.
  from experiments import evaluate

  rows = evaluate.run([], sweep=str(tmp_path / "stacked"))
  assert sorted((r["method"], r["rank"]) for r in rows) == [("lora", 4), ("lora", 16)]
  for r in rows:
    np.testing.assert_allclose(r["eval_nll"], r["logged_nll"], rtol=1e-5, err_msg=r["workdir"])
  assert (tmp_path / "stacked" / "heldout_eval.csv").exists()

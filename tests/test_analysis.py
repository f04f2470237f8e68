"""experiments.analysis: the log-LR quadratic fit, the seed bootstrap, pointwise-minimum curves and the verdict rules,
on synthetic numbers with known answers."""

import math

import numpy as np
import pytest

from experiments import analysis as A

GRID = 10.0 ** np.arange(-4.5, -0.49, 0.5)  # half-decade LR grid, 1e-4.5 .. 1e-0.5
TRUE_LOG_LR = -2.7  # between grid points


def u_curve(log_lrs, seeds=4, noise=0.0, seed=0, curvature=0.3):
  """NLL = curvature * (log10 lr - log10 lr*)^2 + 1 + seed noise: one array of seeds per LR."""
  rng = np.random.default_rng(seed)
  return [curvature * (x - TRUE_LOG_LR) ** 2 + 1.0 + rng.normal(0, noise, size=seeds) for x in log_lrs]


def test_fit_recovers_a_known_optimum_exactly_without_noise():
  fit = A.fit_optimum(GRID, [v.mean() for v in u_curve(np.log10(GRID))])
  assert fit.interior and fit.edge == "" and fit.used == (fit.grid_index - 1, fit.grid_index, fit.grid_index + 1)
  assert fit.log_lr == pytest.approx(TRUE_LOG_LR, abs=1e-9) and fit.lr == pytest.approx(10 ** TRUE_LOG_LR)
  three = A.fit_optimum(GRID[3:6], [v.mean() for v in u_curve(np.log10(GRID[3:6]))])  # only 3 points around it
  assert three.used == (0, 1, 2) and three.log_lr == pytest.approx(TRUE_LOG_LR, abs=1e-9)


def test_fit_recovers_a_known_optimum_from_noisy_seeds():
  means = [v.mean() for v in u_curve(np.log10(GRID), seeds=5, noise=0.01, seed=3)]
  assert A.fit_optimum(GRID, means).log_lr == pytest.approx(TRUE_LOG_LR, abs=0.03)


def test_edge_minima_are_flagged_and_claim_no_optimum():
  falling = [3.0, 2.0, 1.5, 1.2]
  fit = A.fit_optimum(GRID[:4], falling)
  assert not fit.interior and fit.edge == "high" and fit.lr == pytest.approx(GRID[3]) and fit.used == ()
  fit = A.fit_optimum(GRID[:4], falling[::-1])
  assert not fit.interior and fit.edge == "low" and fit.lr == pytest.approx(GRID[0])
  assert not A.fit_optimum(GRID[:2], [1.0, 2.0]).interior
  with pytest.raises(ValueError, match="increasing LRs"):
    A.fit_optimum(GRID[::-1], range(len(GRID)))
  with pytest.raises(ValueError, match="diverged"):
    A.fit_optimum(GRID[:3], [1.0, math.inf, 2.0])
  with pytest.raises(ValueError, match="every LR diverged"):
    A.fit_optimum(GRID[:3], [math.nan] * 3)


def test_the_fit_uses_three_points_and_never_spans_a_diverged_lr():
  """The grid minimum and its two neighbours only: a far point (the divergence wall) cannot pull the optimum."""
  y = [v.mean() for v in u_curve(np.log10(GRID))]
  wall = list(y)
  wall[-1] = 5.0  # a diverging high LR, 3 grid steps from the minimum
  assert A.fit_optimum(GRID, wall).log_lr == pytest.approx(A.fit_optimum(GRID, y).log_lr, abs=1e-12)
  k = int(np.argmin(y))
  for side, edge in ((k + 1, "diverged above"), (k - 1, "diverged below")):
    diverged = list(y)
    diverged[side] = math.nan
    fit = A.fit_optimum(GRID, diverged)
    assert not fit.interior and fit.edge == edge and fit.grid_index == k and fit.used == ()
  far = list(y)
  far[0] = math.nan  # a diverged LR away from the minimum changes nothing
  assert A.fit_optimum(GRID, far).log_lr == pytest.approx(A.fit_optimum(GRID, y).log_lr, abs=1e-12)
  draws = A.bootstrap_log_optimum(GRID[:5], [[1.0, 1.1], [0.8, 0.9], [0.5, 0.6], [], [0.9, 1.0]], n_boot=50)
  assert np.all(draws == math.inf)  # the minimum's upper neighbour diverged: never an interior optimum


def test_interior_vertex_always_lies_between_the_minimums_neighbours():
  rng = np.random.default_rng(0)
  x = np.log10(GRID)
  for _ in range(300):
    y = rng.uniform(0, 1, size=len(GRID))
    fit = A.fit_optimum(GRID, y)
    if fit.interior:
      assert x[fit.grid_index - 1] <= fit.log_lr <= x[fit.grid_index + 1]


def test_bootstrap_interval_covers_the_truth():
  covered, reps = 0, 60
  for rep in range(reps):
    samples = u_curve(np.log10(GRID), seeds=4, noise=0.03, seed=100 + rep)
    lo, hi = A.interval(A.bootstrap_log_optimum(GRID, samples, n_boot=400, seed=rep))
    assert lo < hi and hi - lo < 0.3  # an informative interval: well under one grid step (0.5 decades)
    covered += lo <= TRUE_LOG_LR <= hi
  assert covered >= 0.72 * reps  # nominal 90%; the 3-point percentile bootstrap covers ~80% with 4 seeds


def test_bootstrap_is_deterministic_and_streams_differ():
  samples = u_curve(np.log10(GRID), seeds=3, noise=0.05)
  a = A.bootstrap_log_optimum(GRID, samples, n_boot=200, seed=[0, 7])
  assert np.array_equal(a, A.bootstrap_log_optimum(GRID, samples, n_boot=200, seed=[0, 7]))
  assert not np.array_equal(a, A.bootstrap_log_optimum(GRID, samples, n_boot=200, seed=[0, 8]))


def test_bootstrap_marks_edge_resamples_and_the_interval_opens():
  # The minimum sits next to the top of the grid and noise often moves it onto the top: the upper end is open.
  samples = [np.array([2.0, 2.1]), np.array([1.5, 1.6]), np.array([1.0, 1.3]), np.array([0.9, 1.4])]
  draws = A.bootstrap_log_optimum(GRID[:4], samples, n_boot=500)
  assert np.isinf(draws).any() and np.all(draws[np.isinf(draws)] > 0)
  lo, hi = A.interval(draws)
  assert math.isfinite(lo) and hi == math.inf
  assert A.interval(np.array([np.nan] * 10 + [0.0] * 90)) == (-math.inf, math.inf)  # unknown: both ends open
  assert A.interval(np.array([np.nan] * 2 + [0.0] * 98)) == (0.0, 0.0)  # within the 5% tails: no effect
  both = A.log_ratio_draws(np.array([math.inf, 1.0]), np.array([math.inf, 0.5]))
  assert math.isnan(both[0]) and both[1] == 0.5


def test_seed_noise_and_pointwise_min():
  assert A.seed_noise([1.0, 2.0, 3.0]) == pytest.approx(1.0) and math.isnan(A.seed_noise([1.0]))
  curves = {1e-3: {0: 3.0, 10: 2.0, 20: 1.5}, 1e-2: {0: 3.0, 10: 1.8, 20: 1.6, 30: 1.4}}
  assert A.pointwise_min(curves) == [(0, 3.0, 1e-3), (10, 1.8, 1e-2), (20, 1.5, 1e-3), (30, 1.4, 1e-2)]


@pytest.mark.parametrize("ratio, lo, hi, interior, verdict", [
    (9.0, 6.0, 13.0, True, A.AGREE),  # overlaps [6.67, 15], within [3.33, 30]
    (4.0, 3.5, 7.0, True, A.AGREE),  # just reaches the agreement band
    (10.0, 2.0, 40.0, True, A.INCONCLUSIVE),  # overlaps, but too wide to tell 10x from 3x
    (5.5, 5.2, 6.0, True, A.INCONCLUSIVE),  # between the bands
    (2.5, 2.0, 3.5, True, A.DISAGREE),  # entirely below 5
    (30.0, 25.0, 40.0, True, A.DISAGREE),  # entirely above 20
    (2.0, 1.5, 2.5, False, A.INCONCLUSIVE),  # an optimum at the grid edge: nothing claimed
    (10.0, math.nan, math.nan, True, A.INCONCLUSIVE),  # no interval (one seed)
])
def test_verdict_ratio(ratio, lo, hi, interior, verdict):
  assert A.verdict_ratio(ratio, lo, hi, interior).verdict == verdict


def test_combine():
  v = {k: A.Verdict(k, "") for k in (A.AGREE, A.DISAGREE, A.INCONCLUSIVE)}
  assert A.combine([v["agree"], v["agree"]]) == A.AGREE
  assert A.combine([v["agree"], v["inconclusive"]]) == A.INCONCLUSIVE
  assert A.combine([v["agree"], v["disagree"], v["inconclusive"]]) == A.DISAGREE
  assert A.combine([]) == A.INCONCLUSIVE


@pytest.mark.parametrize("pairs, interior, verdict", [
    ({"r16/r4": (1.2, 0.8, 1.8), "r64/r4": (0.7, 0.5, 1.1), "r64/r16": (0.6, 0.4, 0.9)}, True, A.AGREE),
    ({"r16/r4": (1.2, 0.8, 1.8), "r64/r4": (3.0, 2.5, 4.0)}, True, A.DISAGREE),  # r64 sits > 2x above r4
    ({"r16/r4": (0.3, 0.2, 0.45)}, True, A.DISAGREE),  # > 2x below
    ({"r16/r4": (1.5, 0.4, 5.0)}, True, A.INCONCLUSIVE),  # point fine, interval too wide
    ({"r16/r4": (2.4, 1.5, 3.0)}, True, A.INCONCLUSIVE),  # point > 2x but not confidently
    ({"r16/r4": (1.0, 0.9, 1.1)}, False, A.INCONCLUSIVE),  # an edge optimum
    ({"r16/r4": (1.0, math.nan, math.nan)}, True, A.INCONCLUSIVE),
    ({}, True, A.INCONCLUSIVE),  # fewer than two ranks >= 4
])
def test_verdict_rank_invariance(pairs, interior, verdict):
  assert A.verdict_rank_invariance(pairs, interior).verdict == verdict


NOISE = A.Noise(0.01, 12)  # e.g. pooled over 6 cells of 3 seeds


def test_pooled_noise_weights_cells_by_their_degrees_of_freedom():
  noise = A.pooled_noise([[1.0, 2.0, 3.0], [5.0, 5.0], [7.0]])  # variances 1 (df 2) and 0 (df 1); one value: none
  assert noise.df == 3 and noise.sd == pytest.approx(math.sqrt(2 / 3))
  none = A.pooled_noise([[1.0], []])
  assert none.df == 0 and math.isnan(none.sd)


@pytest.mark.parametrize("a_mean, margin, kind", [
    (1.000, 0.05, A.MATCHES),  # the 90% interval (±0.0145) sits inside ±0.05
    (1.030, 0.05, A.MATCHES),  # [0.0155, 0.0445]: a real gap, but inside the margin (equivalent)
    (1.100, 0.05, A.BEHIND),  # lower end 0.0855 above the margin
    (0.900, 0.05, A.AHEAD),
    (1.060, 0.05, A.UNKNOWN),  # the interval straddles the margin
    (1.000, 0.01, A.UNKNOWN),  # a margin narrower than the noise: equivalence cannot be shown
])
def test_compare_is_an_equivalence_test_against_the_margin(a_mean, margin, kind):
  b = [0.99, 1.0, 1.01]
  a = [a_mean - 0.01, a_mean, a_mean + 0.01]
  c = A.compare(a, b, NOISE, margin)
  half = 1.782287555649159 * 0.01 * math.sqrt(2 / 3)  # t(0.95, 12) x sd x sqrt(1/3 + 1/3)
  assert c.value == pytest.approx(a_mean - 1.0) and c.hi - c.lo == pytest.approx(2 * half)
  assert c.kind == kind


def test_compare_is_unknown_without_enough_seeds_noise_or_an_optimum():
  three = [1.0, 1.0, 1.0]
  assert A.compare(three, three, NOISE, 0.05, interior=False).kind == A.UNKNOWN
  assert A.compare([1.0, 1.0], three, NOISE, 0.05).why == f"fewer than {A.MIN_SEEDS} seeds"
  assert A.compare(three, three, A.Noise(math.nan, 0), 0.05).kind == A.UNKNOWN
  assert math.isnan(A.compare([], three, NOISE, 0.05).value)


def test_a_noisier_method_never_matches_more_easily():
  """Synthetic sweeps with the same gap: as one method's seeds get noisier, the pooled noise grows and the verdict
  can only move away from "matches" (never towards it), however the noise falls."""
  rng = np.random.default_rng(0)
  full = 1.0 + 0.01 * rng.standard_normal(3)
  shape = rng.standard_normal(3)
  shape = (shape - shape.mean()) / shape.std(ddof=1)
  order = {A.MATCHES: 0, A.UNKNOWN: 1, A.BEHIND: 1}
  previous = None
  for spread in (0.005, 0.01, 0.02, 0.05, 0.1, 0.2):
    lora = full.mean() + 0.01 + spread * shape  # the same mean gap at every spread
    c = A.compare(lora, full, A.pooled_noise([lora, full]), 0.04)
    if previous is not None:
      assert order[c.kind] >= order[previous]
    previous = c.kind
  assert previous == A.UNKNOWN  # the noisiest cannot tell


def test_growth_is_a_contrast_of_four_cells():
  small_lora, small_full = [1.0, 1.01, 0.99], [1.0, 1.01, 0.99]
  large_lora, large_full = [1.3, 1.31, 1.29], [1.1, 1.11, 1.09]
  growth = A.contrast([(large_lora, 1.0), (large_full, -1.0), (small_lora, -1.0), (small_full, 1.0)], NOISE, 0.05)
  assert growth.value == pytest.approx(0.2) and A.growth_class(growth) == A.GROWS
  flat = A.contrast([(small_lora, 1.0), (small_full, -1.0), (small_lora, -1.0), (small_full, 1.0)], NOISE, 0.05)
  assert A.growth_class(flat) == A.FLAT


def test_stable_verdicts_over_step_fractions():
  assert A.stable({0.5: A.AGREE, 0.75: A.AGREE, 1.0: A.AGREE}) == A.AGREE
  assert A.stable({0.5: A.DISAGREE, 0.75: A.AGREE, 1.0: A.AGREE}) == A.UNSTABLE
  assert A.stable({1.0: A.INCONCLUSIVE}) == A.INCONCLUSIVE


@pytest.mark.parametrize("classes, verdict", [
    ({4: A.BEHIND, 16: A.MATCHES}, A.AGREE),
    ({4: A.MATCHES, 64: A.AHEAD}, A.DISAGREE),  # LoRA beating full FT beyond noise: not "matches"
    ({64: A.BEHIND}, A.DISAGREE),
    ({4: A.MATCHES, 64: A.UNKNOWN}, A.INCONCLUSIVE),
    ({}, A.INCONCLUSIVE),
])
def test_verdict_match_is_judged_at_the_highest_rank(classes, verdict):
  assert A.verdict_match(classes).verdict == verdict


@pytest.mark.parametrize("classes, verdict", [
    ({1: A.BEHIND, 4: A.BEHIND, 16: A.MATCHES, 64: A.MATCHES}, A.AGREE),
    ({1: A.BEHIND, 4: A.AHEAD}, A.AGREE),  # ahead is "not behind": finding 1 judges it
    ({1: A.MATCHES, 4: A.BEHIND, 16: A.MATCHES}, A.DISAGREE),  # a higher rank behind a lower one that is not
    ({1: A.MATCHES, 16: A.MATCHES}, A.INCONCLUSIVE),  # nothing ran out of capacity: untested
    ({1: A.BEHIND, 16: A.BEHIND}, A.INCONCLUSIVE),
    ({1: A.BEHIND, 16: A.UNKNOWN}, A.INCONCLUSIVE),
])
def test_verdict_capacity(classes, verdict):
  assert A.verdict_capacity(classes).verdict == verdict


def test_rule_texts_state_the_constants_the_code_uses():
  assert f"[{A.RATIO_STUDY:g}/{A.RATIO_CLOSE:g}, {A.RATIO_STUDY:g}*{A.RATIO_CLOSE:g}]" in A.RULE_RATIO
  assert f"[1/{A.RANK_SPREAD:g}, {A.RANK_SPREAD:g}]" in A.RULE_RANK and f">= {A.RANK_FLOOR}" in A.RULE_RANK
  assert f"{A.MATCH_FRACTION:g} x" in A.RULE_GAP and f"fewer than {A.MIN_SEEDS} seeds" in A.RULE_GAP
  assert f"{A.TEST_LEVEL:.0%} interval" in A.RULE_GAP and f"{A.LEVEL:.0%}" in A.RULE_RATIO


def test_power_law_slope():
  widths = [64, 128, 256]
  assert A.power_law_slope(widths, [3e-3 * (128 / w) ** 0.781 for w in widths]) == pytest.approx(-0.781)
  assert math.isnan(A.power_law_slope([64], [1e-3])) and math.isnan(A.power_law_slope([64, 64], [1e-3, 2e-3]))


@pytest.mark.parametrize("ratios, verdict", [
    ({64: 9.0, 128: 10.0, 256: 12.0}, A.AGREE),  # max/min 1.33
    ({64: 5.0, 256: 10.0}, A.AGREE),  # exactly 2: still agrees
    ({64: 3.0, 128: 6.0, 256: 9.0}, A.INCONCLUSIVE),  # 3x: between the bands
    ({64: 2.0, 256: 10.0}, A.DISAGREE),  # 5x
    ({128: 10.0}, A.INCONCLUSIVE),  # one width with interior optima: nothing to compare
    ({}, A.INCONCLUSIVE),
])
def test_verdict_width(ratios, verdict):
  assert A.verdict_width(ratios).verdict == verdict


@pytest.mark.parametrize("classes, verdict", [
    ({"lora r=4": A.GROWS, "lora r=64": A.GROWS}, A.AGREE),
    ({"lora r=4": A.GROWS, "lora r=64": A.FLAT}, A.DISAGREE),  # a higher rank removes the penalty (shown: equivalent)
    ({"lora r=4": A.GROWS, "lora r=64": A.UNKNOWN}, A.INCONCLUSIVE),
    ({"lora r=4": A.GROWS, "lora r=64": A.SHRINKS}, A.DISAGREE),
    ({"lora r=4": A.UNKNOWN}, A.INCONCLUSIVE),
    ({}, A.INCONCLUSIVE),
])
def test_verdict_batch(classes, verdict):
  assert A.verdict_batch(classes).verdict == verdict


@pytest.mark.parametrize("attention_vs_mlp, mlp_vs_all, verdict", [
    (A.BEHIND, A.MATCHES, A.AGREE),
    (A.AHEAD, A.MATCHES, A.DISAGREE),  # attention-only beats MLP-only
    (A.BEHIND, A.BEHIND, A.DISAGREE),  # MLP-only falls short of all layers
    (A.MATCHES, A.MATCHES, A.INCONCLUSIVE),  # attention not behind, but not ahead beyond noise either
    (A.BEHIND, A.AHEAD, A.INCONCLUSIVE),
    (A.BEHIND, A.UNKNOWN, A.INCONCLUSIVE),  # no all-layers condition (or too few seeds)
])
def test_verdict_layers(attention_vs_mlp, mlp_vs_all, verdict):
  assert A.verdict_layers(attention_vs_mlp, mlp_vs_all).verdict == verdict


def test_early_gap_and_mean_abs():
  d = A.early_gap({0: 3.0, 1: 2.0, 2: 1.5, 3: 1.2}, {0: 3.0, 1: 2.1, 2: 1.4, 4: 1.0})
  assert d == pytest.approx({1: -0.1, 2: 0.1})  # step 0 and the steps one curve lacks are left out
  assert A.mean_abs(d, [1, 2]) == pytest.approx(0.1)
  assert math.isnan(A.mean_abs(d, [1, 2, 3])) and math.isnan(A.mean_abs(d, []))


@pytest.mark.parametrize("e_alpha_r, e_sqrt, verdict", [
    (0.01, 0.1, A.AGREE),  # curves 10x closer under alpha/r
    (0.05, 0.1, A.INCONCLUSIVE),  # closer, but not by the factor
    (0.1, 0.1, A.DISAGREE),
    (0.2, 0.1, A.DISAGREE),
    (math.nan, 0.1, A.INCONCLUSIVE),  # no pair logged at every early step
])
def test_verdict_early(e_alpha_r, e_sqrt, verdict):
  assert A.verdict_early(e_alpha_r, e_sqrt).verdict == verdict


def test_ba_ratio_crossing_and_verdict():
  modules = {"q": {"norm_a": 0.5, "norm_b": 1.0}, "k": {"norm_a": 0.5, "norm_b": 0.25},
             "v": {"norm_a": 1.0, "norm_b": 1.5}, "init": {"norm_a": 0.0, "norm_b": 0.0}}
  assert A.median_ba_ratio(modules) == pytest.approx(1.5)  # of 2, 0.5, 1.5; a zero A is left out
  assert math.isnan(A.median_ba_ratio({}))
  assert A.first_above_one({0: 0.0, 50: 0.8, 100: 1.2, 150: 0.9, 200: 1.5}) == 100
  assert A.first_above_one({0: 0.0, 50: 1.0}) is None
  assert A.verdict_ba(1.4).verdict == A.AGREE and A.verdict_ba(0.7).verdict == A.DISAGREE
  assert A.verdict_ba(1.0).verdict == A.verdict_ba(math.nan).verdict == A.INCONCLUSIVE


def test_new_rule_texts_state_their_constants():
  assert f"<= {A.WIDTH_AGREE:g}" in A.RULE_WIDTH and f"> {A.WIDTH_FAR:g}" in A.RULE_WIDTH
  assert f"fewer than {A.WIDTH_MIN} widths" in A.RULE_WIDTH
  assert f"{A.MATCH_FRACTION:g} x the smaller" in A.RULE_BATCH
  assert f"steps 1-{A.EARLY_STEPS}" in A.RULE_EARLY and f"* {A.EARLY_FACTOR:g} <" in A.RULE_EARLY
  assert "equivalence test against the margin" in A.RULE_LAYERS
  assert "> 1" in A.RULE_BA and "< 1" in A.RULE_BA

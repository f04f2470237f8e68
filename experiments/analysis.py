"""Sweep statistics as pure functions: the optimal LR by a quadratic fit in log10(LR), seed bootstraps,
pointwise-minimum learning curves, and the rules that turn them into verdicts on the study's findings
(``../shared/reference/blog.md``).

Each verdict rule is a text constant (``RULE_*``) next to the function that applies it, built from the same numeric
constants; ``experiments.report`` prints the text verbatim next to every verdict, so the rule a reader sees is the
rule the code applied. numpy (and scipy's t quantile): no files, no plotting, no randomness beyond a seeded generator.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np

LEVEL = 0.9  # Confidence level of every bootstrap interval.
N_BOOT = 2000  # Bootstrap resamples.
BOOT_SEED = 0  # Seed of every bootstrap generator (with a per-condition stream: see ``bootstrap_log_optimum``).

AGREE, DISAGREE, INCONCLUSIVE, UNSTABLE = "agree", "disagree", "inconclusive", "unstable"
MATCHES, BEHIND, AHEAD, UNKNOWN = "matches", "behind", "ahead", "unknown"


@dataclasses.dataclass(frozen=True)
class Fit:
  """The optimum of NLL against log10(LR) on a grid (see ``fit_optimum``)."""
  log_lr: float  # log10 of the optimum: the fitted vertex when interior, the grid minimum's LR otherwise.
  interior: bool  # False when no optimum is claimed (see ``edge``).
  grid_index: int  # Index of the grid minimum (over the finite points).
  used: tuple[int, ...]  # Indices of the three points the quadratic went through (empty when not interior).
  coef: tuple[float, float, float]  # (a, b, c) of a*x^2 + b*x + c, x = log10(LR) (nan when not interior).
  # "" when interior; "low" / "high" for a minimum at the grid's first or last LR; "diverged below" / "diverged above"
  # when the minimum's neighbour on that side diverged or failed (nan): the fit never spans a diverged point.
  edge: str = ""

  @property
  def lr(self) -> float:
    """The optimum as an LR."""
    return 10.0 ** self.log_lr


def _quadratic(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
  """Least-squares (a, b, c) of y = a*x^2 + b*x + c, centred for conditioning."""
  x0 = float(np.mean(x))
  a, b, c = np.polyfit(x - x0, y, 2)
  return float(a), float(b - 2 * a * x0), float(c - b * x0 + a * x0 * x0)


def fit_optimum(lrs: Sequence[float], nll: Sequence[float]) -> Fit:
  """The one optimum estimator: the vertex of the quadratic in log10(LR) through the grid minimum and its two
  neighbours. nan marks a diverged or failed LR; a minimum at the grid's edge or next to a nan claims no optimum."""
  x, y = np.log10(np.asarray(lrs, float)), np.asarray(nll, float)
  if len(x) != len(y) or np.any(np.diff(x) <= 0) or np.any(np.isinf(y)):
    raise ValueError(f"fit_optimum needs increasing LRs and NLLs (nan for a diverged LR) of the same length; "
                     f"got {lrs}, {nll}")
  if np.all(np.isnan(y)):
    raise ValueError(f"fit_optimum: every LR diverged or failed ({lrs})")
  k = int(np.nanargmin(y))
  nan3 = (math.nan,) * 3
  if k == 0 or k == len(y) - 1:
    return Fit(float(x[k]), False, k, (), nan3, "low" if k == 0 else "high")
  if np.isnan(y[k - 1]) or np.isnan(y[k + 1]):
    return Fit(float(x[k]), False, k, (), nan3, "diverged below" if np.isnan(y[k - 1]) else "diverged above")
  used = (k - 1, k, k + 1)
  a, b, c = _quadratic(x[list(used)], y[list(used)])
  if a <= 0:  # three equal values: the grid minimum itself
    return Fit(float(x[k]), True, k, used, (0.0, 0.0, float(y[k])))
  return Fit(float(-b / (2 * a)), True, k, used, (a, b, c))  # between x[k-1] and x[k+1]: y[k] is the lowest


def bootstrap_log_optimum(lrs: Sequence[float], samples: Sequence[Sequence[float]], n_boot: int = N_BOOT,
                          seed: int | Sequence[int] = BOOT_SEED) -> np.ndarray:
  """log10 of ``fit_optimum`` on seeds resampled independently per LR (an empty sample: a diverged LR, nan);
  -inf/+inf for a resample that claims no optimum below/at the low side or above/at the high side."""
  rng = np.random.default_rng(seed)
  means = np.full((n_boot, len(lrs)), math.nan)
  for i, values in enumerate(samples):
    values = np.asarray(values, float)
    if len(values):
      means[:, i] = values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(axis=1)
  out = np.empty(n_boot)
  for b in range(n_boot):
    fit = fit_optimum(lrs, means[b])
    out[b] = fit.log_lr if fit.interior else (-math.inf if fit.edge in ("low", "diverged below") else math.inf)
  return out


def interval(draws: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
  """The central ``level`` percentile interval of draws, uninterpolated; ±inf give open ends, nan counts as either."""
  draws = np.asarray(draws, float)
  tail = (1 - level) / 2
  lo = np.quantile(np.where(np.isnan(draws), -np.inf, draws), tail, method="lower")
  hi = np.quantile(np.where(np.isnan(draws), np.inf, draws), 1 - tail, method="higher")
  return float(lo), float(hi)


def log_ratio_draws(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Draws of log10(lr_a / lr_b) from two independent bootstraps of log10 optima (nan where both are one infinity)."""
  with np.errstate(invalid="ignore"):
    return np.asarray(a, float) - np.asarray(b, float)


def seed_noise(values: Sequence[float]) -> float:
  """Standard deviation across seeds (ddof 1); nan with fewer than 2 seeds."""
  values = np.asarray(values, float)
  return float(np.std(values, ddof=1)) if len(values) >= 2 else math.nan


def pointwise_min(curves: Mapping[float, Mapping[int, float]]) -> list[tuple[int, float, float]]:
  """At every step any curve has, the minimum over curves (e.g. over LRs): (step, value, key of the curve)."""
  steps = sorted({s for curve in curves.values() for s in curve})
  out = []
  for step in steps:
    key = min((k for k in sorted(curves) if step in curves[k]), key=lambda k: curves[k][step])
    out.append((step, curves[key][step], key))
  return out


# ----------------------------------------------------------------------------------------------------------------------
# Verdict rules. Each RULE_* text is printed verbatim in the report next to the verdict the function beside it returns.

@dataclasses.dataclass(frozen=True)
class Verdict:
  """A verdict (agree / disagree / inconclusive) and the numbers that decided it."""
  verdict: str
  why: str


def _fmt(x: float) -> str:
  return "inf" if x == math.inf else "-inf" if x == -math.inf else f"{x:.3g}"


RATIO_STUDY = 10.0  # The study's LoRA/full optimal-LR ratio (fit over 14 models: 9.8).
RATIO_CLOSE = 1.5  # Agreement band: within this factor of the study's ratio.
RATIO_PRECISE = 3.0  # An agreeing interval must lie within this factor (tells 10x from the toy reproduction's ~3x).
RATIO_FAR = 2.0  # Disagreement: the whole interval further than this factor from the study's ratio.
RANK_FLOOR = 4  # Findings 3 and 4 are judged on ranks >= this (the study: rank 1 prefers a lower LR).
RULE_RATIO = (
    f"Per LoRA rank: inconclusive if the LoRA or the full-FT optimum is at the grid edge or has no bootstrap interval "
    f"(fewer than 2 seeds at some LR). Otherwise, with [lo, hi] the {LEVEL:.0%} interval of lr*(LoRA)/lr*(full): "
    f"agree if [lo, hi] overlaps [{RATIO_STUDY:g}/{RATIO_CLOSE:g}, {RATIO_STUDY:g}*{RATIO_CLOSE:g}] and lies within "
    f"[{RATIO_STUDY:g}/{RATIO_PRECISE:g}, {RATIO_STUDY:g}*{RATIO_PRECISE:g}]; disagree if [lo, hi] lies entirely "
    f"outside [{RATIO_STUDY:g}/{RATIO_FAR:g}, {RATIO_STUDY:g}*{RATIO_FAR:g}]; else inconclusive. Overall, over ranks "
    f">= {RANK_FLOOR}: disagree if any rank disagrees, agree if every rank agrees, else inconclusive.")


def verdict_ratio(ratio: float, lo: float, hi: float, interior: bool) -> Verdict:
  """Finding 3 for one LoRA rank: ``RULE_RATIO`` on the ratio's point estimate and interval (nan = no interval)."""
  s = RATIO_STUDY
  shown = f"ratio {_fmt(ratio)}, {LEVEL:.0%} interval [{_fmt(lo)}, {_fmt(hi)}]"
  if not interior:
    return Verdict(INCONCLUSIVE, "an optimum is at the grid edge")
  if math.isnan(lo) or math.isnan(hi):
    return Verdict(INCONCLUSIVE, f"ratio {_fmt(ratio)}, no interval (fewer than 2 seeds at some LR)")
  if lo <= s * RATIO_CLOSE and hi >= s / RATIO_CLOSE and lo >= s / RATIO_PRECISE and hi <= s * RATIO_PRECISE:
    return Verdict(AGREE, shown)
  if hi < s / RATIO_FAR or lo > s * RATIO_FAR:
    return Verdict(DISAGREE, shown)
  return Verdict(INCONCLUSIVE, shown)


JUDGED_AT = (0.5, 0.75, 1.0)  # Fractions of the steps at which every verdict is judged.
RULE_STABLE = (
    f"Every verdict is judged three times, on the evaluations at {', '.join(f'{f:.0%}' for f in JUDGED_AT)} of the "
    f"steps (each run's last evaluation at or before that step, the same rules and grids): the verdict shown is the "
    f"last one when all three agree, else {UNSTABLE} (the three are listed).")


def stable(by_fraction: Mapping[float, str]) -> str:
  """``RULE_STABLE``: the verdict at the last fraction if every fraction gave it, else UNSTABLE."""
  verdicts = [by_fraction[f] for f in sorted(by_fraction)]
  return verdicts[-1] if len(set(verdicts)) == 1 else UNSTABLE


def combine(verdicts: Sequence[Verdict]) -> str:
  """Several verdicts as one: disagree if any disagrees, agree if all agree (and there is one), else inconclusive."""
  kinds = [v.verdict for v in verdicts]
  if DISAGREE in kinds:
    return DISAGREE
  return AGREE if kinds and all(k == AGREE for k in kinds) else INCONCLUSIVE


RANK_SPREAD = 2.0  # The study: the optimal LR moves < 2x between ranks 4 and 512.
RANK_PRECISE = 3.0  # An agreeing pair's interval must lie within this factor.
RULE_RANK = (
    f"Over the LoRA ranks >= {RANK_FLOOR} with the same targets and scaling: inconclusive if there are fewer than two, "
    f"or any of their optima is at the grid edge or has no bootstrap interval. Otherwise, for every pair of ranks "
    f"(r, r') with [lo, hi] the {LEVEL:.0%} interval of lr*(r)/lr*(r'): disagree if some pair's [lo, hi] lies "
    f"entirely outside [1/{RANK_SPREAD:g}, {RANK_SPREAD:g}]; agree if every pair's point estimate is within "
    f"[1/{RANK_SPREAD:g}, {RANK_SPREAD:g}] and its [lo, hi] within [1/{RANK_PRECISE:g}, {RANK_PRECISE:g}]; "
    f"else inconclusive.")


def verdict_rank_invariance(pairs: Mapping[str, tuple[float, float, float]], all_interior: bool) -> Verdict:
  """Finding 4: ``RULE_RANK`` on {pair label: (ratio, lo, hi)} of optimal LRs between ranks >= RANK_FLOOR."""
  if not pairs:
    return Verdict(INCONCLUSIVE, f"fewer than two LoRA ranks >= {RANK_FLOOR}")
  if not all_interior:
    return Verdict(INCONCLUSIVE, "an optimum is at the grid edge")
  if any(math.isnan(lo) or math.isnan(hi) for _, lo, hi in pairs.values()):
    return Verdict(INCONCLUSIVE, "no interval (fewer than 2 seeds at some LR)")
  shown = "; ".join(f"{k}: {_fmt(r)} [{_fmt(lo)}, {_fmt(hi)}]" for k, (r, lo, hi) in pairs.items())
  if any(hi < 1 / RANK_SPREAD or lo > RANK_SPREAD for _, lo, hi in pairs.values()):
    return Verdict(DISAGREE, shown)
  if all(1 / RANK_SPREAD <= r <= RANK_SPREAD and lo >= 1 / RANK_PRECISE and hi <= RANK_PRECISE
         for r, lo, hi in pairs.values()):
    return Verdict(AGREE, shown)
  return Verdict(INCONCLUSIVE, shown)


MIN_SEEDS = 3  # Seeds a cell needs before its mean is compared with another's.
TEST_LEVEL = 0.9  # Two one-sided tests at 5% each: a difference is judged by its 90% interval.
MATCH_FRACTION = 0.05  # The margin of every NLL comparison: this fraction of the setting's improvement over the base.
RULE_GAP = (
    f"Two conditions a and b are compared at their best grid LRs: d = mean(a) - mean(b) of the final eval NLL over "
    f"seeds (d > 0: a is worse). noise = the seed std pooled over the best-LR cells of every condition of the setting "
    f"(sqrt of the mean variance weighted by n - 1; df = the sum of n - 1); se = noise * sqrt(1/n_a + 1/n_b); [lo, hi] "
    f"= d -/+ t(0.95, df) * se, the {TEST_LEVEL:.0%} interval (two one-sided tests at 5%). The margin m = "
    f"{MATCH_FRACTION:g} x (the base's step-0 eval NLL - the lowest best-LR mean NLL of the setting): a fixed fraction "
    f"of what fine-tuning gains there. a matches b if -m < lo and hi < m (equivalence); a is behind b if lo > m, ahead "
    f"if hi < -m (one-sided tests against the same margin); otherwise unknown. Also unknown: a best LR that claims no "
    f"optimum (at the grid's edge or next to a diverged LR: a better LR may lie outside), a cell with fewer than "
    f"{MIN_SEEDS} seeds, pooled noise with df < 2. Pooling makes a noisier method widen everyone's interval: it can "
    f"never match more easily.")


@dataclasses.dataclass(frozen=True)
class Noise:
  """Seed noise pooled over cells (``pooled_noise``): the std and its degrees of freedom."""
  sd: float
  df: int


def pooled_noise(cells: Sequence[Sequence[float]]) -> Noise:
  """sqrt(sum (n_i - 1) s_i^2 / sum (n_i - 1)) over the cells with >= 2 values; nan (df 0) when none has."""
  cells = [np.asarray(v, float) for v in cells if len(v) >= 2]
  df = sum(len(v) - 1 for v in cells)
  if not df:
    return Noise(math.nan, 0)
  return Noise(float(math.sqrt(sum(float(np.var(v, ddof=1)) * (len(v) - 1) for v in cells) / df)), df)


@dataclasses.dataclass(frozen=True)
class Comparison:
  """A contrast of cell means tested against a margin (``contrast``)."""
  value: float  # The contrast (e.g. mean(a) - mean(b)); nan when it could not be formed.
  lo: float  # The TEST_LEVEL interval (nan when there is no test).
  hi: float
  margin: float
  kind: str  # MATCHES (inside the margin), BEHIND (above it), AHEAD (below it) or UNKNOWN.
  why: str  # Why UNKNOWN when it is not a numeric outcome ("" otherwise).

  def text(self) -> str:
    """'+0.0123 [lo, hi] vs ±m: kind' for tables and verdict lines."""
    if math.isnan(self.value):
      return f"— ({self.why})"
    if math.isnan(self.lo):
      return f"{self.value:+.4f} ({self.why})"
    return (f"{self.value:+.4f} [{self.lo:+.4f}, {self.hi:+.4f}] vs ±{self.margin:.4f}: {self.kind}"
            + (f" ({self.why})" if self.why else ""))


def contrast(cells: Sequence[tuple[Sequence[float], float]], noise: Noise, margin: float,
             interior: bool = True) -> Comparison:
  """sum_i c_i mean(cell_i) for (values, c_i) pairs, with its TEST_LEVEL interval from the pooled noise, classed
  against +/- margin by ``RULE_GAP`` (MATCHES, BEHIND above the margin, AHEAD below it, else UNKNOWN)."""
  if any(len(v) == 0 for v, _ in cells):
    return Comparison(math.nan, math.nan, math.nan, margin, UNKNOWN, "no finished run")
  value = float(sum(c * np.mean(v) for v, c in cells))
  def unknown(why):
    return Comparison(value, math.nan, math.nan, margin, UNKNOWN, why)
  if not interior:
    return unknown("a best LR claims no optimum")
  if min(len(v) for v, _ in cells) < MIN_SEEDS:
    return unknown(f"fewer than {MIN_SEEDS} seeds")
  if noise.df < 2 or not margin > 0:
    return unknown("no pooled noise" if noise.df < 2 else "no margin")
  from scipy import stats  # noqa: PLC0415  (scipy comes with jax)

  half = float(stats.t.ppf(1 - (1 - TEST_LEVEL) / 2, noise.df)) * noise.sd * math.sqrt(
      sum(c * c / len(v) for v, c in cells))
  lo, hi = value - half, value + half
  kind = MATCHES if -margin < lo and hi < margin else BEHIND if lo > margin else AHEAD if hi < -margin else UNKNOWN
  return Comparison(value, lo, hi, margin, kind, "")


def compare(a: Sequence[float], b: Sequence[float], noise: Noise, margin: float,
            interior: bool = True) -> Comparison:
  """mean(a) - mean(b) by ``RULE_GAP``: matches, behind (a worse by more than the margin), ahead, or unknown."""
  return contrast([(a, 1.0), (b, -1.0)], noise, margin, interior)


def match_margin(base_nll: float, best_nll: float) -> float:
  """``RULE_GAP``'s margin: MATCH_FRACTION x (base step-0 NLL - the setting's lowest best-LR NLL)."""
  return MATCH_FRACTION * (base_nll - best_nll)


RULE_MATCH = (
    "Judged at the highest LoRA rank (where capacity should suffice) against full FT by the gap rule: agree if it "
    "matches (equivalent within the margin), disagree if it is behind or ahead, inconclusive if unknown.")


def verdict_match(classes: Mapping[int, str]) -> Verdict:
  """Finding 1: ``RULE_MATCH`` on {rank: the class of its ``compare`` with full FT}."""
  if not classes:
    return Verdict(INCONCLUSIVE, "no LoRA rank next to full FT")
  top = max(classes)
  c = classes[top]
  verdict = {MATCHES: AGREE, UNKNOWN: INCONCLUSIVE}.get(c, DISAGREE)
  return Verdict(verdict, f"rank {top} {c}")


RULE_CAPACITY = (
    "With the ranks classed by the gap rule, low to high: inconclusive if any rank is unknown, if no rank is behind "
    "(none ran out of capacity here, so the sweep cannot test this) or if every rank is behind; disagree if some rank "
    "is behind while a lower rank is not (falling behind must start from the low ranks); else agree. Judged on final "
    "NLL only: the step where low ranks peel off is shown in the learning-curve figure, not judged.")


def verdict_capacity(classes: Mapping[int, str]) -> Verdict:
  """Finding 2: ``RULE_CAPACITY`` on {rank: the class of its ``compare`` with full FT}."""
  ranks = sorted(classes)
  shown = ", ".join(f"r{r} {classes[r]}" for r in ranks) or "no LoRA rank next to full FT"
  if not ranks or any(classes[r] == UNKNOWN for r in ranks):
    return Verdict(INCONCLUSIVE, shown)
  behind = [classes[r] == BEHIND for r in ranks]
  if not any(behind) or all(behind):
    return Verdict(INCONCLUSIVE, shown)
  if any(behind[j] and not behind[i] for i in range(len(ranks)) for j in range(i + 1, len(ranks))):
    return Verdict(DISAGREE, shown)
  return Verdict(AGREE, shown)


# ----------------------------------------------------------------------------------------------------------------------
# Findings judged across settings or LoRA groups: the ratio across widths (3w), the early curves of finding 4 (4c),
# batch size (5), layers (6) and B outgrowing A (9).

def power_law_slope(x: Sequence[float], y: Sequence[float]) -> float:
  """Least-squares slope of log y against log x (the exponent of a power law y ∝ x^slope); nan with < 2 points."""
  x, y = np.asarray(x, float), np.asarray(y, float)
  if len(x) < 2 or len(set(x.tolist())) < 2:
    return math.nan
  return float(np.polyfit(np.log(x), np.log(y), 1)[0])


WIDTH_MIN = 2  # Widths with a ratio needed for a verdict.
WIDTH_AGREE = 2.0  # Agree if the ratio moves by at most this factor over widths.
WIDTH_FAR = 4.0  # Disagree if it moves by more than this factor.
RULE_WIDTH = (
    f"Per LoRA condition, over settings that differ only in the model's width (and the fields it fixes): the ratio "
    f"lr*(LoRA)/lr*(full) of the fitted optima at each width where both optima are interior (point estimates: their "
    f"bootstrap intervals are shown when there are seeds but not used, so one seed per LR suffices). Inconclusive if "
    f"fewer than {WIDTH_MIN} widths have one; agree if max/min of those ratios <= {WIDTH_AGREE:g} (the study's LR rule "
    f"scales LoRA and full FT by the same (2000/hidden)^p, so their ratio does not depend on width); disagree if "
    f"max/min > {WIDTH_FAR:g}; else inconclusive.")


def verdict_width(ratios: Mapping[float, float]) -> Verdict:
  """Finding 3 across widths: ``RULE_WIDTH`` on {width: LoRA/full optimal-LR ratio} at widths with interior optima."""
  shown = ", ".join(f"w{w:g} {_fmt(r)}" for w, r in sorted(ratios.items()))
  if len(ratios) < WIDTH_MIN:
    return Verdict(INCONCLUSIVE, f"{len(ratios)} width{'s' * (len(ratios) != 1)} with interior optima for both "
                                 f"(needs {WIDTH_MIN})" + (f": {shown}" if shown else ""))
  spread = max(ratios.values()) / min(ratios.values())
  shown = f"max/min {_fmt(spread)} ({shown})"
  if spread <= WIDTH_AGREE:
    return Verdict(AGREE, shown)
  return Verdict(DISAGREE if spread > WIDTH_FAR else INCONCLUSIVE, shown)


GROWS, SHRINKS, FLAT = "grows", "shrinks", "flat"
RULE_BATCH = (
    f"Per LoRA condition, over settings that differ only in data.batch_size (and the fields it fixes; a sweep that "
    f"trains a batch size for several step counts gives two kinds of line, one per fixed train.steps and one per "
    f"fixed number of rows = batch x steps, each judged on its own): gap(B) = final "
    f"eval NLL of LoRA minus that of full FT at batch B, each the seed mean at its best grid LR; growth = gap(largest "
    f"B) - gap(smallest B), a contrast of four cells tested as in the gap rule (its {TEST_LEVEL:.0%} interval from the "
    f"seed noise pooled over the best-LR cells of every condition at those two batch sizes, se = noise * sqrt(sum "
    f"1/n), t with the pooled df; margin = {MATCH_FRACTION:g} x the smaller of the two settings' improvements over the "
    f"base). The gap grows if the interval lies above the margin, shrinks if below minus the margin, is flat if inside "
    f"it; otherwise (or with a best LR that claims no optimum, or fewer than {MIN_SEEDS} seeds in a cell) unknown. "
    f"Overall: disagree if some condition's gap shrinks or is flat, agree if every condition's gap grows (a higher "
    f"rank does not remove the penalty), else inconclusive.")


def growth_class(c: Comparison) -> str:
  """A batch-growth contrast (``contrast``) as GROWS / SHRINKS / FLAT / UNKNOWN by ``RULE_BATCH``."""
  return {BEHIND: GROWS, AHEAD: SHRINKS, MATCHES: FLAT}.get(c.kind, UNKNOWN)


def verdict_batch(classes: Mapping[str, str]) -> Verdict:
  """Finding 5: ``RULE_BATCH`` on {LoRA condition: class from ``growth_class``}."""
  shown = ", ".join(f"{k} {v}" for k, v in classes.items()) or "no LoRA condition next to full FT"
  kinds = list(classes.values())
  if SHRINKS in kinds or FLAT in kinds:
    return Verdict(DISAGREE, shown)
  return Verdict(AGREE if kinds and all(k == GROWS for k in kinds) else INCONCLUSIVE, shown)


RULE_LAYERS = (
    "Within a setting, per LoRA rank (or, when no rank has both attention-only and MLP-only, across the ranks as "
    "swept: parameter-matched by design, e.g. attention r=2k vs MLP r=k), LoRA conditions that differ in targets "
    "classed as attention-only (attention, "
    "or only q/k/v/o_proj), MLP-only (mlp, or only gate/up/down_proj) or all (all-linear), each with or without "
    "unembed: their best-LR final eval NLLs (seed means) compared by the gap rule (an equivalence test against the "
    "margin, or one-sided tests beyond it; unknown when neither is decided), attention-only against MLP-only with "
    "the same unembed choice, and MLP-only against all (with the same unembed choice if the sweep has it, else the "
    "other). Agree if attention-only is behind MLP-only and MLP-only matches all; disagree if attention-only is ahead "
    "of MLP-only or MLP-only is behind all; else inconclusive. Overall: disagree if any rank disagrees, agree if "
    "every rank agrees, else inconclusive. Equal rank is not equal parameters (the table lists the trainable "
    "parameters).")


def verdict_layers(attention_vs_mlp: str, mlp_vs_all: str) -> Verdict:
  """Finding 6 at one rank: ``RULE_LAYERS`` on the gap classes of attention-only vs MLP-only and MLP-only vs all."""
  def relation(c: str, other: str) -> str:
    return {AHEAD: f"ahead of {other}", MATCHES: f"matches {other}", BEHIND: f"behind {other}"}.get(
        c, f"{c} vs {other}")
  shown = f"attention-only {relation(attention_vs_mlp, 'MLP-only')}; MLP-only {relation(mlp_vs_all, 'all')}"
  if attention_vs_mlp == AHEAD or mlp_vs_all == BEHIND:
    return Verdict(DISAGREE, shown)
  return Verdict(AGREE if attention_vs_mlp == BEHIND and mlp_vs_all == MATCHES else INCONCLUSIVE, shown)


EARLY_STEPS = 20  # d(t) is judged over steps 1..EARLY_STEPS.
EARLY_FACTOR = 3.0  # Agree if the curves under alpha/r stay this many times closer than under alpha/sqrt(r).
RULE_EARLY = (
    f"Per LoRA group and scaling (alpha/r, alpha/sqrt(r)): with the lowest and the highest rank trained at the same "
    f"LR and data seed, d(t) = train loss(lowest rank) - train loss(highest rank) at step t, and E = mean |d(t)| over "
    f"steps 1-{EARLY_STEPS}, averaged over the (LR, data seed) pairs the scaling has (finished runs with the train "
    f"loss logged at each of those steps). Inconclusive if either scaling has no such pair; agree if E(alpha/r) * "
    f"{EARLY_FACTOR:g} < E(alpha/sqrt(r)) (the curves coincide at first under alpha/r and separate at once under "
    f"rsLoRA); disagree if E(alpha/r) >= E(alpha/sqrt(r)); else inconclusive.")


def early_gap(low: Mapping[int, float], high: Mapping[int, float]) -> dict[int, float]:
  """d(t) = low(t) - high(t) at every step > 0 both curves have."""
  return {t: low[t] - high[t] for t in sorted(set(low) & set(high)) if t > 0}


def mean_abs(d: Mapping[int, float], steps: Sequence[int]) -> float:
  """Mean |d(t)| over ``steps``; nan if d lacks any of them."""
  if not steps or any(t not in d for t in steps):
    return math.nan
  return float(np.mean([abs(d[t]) for t in steps]))


def verdict_early(e_alpha_r: float, e_sqrt: float) -> Verdict:
  """Finding 4's curves: ``RULE_EARLY`` on E under alpha/r and under alpha/sqrt(r) (nan: no pair)."""
  shown = f"E(alpha/r) {_fmt(e_alpha_r)}, E(alpha/sqrt(r)) {_fmt(e_sqrt)}"
  if math.isnan(e_alpha_r) or math.isnan(e_sqrt):
    return Verdict(INCONCLUSIVE, shown + " (a scaling has no pair of ranks logged at every early step)")
  if e_alpha_r * EARLY_FACTOR < e_sqrt:
    return Verdict(AGREE, shown)
  return Verdict(DISAGREE if e_alpha_r >= e_sqrt else INCONCLUSIVE, shown)


BA_MIN_STEPS = 1000  # The study speaks of long runs: shorter sweeps do not test finding 9.
RULE_BA = (
    f"Only when the sweep's longest finished LoRA runs have >= {BA_MIN_STEPS} steps (the study's claim is about long "
    f"runs). On those runs, each at its condition's best grid LR: per run, "
    "the median over adapted modules of ||B||_2/||A||_2 (spectral norms) at its last evaluation; per condition, the "
    "median of that over its seeds. Agree if it is > 1, disagree if < 1, else inconclusive; overall: disagree if any "
    "condition disagrees, agree if every one agrees, else inconclusive. The first step at which the median over "
    "modules exceeds 1 is reported, not judged.")


def median_ba_ratio(modules: Mapping[str, Mapping[str, float]]) -> float:
  """Median over modules of norm_b / norm_a (one ``lora_diagnostics.jsonl`` record's ``modules``); nan if none."""
  ratios = [m["norm_b"] / m["norm_a"] for m in modules.values() if m["norm_a"] > 0]
  return float(np.median(ratios)) if ratios else math.nan


def first_above_one(series: Mapping[int, float]) -> int | None:
  """The first step whose value exceeds 1 (None if none does)."""
  return next((t for t in sorted(series) if series[t] > 1), None)


def verdict_ba(ratio: float) -> Verdict:
  """Finding 9 for one condition: ``RULE_BA`` on its median ||B||/||A|| at the end."""
  shown = f"median ‖B‖/‖A‖ {_fmt(ratio)}"
  if math.isnan(ratio) or ratio == 1:
    return Verdict(INCONCLUSIVE, shown)
  return Verdict(AGREE if ratio > 1 else DISAGREE, shown)


# -- RL (finding 7) ----------------------------------------------------------------------------------------------------
# A run's score is its mean sampled reward over the last quarter of its steps (``final_reward``); its start is the
# reward of its first round (sampled from the initial policy). Higher is better.

FINAL_FRACTION = 0.25  # The score averages the train reward over this last fraction of the steps.
BAND_FRACTION = 0.5  # An LR is good when its gain over the start is at least this fraction of the setting's best gain.
BAND_WIDER = 1.5  # "Wider" means a band width larger by more than this factor (a factor-2 grid: at least one step).
RULE_RL_PEAK = (
    f"Score of a run = its mean sampled reward over the last {FINAL_FRACTION:.0%} of its steps; a condition's peak = "
    f"the seed-mean score at its best grid LR. Judged at the lowest LoRA rank against full FT by the gap rule on "
    f"rewards (d = peak(full) - peak(LoRA): > 0 means LoRA is behind; noise pooled over the best-LR cells of the "
    f"setting; margin = {MATCH_FRACTION:g} x the setting's best gain of a peak over its start reward). Inconclusive if "
    f"no condition gained over its start reward (nothing was learned) or the comparison is unknown (including a best "
    f"LR at the first or last LR of its grid, or fewer than {MIN_SEEDS} seeds); agree if LoRA matches or is ahead "
    f"(rank 1 matches or beats full FT), disagree if it is behind.")


def final_reward(rewards: Mapping[int, float], steps: int) -> float:
  """A run's score: the mean train reward over steps > (1 - FINAL_FRACTION) * steps (nan if none was logged)."""
  tail = [v for t, v in rewards.items() if t > (1 - FINAL_FRACTION) * steps]
  return float(np.mean(tail)) if tail else math.nan


def verdict_rl_peak(c: Comparison, best_gain: float) -> Verdict:
  """Finding 7 (peak reward): ``RULE_RL_PEAK`` on full FT's minus the low-rank LoRA's peak (``compare``)."""
  shown = f"peak(full) - peak(LoRA) {c.text()}; best gain over the start {best_gain:+.3f}"
  if math.isnan(c.value):
    return Verdict(INCONCLUSIVE, "no finished runs")
  if not best_gain > 0:
    return Verdict(INCONCLUSIVE, shown + ": nothing learned")
  return Verdict({MATCHES: AGREE, AHEAD: AGREE, BEHIND: DISAGREE}.get(c.kind, INCONCLUSIVE), shown)


RULE_RL_BAND = (
    f"An LR is good for a condition when its seed-mean score minus the start reward is at least {BAND_FRACTION:g} x "
    f"the best such gain of any condition in the setting; a condition's band = the run of consecutive good LRs "
    f"around its best LR, its width = highest / lowest LR of the band (1 for a single LR). A band that reaches the "
    f"first or last LR of the grid is open (the true band may be wider). Per LoRA rank against full FT, the LoRA band "
    f"is wider when its width exceeds {BAND_WIDER:g} x full FT's (one step of a factor-2 grid): agree if it is wider "
    f"and full FT's band is closed; disagree if it is not wider and is closed; else inconclusive. Overall: disagree if "
    f"any rank disagrees, agree if every rank agrees, else inconclusive.")


@dataclasses.dataclass(frozen=True)
class Band:
  """The good-LR band of a condition (``RULE_RL_BAND``)."""
  lo: float
  hi: float
  open_low: bool
  open_high: bool

  @property
  def width(self) -> float:
    """highest / lowest good LR."""
    return self.hi / self.lo

  @property
  def closed(self) -> bool:
    """Neither end at the grid's edge."""
    return not (self.open_low or self.open_high)


def good_band(lrs: Sequence[float], gains: Sequence[float], threshold: float) -> Band | None:
  """The consecutive LRs with gain >= threshold around the best one (None when even the best is below it)."""
  gains = np.asarray(gains, float)
  k = int(np.argmax(gains))
  if not gains[k] >= threshold:
    return None
  lo = hi = k
  while lo > 0 and gains[lo - 1] >= threshold:
    lo -= 1
  while hi < len(gains) - 1 and gains[hi + 1] >= threshold:
    hi += 1
  return Band(float(lrs[lo]), float(lrs[hi]), lo == 0, hi == len(gains) - 1)


def verdict_rl_band(lora_band: Band | None, full_band: Band | None) -> Verdict:
  """Finding 7 (band of good LRs) for one LoRA rank: ``RULE_RL_BAND``."""
  def show(b):
    if b is None:
      return "none"
    return (f"{_fmt(b.lo)}..{_fmt(b.hi)} (x{_fmt(b.width)}"
            + (", open" if not b.closed else "") + ")")
  shown = f"LoRA {show(lora_band)} vs full {show(full_band)}"
  if lora_band is None or full_band is None:
    return Verdict(INCONCLUSIVE, shown)
  wider = lora_band.width > BAND_WIDER * full_band.width
  if wider and full_band.closed:
    return Verdict(AGREE, shown)
  if not wider and lora_band.closed:
    return Verdict(DISAGREE, shown)
  return Verdict(INCONCLUSIVE, shown)

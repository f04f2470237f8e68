"""Finding 6: which layers (attention-only, MLP-only, all), from LoRA groups that differ in targets."""

from __future__ import annotations

from collections.abc import Sequence

from etils import epath

from experiments import analysis
from experiments.report.figures import _finish_axes, _pyplot, _save
from experiments.report.findings import FindingRow, _gap, _join, _scope
from experiments.report.parts import Part, _prefix
from experiments.report.sweeps import Condition, _condition_order, _natural, _show
from experiments.report.text import Table, _lr, _mean_std


LAYER_ORDER = ("attention", "mlp", "all")  # targets_class's kinds, as tables list them.
ATTENTION_TARGETS = frozenset({"attention", "q_proj", "k_proj", "v_proj", "o_proj"})
MLP_TARGETS = frozenset({"mlp", "gate_proj", "up_proj", "down_proj"})
ALL_MODULES = (ATTENTION_TARGETS | MLP_TARGETS) - {"attention", "mlp"}


def targets_class(targets: Sequence[str]) -> tuple[str, bool] | None:
  """("attention" | "mlp" | "all", adapts the unembedding) for a LoRA targets list; None for other target sets."""
  names = set(targets) - {"unembed"}
  unembed = "unembed" in targets
  if names in ({"all-linear"}, {"attention", "mlp"}, ALL_MODULES):
    return "all", unembed
  if names and names <= ATTENTION_TARGETS:
    return "attention", unembed
  if names and names <= MLP_TARGETS:
    return "mlp", unembed
  return None


def _base_targets(c: Condition) -> set:
  return set(c.runs[0].config["lora"]["targets"]) - {"unembed"}


def _groups_differing_in(conds: list[Condition], field: str) -> dict[tuple[str, str], list[Condition]]:
  """LoRA conditions by (setting, their group's other fields), where ``field`` varies among the LoRA groups."""
  out = {}
  for c in conds:
    if c.method == "lora" and field in c.group_fields:
      rest = ", ".join(f"{k}={_show(v)}" for k, v in c.group_fields.items() if k != field)
      out.setdefault((c.setting, rest), []).append(c)
  return out


def _compare(a: Condition | None, b: Condition | None) -> tuple[str, str]:
  """The gap class of ``a`` against ``b`` (RULE_GAP's) and the gap as text."""
  if a is None or b is None or a.fit is None or b.fit is None:
    return analysis.UNKNOWN, "—"
  g = _gap(a, b)
  return g.kind, g.text()


def targets_label(c: Condition) -> str:
  """A condition's targets class as text: "attention", "mlp + unembed", ..."""
  kind, unembed = targets_class(c.runs[0].config["lora"]["targets"])
  return kind + (" + unembed" if unembed else "")


def layers_part(conds: list[Condition]) -> Part | None:
  """Finding 6: attention-only vs MLP-only vs all at each rank, trainable parameters, and unembedding on vs off."""
  rows, table, notes, plot = [], [], [], []
  lines = _groups_differing_in(conds, "targets")
  for (setting, rest), group in sorted(lines.items(), key=lambda kv: (_natural(kv[0][0]), _natural(kv[0][1]))):
    by = {}
    for c in group:
      kind = targets_class(c.runs[0].config["lora"]["targets"])
      if kind is not None:
        by[(*kind, c.rank)] = c
    if len({k[0] for k in by}) < 2 and not any((k, not u, r) in by for k, u, r in by):
      continue
    scope = _join(setting, rest)
    verdicts = []
    # A sweep that gives each targets class its own rank (attention r=2k vs MLP r=k: parameter-matched, as the
    # study) is compared across those ranks; otherwise rank by rank.
    kinds = [(k, u) for k, u, _ in by]
    matched = len(set(kinds)) == len(kinds) and not any(("mlp", u, r) in by for k, u, r in by if k == "attention")
    compared = {(k, u, 0): c for (k, u, _), c in by.items()} if matched else by
    for rank in sorted({r for _, _, r in compared}):
      unembeds = sorted({u for k, u, r in compared if r == rank and k != "all"})
      for u in unembeds:
        attention, mlp = compared.get(("attention", u, rank)), compared.get(("mlp", u, rank))
        everything = compared.get(("all", u, rank)) or compared.get(("all", not u, rank))
        a_vs_m, a_text = _compare(attention, mlp)
        m_vs_all, m_text = _compare(mlp, everything)
        v = analysis.verdict_layers(a_vs_m, m_vs_all)
        verdicts.append(v)
        shown = [c for c in (attention, mlp, everything) if c is not None]
        label = ("; ".join(f"{targets_label(c)} r{c.rank}" for c in shown) + " (ranks as swept)" if matched
                 else f"r{rank}")
        label += (", with unembed" if u else ", no unembed") if len(unembeds) > 1 else ""
        rows.append(FindingRow("6", _scope(scope, label), f"attention − MLP {a_text}; MLP − all {m_text}",
                               v.verdict, v.why))
    if verdicts:
      rows.append(FindingRow("6", _scope(scope, "overall"), "", analysis.combine(verdicts),
                             f"{len(verdicts)} comparison{'s' * (len(verdicts) != 1)} judged"))
    for (kind, u, rank), c in sorted(by.items(), key=lambda kv: _condition_order(kv[1])):
      twin = by.get((kind, True, rank)) if not u else None
      if twin is not None and _base_targets(twin) == _base_targets(c):  # the two differ only in "unembed"
        notes.append(f"{_scope(scope, f'r{rank} {kind}')}: with the unembedding − without "
                     f"{_compare(twin, c)[1]} (descriptive).")
    for (kind, u, _), c in sorted(by.items(), key=lambda kv: (LAYER_ORDER.index(kv[0][0]), kv[0][1], kv[0][2])):
      values = c.final[c.best_lr] if c.fit else []
      trainable = next((r.trainable for r in c.runs if r.trainable is not None), None)
      table.append(([setting] if len({s for s, _ in lines}) > 1 else []) + [
          c.name, kind + (" + unembed" if u else ""), str(c.rank), "—" if trainable is None else f"{trainable:,}",
          _lr(c.best_lr), _mean_std(values) if values else "—", c.edge_note()])
    plot.append((scope, by))
  if not plot:
    return None
  if not any(r.trainable is not None for c in conds for r in c.runs):
    notes.append("Trainable parameters: the runs' metrics hold no params/trainable, so the table cannot show them.")
  header = (["setting"] if len({s for s, _ in lines}) > 1 else []) + [
      "condition", "targets", "rank", "trainable params", "best grid LR", "final NLL there", "fit"]
  return Part(rows, Table("layers", "Which layers are adapted: best-LR final eval NLL and trainable parameters",
                          header, table), notes, plot)


LAYER_COLORS = {"attention": "tab:orange", "mlp": "tab:blue", "all": "tab:green"}


def plot_layers(stem: epath.Path, part: Part) -> None:
  """Final eval NLL against LR (seed means) per condition, coloured by the adapted layers; one panel per setting."""
  plt = _pyplot()
  fig, axes = plt.subplots(1, len(part.plot), figsize=(5.5 * len(part.plot), 4.2), squeeze=False)
  for ax, (scope, by) in zip(axes[0], part.plot):
    ranks = sorted({r for _, _, r in by})
    for (kind, unembed, rank), c in sorted(by.items(), key=lambda kv: _condition_order(kv[1])):
      if c.usable:
        ax.plot(c.usable, c.means(), marker="s" if unembed else "o", markersize=3, color=LAYER_COLORS[kind],
                linestyle=("-", "--", ":", "-.")[ranks.index(rank) % 4], label=c.name)
    _finish_axes(ax, "learning rate", "final eval NLL per loss token",
                 _prefix(scope) + "loss vs LR by adapted layers")
  _save(fig, stem)

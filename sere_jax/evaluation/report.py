"""A grid's rows and the comparisons computed from them: `grid_row` is one (spec, batch
size)'s JSON row; each policy family's perplexity increase (Δppl %) against its mean
distinct experts per layer is a curve (`curve`), read at common distinct-expert levels
by linear interpolation (`interpolate`) or as the best point with at most that many
experts (`best_at`), per batch size (`equal_distinct`, `comparisons`), beside the
similarity-metric table of `sere` at S = 2, rho = 0. Only specs with the stored
similarity and no min_batch join a family's curve (`comparison_family`); `none` joins
every curve as its S = K end.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from sere_jax import generation
from sere_jax.config import RerouteConfig
from sere_jax.evaluation import metrics
from sere_jax.policy_spec import PolicySpec

if TYPE_CHECKING:
  from sere_jax.evaluation.runner import TeacherForced


def curve(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
  """`(distinct, delta)` points sorted by distinct, averaging points of equal distinct
  (NaN deltas dropped)."""
  groups: dict[float, list[float]] = {}
  for x, y in points:
    if not math.isnan(y):
      groups.setdefault(x, []).append(y)
  return [(x, float(np.mean(ys))) for x, ys in sorted(groups.items())]


def best_at(points: Sequence[tuple[float, float]], x: float) -> float | None:
  """The lowest delta among points with at most `x` distinct experts (None if none)."""
  ys = [py for px, py in points if px <= x + 1e-9 and not math.isnan(py)]
  return min(ys) if ys else None


def interpolate(points: Sequence[tuple[float, float]], x: float) -> float | None:
  """Linear interpolation along `points` (sorted by x) at `x`; None outside their range."""
  if not points or x < points[0][0] - 1e-9 or x > points[-1][0] + 1e-9:
    return None
  for (x0, y0), (x1, y1) in zip(points, points[1:]):
    if x0 <= x <= x1:
      return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
  return points[0][1]


def comparison_family(spec: PolicySpec) -> str | None:
  """The curve a spec belongs to in the equal-distinct comparison: the policy name for
  specs with the stored similarity and no min_batch (`none` joins every curve as its
  S = K end); None for metric and min_batch variants."""
  if spec.metric is not None or spec.min_batch != 1 or spec.seed:
    return None
  return spec.policy


def equal_distinct(rows: Sequence[dict[str, Any]], families: Sequence[str],
                   num_levels: int = 6) -> dict[str, Any]:
  """Δppl % of each family at common distinct-expert levels, for one batch size.

  `delta_ppl_pct`: linear interpolation along the family's points sorted by distinct
  (`curve`; None outside their range); `best_delta_ppl_pct`: the family's lowest Δppl
  with at most that many distinct experts (`best_at`). Levels are `num_levels` evenly
  spaced from the fewest to the most distinct experts of any family. `rows` need
  `comparison_family`, `distinct` and `delta_ppl_pct`; the `none` row (if any) joins
  every family (it is S = K).
  """
  base = [(r["distinct"], r["delta_ppl_pct"]) for r in rows
          if r["comparison_family"] == "none"]
  points = {f: base + [(r["distinct"], r["delta_ppl_pct"]) for r in rows
                       if r["comparison_family"] == f] for f in families}
  xs = [x for p in points.values() for x, _ in p]
  if not xs:
    return {"levels": [], "delta_ppl_pct": {f: [] for f in families},
            "best_delta_ppl_pct": {f: [] for f in families}, "points": points}
  lo, hi = min(xs), max(xs)
  levels = [float(v) for v in np.linspace(lo, hi, num_levels)] if hi > lo else [lo]
  return {
      "levels": levels,
      "delta_ppl_pct": {f: [interpolate(curve(p), x) for x in levels]
                        for f, p in points.items()},
      "best_delta_ppl_pct": {f: [best_at(p, x) for x in levels] for f, p in points.items()},
      "points": {f: [list(q) for q in curve(p)] for f, p in points.items()},
  }


def comparisons(rows: Sequence[dict[str, Any]], batch_sizes: Sequence[int],
                families: Sequence[str] = ("sere", "topk_truncate", "random", "oea",
                                           "sere_hybrid")
                ) -> dict[str, Any]:
  """Computed comparisons of a grid's rows, keyed by batch size (as a string):
  `equal_distinct` (see `equal_distinct`; with `sere_minus`: per other family, the
  interpolated Δppl % of `sere` minus that family's at each level, negative where
  `sere` loses less, None outside either range) and `metrics`: Δppl % and distinct
  experts of `sere` at S=2, rho=0 per similarity metric (`stored` = the model's own)."""
  out: dict[str, Any] = {"equal_distinct": {}, "metrics": {}}
  for g in batch_sizes:
    at_g = [r for r in rows if r["batch_size"] == g]
    eq = equal_distinct(at_g, families)
    if "sere" in families:
      ours = eq["delta_ppl_pct"]["sere"]
      eq["sere_minus"] = {
          f: [None if a is None or b is None else a - b for a, b in zip(ours, theirs)]
          for f, theirs in eq["delta_ppl_pct"].items() if f != "sere"}
    out["equal_distinct"][str(g)] = eq
    out["metrics"][str(g)] = [
        {"metric": r["metric"] or "stored", "spec": r["spec"], "distinct": r["distinct"],
         "delta_ppl_pct": r["delta_ppl_pct"], "agreement": r["agreement"]}
        for r in at_g if r["policy"] == "sere" and r["select_top_k"] == 2
        and r["min_batch"] == 1 and r["quantile"] is None and r["threshold"] == 0.0]
  return out


def grid_row(spec: PolicySpec, g: int, result: TeacherForced, ref_nll: np.ndarray,
             configs: Sequence[RerouteConfig]) -> dict[str, Any]:
  """The JSON row of one (spec, batch size g) teacher-forced evaluation against `none`'s
  NLL `ref_nll [N, L-1]`, with its per-layer configs; `ppl_delta_ci` is the paired
  bootstrap interval of `delta_ppl_pct` over sequences."""
  ppl = result.perplexity
  ref_ppl = float(np.exp(np.mean(ref_nll)))
  return {
      "spec": spec.text, "label": spec.label, "policy": spec.policy,
      "comparison_family": comparison_family(spec), "batch_size": g,
      "select_top_k": spec.select_top_k, "threshold": spec.threshold,
      "quantile": spec.quantile, "score_weight": spec.score_weight,
      "metric": spec.metric, "min_batch": spec.min_batch, "seed": spec.seed,
      "thresholds": [c.threshold for c in configs],
      "nll": float(np.mean(result.nll)), "perplexity": ppl,
      "delta_ppl_pct": 100.0 * (ppl / ref_ppl - 1.0),
      "ppl_delta_ci": list(metrics.paired_bootstrap_delta_ppl_ci(result.nll, ref_nll)),
      "agreement": result.agreement, "kl": result.kl,
      "distinct": result.distinct,
      "distinct_per_layer": [float(x) for x in result.distinct_per_layer],
      "stats_per_layer": {f: [float(x) for x in result.stats[:, j]]
                          for j, f in enumerate(generation.STAT_FIELDS)},
  }

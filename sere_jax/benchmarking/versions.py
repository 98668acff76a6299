"""Two code versions' decode results of one command, compared at equal distinct experts.

A decode step's time grows with the distinct experts it reads, and two versions may
route a little differently (other prompts, another tie-break), so rows of the same B
and policy are not comparable as they stand. `compare_decode` fits, per batch size, a
line through the old version's rows (ms per token, and GPU busy µs per step where the
rows were profiled, against distinct experts per layer) and reports each new row
against that line at its own distinct-expert count. Within one session the timed ms of
identical code can differ by a few % between processes while the profiled busy time
agrees within about 1 % (docs/kernels.md), so a verdict should rest on busy time where
both sides have it.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def _busy(row: dict[str, Any]) -> float | None:
  """The row's GPU busy µs per step; None without a profile or without GPU events (a
  profile taken on a CPU has none)."""
  profile = row.get("profile")
  return (profile.get("gpu_busy_us") or None) if profile else None


def _at(rows: Sequence[dict[str, Any]], value, distinct: float) -> float | None:
  """`value(row)` of the old rows, interpolated linearly in distinct experts (a
  least-squares line; one distinct count: only that count)."""
  points = [(r["distinct_experts"], value(r)) for r in rows if value(r) is not None]
  xs = {x for x, _ in points}
  if len(xs) >= 2:
    slope, intercept = np.polyfit(*zip(*points), 1)
    return float(slope * distinct + intercept)
  if xs and np.isclose(next(iter(xs)), distinct):
    return float(np.mean([y for _, y in points]))
  return None


def _change(new: float | None, old: float | None) -> float | None:
  return None if new is None or old is None else new / old - 1


def compare_decode(old: dict[str, Any], new: dict[str, Any]) -> list[dict[str, Any]]:
  """Per row of `new` whose batch size `old` also measured: `{batch, label,
  distinct_experts, ms_per_token, old_ms_at_distinct, ms_change, gpu_busy_us,
  old_busy_at_distinct, busy_change}` (changes as fractions; None where a side lacks
  the value). Raises ValueError when the two results are not decode results of one
  model and scale, or share no batch size."""
  for name, result in (("old", old), ("new", new)):
    if result.get("suite") != "decode" or not result.get("rows"):
      raise ValueError(f"the {name} file is not a decode-suite result with rows")
  if (old.get("model"), old.get("scale")) != (new.get("model"), new.get("scale")):
    raise ValueError(f"different models: old {old.get('model')} ({old.get('scale')}), "
                     f"new {new.get('model')} ({new.get('scale')})")
  old_by_batch: dict[int, list[dict[str, Any]]] = {}
  for row in old["rows"]:
    old_by_batch.setdefault(row["batch"], []).append(row)
  out = []
  for row in new["rows"]:
    base = old_by_batch.get(row["batch"])
    if not base:
      continue
    distinct = row["distinct_experts"]
    old_ms = _at(base, lambda r: r["ms_per_token"], distinct)
    old_busy = _at(base, _busy, distinct)
    out.append(dict(batch=row["batch"], label=row["label"], distinct_experts=distinct,
                    ms_per_token=row["ms_per_token"], old_ms_at_distinct=old_ms,
                    ms_change=_change(row["ms_per_token"], old_ms),
                    gpu_busy_us=_busy(row), old_busy_at_distinct=old_busy,
                    busy_change=_change(_busy(row), old_busy)))
  if not out:
    raise ValueError("the two results share no batch size")
  return out


def markdown(rows: Sequence[dict[str, Any]]) -> str:
  """`compare_decode`'s rows as a table."""
  pct = lambda v: "" if v is None else f"{v * 100:+.1f} %"
  num = lambda v, fmt: "" if v is None else format(v, fmt)
  lines = ["| B | policy | distinct | ms/token | old at same distinct | change | "
           "busy µs/step | old at same distinct | change |",
           "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(
        f"| {r['batch']} | {r['label']} | {r['distinct_experts']:.1f} | "
        f"{r['ms_per_token']:.3f} | {num(r['old_ms_at_distinct'], '.3f')} | "
        f"{pct(r['ms_change'])} | {num(r['gpu_busy_us'], '.0f')} | "
        f"{num(r['old_busy_at_distinct'], '.0f')} | {pct(r['busy_change'])} |")
  return "\n".join(lines) + "\n"

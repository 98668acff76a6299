r"""Merges benchmark JSON files from several machines into one report.

  python -m sere_jax.scripts.report DIR_OR_JSON... --out_dir=REPORT_DIR
  python -m sere_jax.scripts.report \
      --inputs='docs/benchmarks/kernels_h200.json,docs/benchmarks/decode_*.json' \
      --out_dir=docs/benchmarks

With arguments (`sere-report DIR...`): standard-suite results (`benchmark
--suite=standard`; a directory stands for its `standard_*.json`) of any set of devices,
side by side (`sere_jax.benchmarking.compare`): `<out_dir>/standard_report.md` with per
model, B and policy the ms per output token, the ratio to each device's own roofline and
the speedup over `none` per device, the MoE-layer sweep per device, and the plots
`standard_speedup_<model>.png` (speedup against B, one panel per device) and
`standard_kernels.png` (time per layer against distinct experts, one line per device).
Results of different suite versions, invalid (e.g. truncated) JSON and files of other
suites are refused with an error naming the file, before anything is written.

Without arguments, the results of every suite in `--inputs`: writes
`<out_dir>/README.md` (opening with the hand-written findings of `<out_dir>/summary.md`
and the cross-device table of the standard-suite results in `<out_dir>`, where there
are such; then per suite, one table per model / device, with the command and
environment of every input) and PNG plots next to it: for `decode`, the speedup
over policy `none` against batch size (one line per policy; one figure per model and
device); for `kernels`, our op's time against the number of distinct experts (one line
per batch size, the roofline dashed). Any subset of suites and devices may be present.
Every file is written atomically (temporary name, then rename); an existing
`<out_dir>/README.md` is replaced only with `--overwrite`.
"""

from __future__ import annotations

import collections
import glob
import json
import os
import re

from absl import app
from absl import flags

from sere_jax import cli
from sere_jax import fileio
from sere_jax.benchmarking import compare
from sere_jax.benchmarking import figures

_INPUTS = flags.DEFINE_list("inputs", ["docs/benchmarks/*.json"],
                            "Result JSON files or globs (comma separated).")
_OUT_DIR = flags.DEFINE_string("out_dir", "docs/benchmarks", "Where the report (README.md, "
                               "or standard_report.md) and its PNGs go.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing README.md (with "
                               "arguments: standard_report.md) and its plots in --out_dir.")


def expand(patterns) -> list[str]:
  paths = []
  for pattern in patterns:
    found = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
    for path in found:
      if path not in paths:
        paths.append(path)
  return paths


def load(paths) -> list[dict]:
  results = []
  for path in paths:
    result = fileio.read_json(path)
    if not isinstance(result, dict) or "suite" not in result or "rows" not in result:
      continue  # not a benchmark result
    if "env" not in result:
      continue  # no device measured it (the ep_model suite's model has its own report)
    result["_path"] = path
    results.append(result)
  return results


def _slug(text: str) -> str:
  return re.sub(r"[^a-z0-9]+", "_", str(text).lower()).strip("_")


def _device(result) -> str:
  env = result.get("env", {})
  return f"{env.get('device_kind', '?')} ({env.get('backend', '?')})"


def _fmt(value) -> str:
  if isinstance(value, float):
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
  return "" if value is None else str(value)


def _table(cols, rows) -> list[str]:
  lines = ["| " + " | ".join(c for c, _ in cols) + " |", "|" + "---|" * len(cols)]
  for row in rows:
    lines.append("| " + " | ".join(_fmt(row.get(key)) for _, key in cols) + " |")
  return lines


def _finish_figure(fig, ax, path: str) -> None:
  """Grid and legend, then the PNG written atomically; the figure is closed."""
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=7)
  fileio.write_atomic(path, figures.png_bytes(fig))


def decode_section(results, out_dir) -> tuple[list[str], list[str]]:
  groups = collections.defaultdict(list)
  for r in results:
    groups[(r["model"], r.get("scale", "full"), _device(r))].append(r)
  lines, pngs = ["## decode: whole-model decoding", "",
                 "Random bf16 weights at the model's configuration (`tiny`: the same "
                 "architecture shrunk), greedy decoding. ms/token: ours is one device-side "
                 "decode loop's time / its steps (median over repeats), transformers' the "
                 "median `generate()` step; roofline = bytes a step must read / copy "
                 "bandwidth of the same run; speedups are against `none` (ours) and "
                 "transformers `generate()` on the same device.", ""], []
  plt = figures.pyplot()
  for (model, scale, device), group in sorted(groups.items()):
    rows = [dict(row) for r in group for row in r["rows"]]
    base = {row["batch"]: row["ms_per_token"] for row in rows if row["label"] == "none"}
    for row in rows:  # across the group's files too (when runs were split by policy)
      if row.get("speedup_over_none") is None and row["batch"] in base:
        row["speedup_over_none"] = base[row["batch"]] / row["ms_per_token"]
    first = group[0]
    proto = first.get("protocol", {})
    lines += [f"### {model} ({scale}) on {device}", "",
              f"- prompt {proto.get('prompt_len')} tokens, {proto.get('new_tokens')} new, "
              f"impl {first.get('impl')}, copy bandwidth "
              + ", ".join(f"{r['copy_bandwidth_tbs'] * 1e3:.1f} GB/s" for r in group)]
    for r in group:
      peer = r.get("peer") or {}
      lines.append("- transformers peer: " + (peer.get("skipped") or ", ".join(
          f"{k} {v}" for k, v in (peer.get("env") or {}).items())))
    lines.append("")
    cols = [("B", "batch"), ("policy", "label"), ("ms/token", "ms_per_token"),
            ("tokens/s", "tokens_per_s"), ("distinct experts/layer", "distinct_experts"),
            ("roofline ms", "roofline_ms"), ("measured/roofline", "measured_over_roofline"),
            ("speedup vs none", "speedup_over_none")]
    if any("hf_ms_per_token" in row for row in rows):
      cols += [("HF ms/token", "hf_ms_per_token"), ("speedup vs HF", "speedup_over_hf")]
    rows = sorted(rows, key=lambda row: (row["batch"], row["label"] != "none", row["label"]))
    lines += _table(cols, rows) + [""]
    by_policy = collections.defaultdict(dict)
    for row in rows:
      if row.get("speedup_over_none") is not None:
        by_policy[row["label"]][row["batch"]] = row["speedup_over_none"]
    if by_policy:
      fig, ax = plt.subplots(figsize=(6, 4))
      for label, points in sorted(by_policy.items()):
        xs = sorted(points)
        ax.plot(xs, [points[x] for x in xs], marker="o",
                linestyle="--" if label == "none" else "-", label=label)
      figures.log2_x(ax)
      ax.set_xlabel("batch size (sequences)")
      ax.set_ylabel("speedup over none (time per output token)")
      ax.set_title(f"{model} ({scale}), {device}", fontsize=9)
      name = f"decode_{_slug(model)}_{_slug(scale)}_{_slug(device)}.png"
      _finish_figure(fig, ax, os.path.join(out_dir, name))
      pngs.append(name)
      lines += [f"![{model} {device}]({name})", ""]
  return lines, pngs


def kernels_section(results, out_dir) -> tuple[list[str], list[str]]:
  lines, pngs = ["## kernels: one MoE layer", "",
                 "µs per MoE layer at Qwen3-30B-A3B shapes (see scripts/benchmark.py); "
                 "`forced` rows use exactly `distinct` experts, `natural` rows uniform "
                 "routing under a policy.", ""], []
  plt = figures.pyplot()
  groups = collections.defaultdict(list)
  for r in results:
    groups[(json.dumps(r.get("shape"), sort_keys=True), _device(r))].append(r)
  for (shape, device), group in sorted(groups.items()):
    rows = [row for r in group for row in r["rows"]]
    impl = group[0].get("impl", "ours")
    lines += [f"### {device}, shape {shape}", ""]
    cols = [("B", "batch"), ("mode", "mode"), ("policy", "policy"), ("S", "select_top_k"),
            ("distinct", "distinct"), ("roofline µs", "roofline_us"),
            (f"{impl} µs", f"{impl}_us"), ("ours/roofline", "ours_over_roofline")]
    cols += [(f"{c[:-3]} µs", c) for c in ("ragged_dot_us", "xla_dense_us",
                                           "torch_grouped_mm_us")
             if any(c in row for row in rows)]
    lines += _table(cols, rows) + [""]
    forced = collections.defaultdict(list)
    for row in rows:
      if row.get("mode") == "forced" and f"{impl}_us" in row:
        forced[row["batch"]].append(row)
    if forced:
      fig, ax = plt.subplots(figsize=(6, 4))
      for batch, points in sorted(forced.items()):
        points.sort(key=lambda row: row["distinct"])
        line, = ax.plot([p["distinct"] for p in points], [p[f"{impl}_us"] for p in points],
                        marker="o", label=f"B={batch}")
        ax.plot([p["distinct"] for p in points], [p["roofline_us"] for p in points],
                linestyle=":", color=line.get_color())
      figures.log2_x(ax)
      ax.set_yscale("log")
      ax.set_xlabel("distinct experts")
      ax.set_ylabel(f"µs per layer ({impl}; dotted: roofline)")
      ax.set_title(f"MoE layer, {device}", fontsize=9)
      name = f"kernels_{_slug(device)}.png"
      _finish_figure(fig, ax, os.path.join(out_dir, name))
      pngs.append(name)
      lines += [f"![kernels {device}]({name})", ""]
  return lines, pngs


def generic_section(suite, results) -> list[str]:
  lines = [f"## {suite}", ""]
  for r in results:
    rows = r["rows"]
    cols = [(k, k) for k in (rows[0].keys() if rows else [])]
    lines += [f"### {_device(r)} ({os.path.basename(r['_path'])})", ""]
    lines += _table(cols, rows) + [""]
  return lines


# Hand-written findings that the per-suite README opens with, kept beside the results.
SUMMARY_NAME = "summary.md"


def _standard_results(out_dir: str) -> list[dict]:
  """The complete standard-suite results in `out_dir` (none if it holds none)."""
  try:
    return compare.load_results([out_dir])
  except FileNotFoundError:
    return []


def report(paths, out_dir) -> dict:
  """Writes README.md and the plots; returns {"readme": path, "pngs": [...]}."""
  results = load(paths)
  by_suite = collections.defaultdict(list)
  for r in results:
    by_suite[r["suite"]].append(r)
  lines = ["# Benchmarks", "",
           "Generated by `python -m sere_jax.scripts.report` from the JSON files below "
           f"(the findings from `{SUMMARY_NAME}` beside them); do not edit by hand.", ""]
  summary = os.path.join(out_dir, SUMMARY_NAME)
  if os.path.exists(summary):
    lines += [fileio.read_text(summary).strip(), ""]
  standard = _standard_results(out_dir)
  if standard:
    name = compare.REPORT_NAME
    lines += compare.summary_section(standard)
    lines += [f"Per model, B and policy, with each device's environment and the MoE-layer "
              f"sweep: [{name}]({name}) (`python -m sere_jax.scripts.report {out_dir} "
              f"--out_dir={out_dir}`). Below, the results of the single suites.", ""]
  lines += ["## Inputs", "",
            "| file | suite | device | backend | jax | model | command |",
            "|---|---|---|---|---|---|---|"]
  for r in results:
    env = r.get("env", {})
    command = r.get("command", "").replace("|", "\\|")
    lines.append(f"| {os.path.basename(r['_path'])} | {r['suite']} | "
                 f"{env.get('device_kind')} | {env.get('backend')} | {env.get('jax')} | "
                 f"{r.get('model', '')} {r.get('scale', '')} | `{command}` |")
  kinds = sorted({_device(r) for r in results})
  lines += ["", "Devices: " + (", ".join(kinds) if kinds else "none"), ""]
  pngs = []
  for suite in sorted(by_suite):
    if suite == "decode":
      section, new = decode_section(by_suite[suite], out_dir)
    elif suite == "kernels":
      section, new = kernels_section(by_suite[suite], out_dir)
    else:
      section, new = generic_section(suite, by_suite[suite]), []
    lines += section
    pngs += new
  readme = os.path.join(out_dir, "README.md")
  fileio.write_atomic(readme, ("\n".join(lines) + "\n").encode())
  return dict(readme=readme, pngs=[os.path.join(out_dir, p) for p in pngs],
              inputs=[r["_path"] for r in results])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    standard_report(argv[1:])
    return
  cli.check_outputs([os.path.join(_OUT_DIR.value, "README.md")], overwrite=_OVERWRITE.value,
                    flag="--out_dir")
  out = report(expand(_INPUTS.value), _OUT_DIR.value)
  print(f"wrote {out['readme']} and {len(out['pngs'])} plots from {len(out['inputs'])} "
        "inputs")


def standard_report(paths: list[str]) -> None:
  """Standard-suite results of several devices side by side in `--out_dir`."""
  if flags.FLAGS["inputs"].present:
    raise app.UsageError("give standard-suite results as arguments or other results "
                         "with --inputs, not both")
  cli.check_outputs([os.path.join(_OUT_DIR.value, compare.REPORT_NAME)],
                    overwrite=_OVERWRITE.value, flag="--out_dir")
  try:
    out = compare.write_report(paths, _OUT_DIR.value)
  except (OSError, ValueError) as err:
    raise app.UsageError(str(err)) from None
  print(f"wrote {out['report']} and {len(out['pngs'])} plots from "
        f"{len(out['inputs'])} results: " + ", ".join(out["inputs"]))


def run() -> None:
  """Entry point of `python -m sere_jax.scripts.report`."""
  cli.run(main)


if __name__ == "__main__":
  run()

"""Standard-suite results of several devices side by side (`report.py DIR...`).

`load_results` reads result files (or every `standard_*.json` of a directory) and
refuses, naming the file, anything that is not a standard-suite result, is not valid
JSON (a truncated file) or has another suite version than the others. `markdown` makes
one report: a cross-device summary (`summary_table`), the devices with their environment
and bandwidth probe, then per model a
table of B × policy with, per device, ms per output token, the ratio to that device's
own roofline and the speedup over `none`; then the MoE-layer sweep per B and routing,
µs per layer and the ratio to the roofline per device. `plots` draws the speedup over
`none` against B (one figure per model, one panel per device) and the time per layer
against distinct experts (one panel per batch size, one line per device, rooflines
dotted). `write_report` writes the report and its plots together, only once every
input has been read.
"""

from __future__ import annotations

import glob
import os
import re
from typing import Any, Sequence

from sere_jax import fileio
from sere_jax.benchmarking import figures
from sere_jax.benchmarking import report
from sere_jax.benchmarking import standard

REPORT_NAME = "standard_report.md"


def expand_inputs(paths: Sequence[str]) -> list[str]:
  """Files as given; a directory stands for its `standard_*.json` results (partial
  files, `*.partial.json`, left out). Raises FileNotFoundError naming a path that is
  missing or a directory without results."""
  files: list[str] = []
  for path in paths:
    if os.path.isdir(path):
      found = sorted(p for p in glob.glob(os.path.join(path, "standard_*.json"))
                     if not p.endswith(".partial.json"))
      if not found:
        raise FileNotFoundError(f"{path} holds no standard-suite result (standard_*.json)")
    elif os.path.exists(path):
      found = [path]
    else:
      raise FileNotFoundError(f"no file or directory {path}")
    files += [f for f in found if f not in files]
  return files


def load_results(paths: Sequence[str]) -> list[dict[str, Any]]:
  """The standard-suite results in `paths` (`expand_inputs`), each with `_path`.

  ValueError, naming the file, for invalid JSON (e.g. a truncated file), a result of
  another suite or without the fields of one, and for results of different suite
  versions (naming every file with its version)."""
  results = []
  for path in expand_inputs(paths):
    result = fileio.read_json(path)
    if not isinstance(result, dict) or result.get("suite") != standard.SUITE:
      suite = result.get("suite") if isinstance(result, dict) else None
      raise ValueError(f"{path} is not a standard-suite result (suite {suite!r}); "
                       "run `benchmark --suite=standard` to make one")
    missing = [k for k in ("suite_version", "plan", "env", "parts") if k not in result]
    if missing or "device_kind" not in (result.get("env") or {}):
      raise ValueError(f"{path} is not a complete standard-suite result (missing "
                       f"{missing or ['env.device_kind']})")
    result["_path"] = path
    results.append(result)
  if not results:
    raise ValueError("no standard-suite results given")
  versions = {r["suite_version"] for r in results}
  if len(versions) > 1:
    raise ValueError("cannot merge results of different standard-suite versions: " +
                     ", ".join(f"{r['_path']} (version {r['suite_version']})"
                               for r in results))
  return results


def device_labels(results: Sequence[dict[str, Any]]) -> list[str]:
  """One column label per result: the device, `[tiny]` for the tiny scale,
  `(partial)` for an unfinished run; the file's directory and name where two would be
  equal."""
  labels = []
  for r in results:
    label = r["env"]["device_kind"] + (" [tiny]" if r.get("scale") == "tiny" else "")
    labels.append(label + (" (partial)" if r.get("partial") else ""))
  equal = [labels.count(label) > 1 for label in labels]
  for i, r in enumerate(results):
    if equal[i]:
      path = os.path.abspath(r["_path"])
      where = os.path.join(os.path.basename(os.path.dirname(path)), os.path.basename(path))
      labels[i] = f"{labels[i]} ({where})"
  return labels


def _fmt(value: Any, digits: int = 3) -> str:
  if value is None:
    return ""
  if isinstance(value, float):
    return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:.0f}"
  return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
  return lines


def _slug(text: str) -> str:
  return re.sub(r"[^a-z0-9]+", "_", str(text).lower()).strip("_")


def _models(results) -> list[str]:
  order = list(standard.MODELS)
  found = {m for r in results for m in (r.get("decode") or {})}
  return [m for m in order if m in found] + sorted(found - set(order))


def _decode_rows(result, model) -> list[dict[str, Any]]:
  return ((result.get("decode") or {}).get(model) or {}).get("rows", [])


def _policy_order(results) -> list[str]:
  order: list[str] = []
  for r in results:
    for label in r.get("plan", {}).get("policies", []):
      if label not in order:
        order.append(label)
  return order


def _devices_section(results, labels) -> list[str]:
  rows = []
  for r, label in zip(results, labels):
    env, bw = r["env"], r.get("bandwidth") or {}
    backends = env.get("kernel_backends") or {}
    attention = sorted(set((backends.get("decode_attention") or {}).values()))

    def probe(key):
      b = bw.get(key)
      return f"{b['tbs']:.3g} (±{b['spread'] * 50:.0f} %)" if b else ""

    plan = r.get("plan") or {}
    batches = len(plan.get("batches", []))
    done, total = len(r["parts"]), 1 + batches + batches * len(plan.get("models", []))
    rows.append([label, env.get("backend"), env.get("driver") or env.get("platform_version"),
                 f"{env.get('jax')} / {env.get('jaxlib')}", r.get("scale"), probe("read"),
                 probe("copy"), bw.get("spec_peak_tbs"), backends.get("moe_ffn"),
                 ", ".join(attention),
                 f"{done}/{total}", os.path.basename(r["_path"]),
                 "`" + str(r.get("command", "")).replace("|", "\\|") + "`"])
  lines = ["## Devices", "", "Read and copy bandwidth: the probe's median of its repeats "
           "in TB/s (± half its spread over the repeats, relative to the median); every "
           "roofline of a device divides by its own probe. Spec: the datasheet bandwidth "
           "(`bandwidth.SPEC_PEAK_TBS`).", ""]
  lines += _table(["device", "backend", "driver / platform", "jax / jaxlib", "scale",
                   "read TB/s", "copy TB/s", "spec TB/s", "MoE op", "attention", "parts",
                   "file", "command"], rows)
  notes = sorted({r["scale_note"] for r in results if r.get("scale_note")})
  return lines + [""] + [f"- {n}" for n in notes] + ([""] if notes else [])


def _decode_section(results, labels, pngs) -> list[str]:
  lines = []
  policies = _policy_order(results)
  for model in _models(results):
    by_device = [{(row["batch"], row["label"]): row for row in _decode_rows(r, model)}
                 for r in results]
    keys = sorted({k for rows in by_device for k in rows},
                  key=lambda k: (k[0], policies.index(k[1]) if k[1] in policies else 99,
                                 k[1]))
    # Against the datasheet bandwidth too, where the device's is known.
    spec = [report.spec_over_copy(r) for r in results]
    header = ["B", "policy"]
    for label, s in zip(labels, spec):
      header += [f"{label} ms/token", "× roofline"] + (["× spec"] if s else []) + [
          "speedup"]
    table = []
    for key in keys:
      cells: list[Any] = [key[0], key[1]]
      for rows, s in zip(by_device, spec):
        row = rows.get(key) or {}
        ratio = row.get("measured_over_roofline")
        cells += [row.get("ms_per_token"), ratio]
        if s:
          cells.append(None if ratio is None else ratio * s)
        cells.append(row.get("speedup_over_none"))
      table.append(cells)
    lines += [f"## Decode: {model}", "",
              "ms per output token (a decode loop's time / its steps); × roofline: that "
              "time over the device's own roofline (bytes a step reads / its copy "
              "bandwidth); " + ("× spec: over the roofline at the datasheet bandwidth; "
                                 if any(spec) else "") +
              "speedup: `none`'s time at the same B / the policy's.", ""]
    lines += _table(header, table) + [""]
    name = f"standard_speedup_{_slug(model)}.png"
    if name in pngs:
      lines += [f"![speedup over none, {model}]({name})", ""]
  return lines


SUMMARY_POLICIES = ("sere:2:0", "sere:1:0")


def summary_table(results: Sequence[dict[str, Any]]) -> list[str]:
  """The cross-device table: per model and B, for each device `none`'s ms per token
  and its ratio to that device's roofline, and the speedup of SERE S=2 and S=1 over
  `none` (`SUMMARY_POLICIES`). Markdown lines; the report opens with it
  (`summary_section`), and so does the per-suite README of a directory holding
  standard-suite results."""
  labels = device_labels(results)
  header = ["model", "B"]
  for label in labels:
    header += [f"{label} none ms", "× roofline"] + [f"{p} speedup"
                                                     for p in SUMMARY_POLICIES]
  table = []
  for model in _models(results):
    by_device = [{(row["batch"], row["label"]): row for row in _decode_rows(r, model)}
                 for r in results]
    for batch in sorted({b for rows in by_device for b, _ in rows}):
      cells: list[Any] = [model, batch]
      for rows in by_device:
        none = rows.get((batch, "none")) or {}
        cells += [none.get("ms_per_token"), none.get("measured_over_roofline")]
        cells += [(rows.get((batch, p)) or {}).get("speedup_over_none")
                  for p in SUMMARY_POLICIES]
      table.append(cells)
  return _table(header, table)


def summary_section(results: Sequence[dict[str, Any]]) -> list[str]:
  """`summary_table` under its heading and a sentence on what it shows."""
  return ["## Across devices", "",
          "Per model and batch size B: `none`'s ms per output token, its ratio to the "
          "device's own roofline (bytes a step reads / the probed copy bandwidth), and "
          "how many times faster SERE with S = 2 and S = 1 (ρ = 0) decodes than `none` "
          "on the same device.", ""] + summary_table(results) + [""]


def _kernel_key(row) -> tuple:
  forced = row["mode"] == "forced"
  return (row["batch"], 0 if forced else 1, row["policy"], row["select_top_k"],
          round(row["distinct"]) if forced else 0)


def _kernels_section(results, labels, pngs) -> list[str]:
  by_device = [{_kernel_key(row): row for row in (r.get("kernels") or {}).get("rows", [])}
               for r in results]
  keys = sorted({k for rows in by_device for k in rows})
  if not keys:
    return []
  peers = [(r.get("plan") or {}).get("kernel_peers") or [] for r in results]
  header = ["B", "routing"]
  for label, names in zip(labels, peers):
    header += [f"{label} distinct", "µs/layer", "× roofline"] + [f"{p} µs" for p in names]
  table = []
  for key in keys:
    batch, natural, policy, s, n = key
    routing = (f"forced {n}" if not natural else policy if policy == "none"
               else f"{policy} S={s}")
    cells: list[Any] = [batch, routing]
    for r, rows, names in zip(results, by_device, peers):
      row = rows.get(key) or {}
      impl = (r.get("kernels") or {}).get("impl")
      cells += [row.get("distinct"), row.get(f"{impl}_us"), row.get("ours_over_roofline")]
      cells += [row.get(f"{p}_us") for p in names]
    table.append(cells)
  shapes = "; ".join(f"{label}: {(r.get('kernels') or {}).get('shape')}"
                     for r, label in zip(results, labels) if r.get("kernels"))
  lines = ["## MoE layer: time per layer against distinct experts", "",
           "One MoE layer (gate+up, SwiGLU, down, combine) inside one jit over a chain "
           "of layers with different weights, chain update subtracted; `forced n` uses "
           "exactly n experts, the other rows natural (uniform) routing under a policy; "
           "× roofline: the time over distinct experts × bytes per expert / the "
           "device's read bandwidth; `<peer> µs`: the same layer with the MoE op's "
           f"implementation `<peer>`. Shapes: {shapes}.", ""]
  lines += _table(header, table) + [""]
  if "standard_kernels.png" in pngs:
    lines += ["![time per layer against distinct experts](standard_kernels.png)", ""]
  return lines


def markdown(results: Sequence[dict[str, Any]], pngs: Sequence[str] = (),
             title: str = "Standard suite") -> str:
  """The report of `results` (`load_results`); `pngs` are the plot file names
  (`plots`) to link."""
  labels = device_labels(results)
  version = results[0].get("suite_version")
  if len(results) == 1:
    intro = (f"Made by `{results[0].get('command')}` (standard suite, version {version}); "
             "`python -m sere_jax.scripts.report DIR...` puts it beside other devices' "
             "results.")
  else:
    intro = (f"Standard-suite results (suite version {version}) of {len(results)} runs "
             "side by side, made by `python -m sere_jax.scripts.report` from the files "
             "named below.")
  lines = [f"# {title}", "", intro, ""]
  lines += summary_section(results)
  lines += _devices_section(results, labels)
  lines += _decode_section(results, labels, pngs)
  lines += _kernels_section(results, labels, pngs)
  return "\n".join(lines).rstrip("\n") + "\n"


def plots(results: Sequence[dict[str, Any]]) -> dict[str, bytes]:
  """`{file name: PNG bytes}`: `standard_speedup_<model>.png` per model and
  `standard_kernels.png` (see the module docstring); needs matplotlib."""
  plt = figures.pyplot()
  labels = device_labels(results)
  out = {}
  policies = _policy_order(results)
  for model in _models(results):
    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.6),
                             sharey=True, squeeze=False)
    for ax, r, label in zip(axes[0], results, labels):
      by_policy: dict[str, dict[int, float]] = {}
      for row in _decode_rows(r, model):
        if row["label"] != "none" and row.get("speedup_over_none") is not None:
          by_policy.setdefault(row["label"], {})[row["batch"]] = row["speedup_over_none"]
      for policy in sorted(by_policy, key=lambda p: policies.index(p)
                           if p in policies else 99):
        xs = sorted(by_policy[policy])
        ax.plot(xs, [by_policy[policy][x] for x in xs], marker="o", label=policy)
      ax.axhline(1.0, color="gray", linestyle="--", linewidth=0.8)
      figures.log2_x(ax)
      ax.set_xlabel("batch size B")
      ax.set_title(label, fontsize=8)
      ax.grid(True, alpha=0.3)
      if by_policy:
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("speedup over none (time per token)")
    fig.suptitle(model, fontsize=10)
    out[f"standard_speedup_{_slug(model)}.png"] = figures.png_bytes(fig)
  batches = sorted({row["batch"] for r in results
                    for row in (r.get("kernels") or {}).get("rows", [])
                    if row["mode"] == "forced"})
  if batches:
    fig, axes = plt.subplots(1, len(batches), figsize=(4.2 * len(batches), 3.6),
                             squeeze=False)
    for ax, batch in zip(axes[0], batches):
      for r, label in zip(results, labels):
        impl = (r.get("kernels") or {}).get("impl")
        points = sorted((row["distinct"], row[f"{impl}_us"], row["roofline_us"])
                        for row in (r.get("kernels") or {}).get("rows", [])
                        if row["mode"] == "forced" and row["batch"] == batch)
        if not points:
          continue
        line, = ax.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                        label=label)
        ax.plot([p[0] for p in points], [p[2] for p in points], linestyle=":",
                color=line.get_color())
      figures.log2_x(ax)
      ax.set_yscale("log")
      ax.set_xlabel("distinct experts")
      ax.set_title(f"B = {batch}", fontsize=9)
      ax.grid(True, alpha=0.3)
      ax.legend(fontsize=7)
    axes[0][0].set_ylabel("µs per MoE layer (dotted: roofline)")
    out["standard_kernels.png"] = figures.png_bytes(fig)
  return out


def write_report(paths: Sequence[str], out_dir: str, *, with_plots: bool = True
                 ) -> dict[str, Any]:
  """Reads every input (`load_results`; nothing is written if one is refused), then
  writes `<out_dir>/standard_report.md` and its plots in one `fileio.write_all_atomic`.
  Returns `{"report": path, "pngs": [paths], "inputs": [paths]}`."""
  results = load_results(paths)
  images = plots(results) if with_plots else {}
  report = os.path.join(out_dir, REPORT_NAME)
  files: dict[str, str | bytes] = {report: markdown(results, list(images))}
  files.update({os.path.join(out_dir, name): data for name, data in images.items()})
  fileio.write_all_atomic(files)
  return dict(report=report, pngs=[os.path.join(out_dir, n) for n in images],
              inputs=[r["_path"] for r in results])

"""Benchmark results as reports: `speedup_over_none` per decode row (`add_speedups`),
several result files of one suite and device merged into one (`merge_results`, e.g. runs
over different batch sizes), and the Markdown of a result of any suite (`markdown`:
the device, command and measured bandwidths, then one table; for `decode`, the
protocol and the transformers peer first, `decode_markdown_rows`).
"""

from __future__ import annotations

import json
from typing import Any, Sequence


def add_speedups(rows: Sequence[dict[str, Any]]) -> None:
  """`speedup_over_none` per row: time per token of `none` at its batch / its own."""
  base = {r["batch"]: r["ms_per_token"] for r in rows if r["label"] == "none"}
  for r in rows:
    if r["batch"] in base:
      r["speedup_over_none"] = base[r["batch"]] / r["ms_per_token"]


def spec_over_copy(result: dict[str, Any]) -> float | None:
  """The datasheet bandwidth over the probed copy bandwidth of a result (which turns a
  ratio to the roofline into one to the roofline at the datasheet figure), or None
  where the result's probe does not know the device's datasheet figure."""
  bw = result.get("bandwidth") or {}
  if not bw.get("spec_peak_tbs") or "copy" not in bw:
    return None
  return bw["spec_peak_tbs"] / bw["copy"]["tbs"]


def decode_markdown_rows(result: dict[str, Any]) -> list[str]:
  """The decode suite's protocol lines and table (for `markdown`); where the datasheet
  bandwidth is known, a `measured_over_spec` column beside `measured_over_roofline`."""
  spec = spec_over_copy(result)
  cols = ["batch", "label", "ms_per_token", "tokens_per_s", "distinct_experts",
          "roofline_ms", "measured_over_roofline",
          *(["measured_over_spec"] if spec else []), "speedup_over_none"]
  devices = result.get("expert_devices", 1)
  if devices > 1:
    cols.insert(5, "max_device_distinct")
  if any("hf_ms_per_token" in r for r in result["rows"]):
    cols += ["hf_ms_per_token", "speedup_over_hf"]
  proto = result["protocol"]
  peer = result.get("peer") or {}
  lines = [f"- model: {result['model']} ({result['scale']}), impl {result['impl']}, "
           f"attention {result.get('attention_impl', 'xla')}, "
           f"prompt {proto['prompt_len']}, new tokens {proto['new_tokens']}, "
           f"{result['bytes']['param_bytes'] / 1e9:.2f} GB of bf16 parameters",
           f"- bandwidth measured in this run: copy {result['copy_bandwidth_tbs'] * 1e3:.1f} "
           f"GB/s, read {result['read_bandwidth_tbs'] * 1e3:.1f} GB/s"
           + (f"; datasheet {result['bandwidth']['spec_peak_tbs'] * 1e3:.0f} GB/s" if spec
              else ""),
           "- transformers peer: " + (peer.get("skipped") or json.dumps(peer.get("env"))),
           *([f"- experts sharded over {devices} devices (expert parallelism): the roofline "
              "is one device's bytes (replicated weights, its KV cache, the busiest "
              "device's experts)"] if devices > 1 else []),
           "", "Time per output token is a decode loop's time / its steps (median over repeats; "
           "the transformers peer: its median step); the roofline is the bytes "
           "a step must read over the copy bandwidth"
           + (" (`measured_over_spec`: over the datasheet bandwidth)." if spec else "."), "",
           "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  for r in result["rows"]:
    if spec:
      r = dict(r, measured_over_spec=r["measured_over_roofline"] * spec)
    cells = [f"{r[c]:.3f}" if isinstance(r.get(c), float) else str(r.get(c, ""))
             for c in cols]
    lines.append("| " + " | ".join(cells) + " |")
  return lines


def merge_results(paths: Sequence[str]) -> dict[str, Any]:
  """Concatenates the rows of several result files of one suite and device."""
  results = []
  for path in paths:
    with open(path) as fh:
      results.append(json.load(fh))
  first = results[0]
  for other in results[1:]:
    for key in ("suite", "shape", "model", "scale"):
      if other.get(key) != first.get(key):
        raise ValueError(f"cannot merge results with different {key}: {paths}")
    if other["env"]["device_kind"] != first["env"]["device_kind"]:
      raise ValueError(f"cannot merge results from different devices: {paths}")
  merged = dict(first)
  merged["rows"] = [row for r in results for row in r["rows"]]
  if first["suite"] == "decode":  # `none` and the other policies may come from two runs
    add_speedups(merged["rows"])
  merged["commands"] = [r["command"] for r in results]
  merged["command"] = " ; ".join(merged["commands"])
  merged["runs"] = [{k: r.get(k) for k in ("command", "read_bandwidth_tbs",
                                           "copy_bandwidth_tbs", "seconds", "torch_env",
                                           "peer", "partial")} for r in results]
  return merged


def markdown(result: dict[str, Any], command: str) -> str:
  """The Markdown report of one result (or of a merged one)."""
  env = result["env"]
  lines = [f"# Benchmark: {result['suite']}", "",
           f"- device: {env['device_kind']} ({env['backend']}), jax {env['jax']}",
           f"- command: `{command}`"]
  for run in result.get("runs", []):
    lines.append(f"- run: read bandwidth {run['read_bandwidth_tbs']:.2f} TB/s, copy "
                 f"{run['copy_bandwidth_tbs']:.2f} TB/s, {run.get('seconds') or 0:.0f} s"
                 + (f", torch {run['torch_env']['torch']}" if run.get("torch_env") else ""))
  if "read_bandwidth_tbs" in result and "runs" not in result:
    lines.append(f"- measured read bandwidth {result['read_bandwidth_tbs']:.2f} TB/s"
                 + (f", copy {result['copy_bandwidth_tbs']:.2f} TB/s"
                    if "copy_bandwidth_tbs" in result else ""))
  lines.append("")
  rows = result["rows"]
  if result["suite"] == "decode":
    return "\n".join(lines + decode_markdown_rows(result)) + "\n"
  if result["suite"] == "kernels":
    impl = result["impl"]
    cols = ["batch", "mode", "policy", "select_top_k", "distinct", "roofline_us",
            f"{impl}_us", "ours_over_roofline", "routing_schedule_us"]
    cols += [c for c in ("ragged_dot_us", "xla_dense_us", "torch_grouped_mm_us")
             if any(c in r for r in rows)]
    lines.append("Times are µs per MoE layer (gate+up, SwiGLU, down, combine), chain "
                 "update subtracted.")
  else:
    cols = list(dict.fromkeys(k for r in rows for k in r))  # rows may differ (`error`)
  lines += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  for r in rows:
    cells = [f"{r[c]:.2f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"

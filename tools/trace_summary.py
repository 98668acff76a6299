"""Summarises the GPU kernels of a `jax.profiler` Perfetto trace.

    python tools/trace_summary.py TRACE_DIR [STEPS] > summary.json

Finds `*.trace.json.gz` under TRACE_DIR, takes every complete event ("ph": "X") of the
GPU device processes, and prints per kernel name: count, total and mean microseconds,
plus the busy time and the wall span of all GPU events, each divided by STEPS (default 1)
so that a trace of N decode steps reads per step.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import sys


def summarize(trace_dir: str, steps: int = 1) -> dict:
  paths = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
  if not paths:
    raise FileNotFoundError(f"no *.trace.json.gz under {trace_dir}")
  with gzip.open(sorted(paths)[-1]) as fh:
    events = json.load(fh)["traceEvents"]
  names = {e["pid"]: e["args"]["name"] for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  gpu = {pid for pid, name in names.items() if "GPU" in name or "gpu" in name}
  kernels = collections.defaultdict(lambda: [0, 0.0])
  starts, ends, busy = [], [], 0.0
  for e in events:
    if e.get("ph") != "X" or e.get("pid") not in gpu:
      continue
    k = kernels[e["name"][:120]]
    k[0] += 1
    k[1] += float(e.get("dur", 0))
    busy += float(e.get("dur", 0))
    starts.append(float(e["ts"]))
    ends.append(float(e["ts"]) + float(e.get("dur", 0)))
  top = sorted(kernels.items(), key=lambda kv: -kv[1][1])
  return dict(
      processes=names, gpu_events=sum(c for c, _ in kernels.values()) / steps,
      gpu_busy_us=busy / steps,
      gpu_span_us=(max(ends) - min(starts)) / steps if starts else 0.0,
      kernels=[dict(name=n, count=c / steps, total_us=t / steps, mean_us=t / max(c, 1))
               for n, (c, t) in top[:60]])


if __name__ == "__main__":
  print(json.dumps(summarize(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 1),
                   indent=1))

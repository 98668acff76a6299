"""Kernel lists from `jax.profiler` traces (where a decode step's GPU time goes).

    with profiling.trace(directory):
      run_steps()
    summary = profiling.summarize_trace(directory, steps=31)

`summarize_trace` reads the Perfetto trace the profiler writes and sums the complete
events of the device processes per kernel name and per kernel *group*: the name with
XLA's numeric suffixes removed (`sort_141_1` and `sort_96_1` are both `sort`,
`gemm_fusion_dot_914` is `gemm_fusion_dot`), so a 48-layer model's per-layer kernels
add up under one entry. Profiling launches kernels one by one (no command buffers), so
the busy time is a breakdown, not the step time.
"""

from __future__ import annotations

import collections
import contextlib
import glob
import gzip
import json
import os
import re
from typing import Any, Iterator

import jax

_SUFFIX = re.compile(r"(_\d+)+$")


def kernel_group(name: str) -> str:
  """`name` without trailing `_<digits>` parts (`loop_add_fusion_94` -> `loop_add_fusion`)."""
  return _SUFFIX.sub("", name)


@contextlib.contextmanager
def trace(directory: str) -> Iterator[None]:
  """Records a `jax.profiler` trace (with its Perfetto JSON) of the block into `directory`."""
  jax.profiler.start_trace(directory, create_perfetto_trace=True)
  try:
    yield
  finally:
    jax.profiler.stop_trace()


def _latest_trace(directory: str) -> str:
  paths = glob.glob(os.path.join(directory, "**", "*.trace.json.gz"), recursive=True)
  if not paths:
    raise FileNotFoundError(f"no *.trace.json.gz under {directory}")
  return max(paths, key=os.path.getmtime)


def summarize_trace(directory: str, steps: int = 1, top: int = 40) -> dict[str, Any]:
  """Per-step GPU kernel time of the newest trace under `directory`.

  Returns `gpu_events`, `gpu_busy_us`, `gpu_span_us` (first start to last end) and the
  `top` largest `groups` and `kernels`, each `{name, count, total_us, mean_us}`; counts
  and totals are divided by `steps`.
  """
  if steps < 1:
    raise ValueError(f"steps must be >= 1, got {steps}")
  with gzip.open(_latest_trace(directory)) as fh:
    events = json.load(fh)["traceEvents"]
  processes = {e["pid"]: e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "process_name"}
  devices = {pid for pid, name in processes.items() if "gpu" in name.lower()}
  kernels: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
  starts, ends = [], []
  for e in events:
    if e.get("ph") != "X" or e.get("pid") not in devices:
      continue
    duration = float(e.get("dur", 0))
    entry = kernels[e["name"][:120]]
    entry[0] += 1
    entry[1] += duration
    starts.append(float(e["ts"]))
    ends.append(float(e["ts"]) + duration)
  groups: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
  for name, (count, total) in kernels.items():
    group = groups[kernel_group(name)]
    group[0] += count
    group[1] += total

  def table(entries):
    largest = sorted(entries.items(), key=lambda kv: -kv[1][1])[:top]
    return [dict(name=n, count=c / steps, total_us=t / steps, mean_us=t / max(c, 1))
            for n, (c, t) in largest]

  return dict(
      gpu_events=sum(c for c, _ in kernels.values()) / steps,
      gpu_busy_us=sum(t for _, t in kernels.values()) / steps,
      gpu_span_us=(max(ends) - min(starts)) / steps if starts else 0.0,
      groups=table(groups), kernels=table(kernels))

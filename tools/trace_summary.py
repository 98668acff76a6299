"""Summarises the GPU kernels of a `jax.profiler` Perfetto trace.

    python tools/trace_summary.py TRACE_DIR [STEPS] > summary.json

Per-step kernel and kernel-group times of the newest trace under TRACE_DIR
(`sere_jax.profiling.summarize_trace`; divide by STEPS, default 1, to read per step).
"""

from __future__ import annotations

import json
import sys

from sere_jax import profiling

if __name__ == "__main__":
  print(json.dumps(profiling.summarize_trace(
      sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 1), indent=1))

"""Repeats the MoE-layer sweep's cases in one process: a slow compile or a slow moment?

    python tools/kernel_sweep_repeats.py OUT.json [SWEEPS] [BATCHES] [SCALE]

The standard suite times each MoE-layer case once (`benchmarking.kernels.KernelSweep`,
the median of five timed spans of at least 30 ms each). To see where a reading's spread
comes from, this tool builds SWEEPS fresh sweeps (default 3; each with new weight
buffers and newly compiled chains) and times each sweep's cases three times in a row at
every batch size of BATCHES (default 1,64): 8 forced experts, then the natural
policies (`none`, SERE S = 1, S = 2). If the repeats of one sweep differ as much as the
sweeps do, a reading varies per timing call, not per compile or allocation. SCALE is a
`kernels.SCALES` name (default `full`, Qwen3-30B-A3B's layer; `tiny` runs anywhere).
The JSON holds every reading: our op's and the routing + schedule's µs per layer.
"""

from __future__ import annotations

import sys

from sere_jax import benchmarking
from sere_jax import fileio
from sere_jax.benchmarking import kernels

REPEATS, LAYERS, FORCED = 3, 8, (8,)


def main(argv: list[str]) -> None:
  out_path = argv[1]
  sweeps = int(argv[2]) if len(argv) > 2 else 3
  batches = [int(b) for b in (argv[3] if len(argv) > 3 else "1,64").split(",")]
  scale = argv[4] if len(argv) > 4 else "full"
  if scale not in kernels.SCALES:
    raise ValueError(f"SCALE must be one of {sorted(kernels.SCALES)}, got {scale!r}")
  if sweeps < 1 or any(b < 1 for b in batches):
    raise ValueError(f"SWEEPS and BATCHES must be positive, got {sweeps} and {batches}")
  fileio.check_writable(out_path, overwrite=True)
  readings = []
  for sweep_index in range(sweeps):
    sweep = kernels.KernelSweep(kernels.SCALES[scale], layers=LAYERS)
    for repeat in range(REPEATS):
      for batch in batches:
        # The bandwidth only scales the rows' roofline ratios, which are not kept.
        rows, _ = sweep.run_batch(batch, distinct=FORCED, peers=[], read_bandwidth=1.0)
        readings += [dict(sweep=sweep_index, repeat=repeat, batch=batch,
                          case=f"{row['mode']} {row['policy']} S={row['select_top_k']}",
                          ours_us=row[f"{sweep.impl}_us"],
                          routing_schedule_us=row["routing_schedule_us"]) for row in rows]
        print(sweep_index, repeat, batch,
              [round(r["ours_us"], 1) for r in readings[-len(rows):]], flush=True)
  fileio.write_json_atomic(out_path, dict(
      command="python tools/kernel_sweep_repeats.py " + " ".join(argv[1:]),
      env=benchmarking.environment(), impl=sweep.impl, readings=readings), compact=True)


if __name__ == "__main__":
  main(sys.argv)

"""Per-layer kernel times of a profiled decode run, against the bytes they read.

    python tools/decode_layer_costs.py DECODE_JSON OUT.json [CODE]

DECODE_JSON is a decode-suite result whose rows carry profiles (`benchmark
--suite=decode --profile_dir=...`, e.g. `docs/benchmarks/decode_h200.json`). OUT.json
gets `sere_jax.benchmarking.layer_costs.layer_costs` of it (each profiled row's kernels
per layer, µs per layer per kernel, the step split into the grouped matmuls and the
rest, each against its bytes at the run's read bandwidth, and the grouped matmuls'
straight-line fits against the distinct experts), with the run's command, environment
and CODE (what code the run measured, e.g. "commit 57be558", which the decode result
does not record). Runs on any machine: it only reads the JSON.
"""

from __future__ import annotations

import json
import shlex
import sys

from sere_jax import fileio
from sere_jax.benchmarking import layer_costs


def main(argv: list[str]) -> None:
  if len(argv) not in (3, 4):
    raise SystemExit(__doc__)
  source, out_path = argv[1:3]
  fileio.check_writable(out_path, overwrite=True)
  with open(source, encoding="utf-8") as fh:
    result = json.load(fh)
  costs = layer_costs.layer_costs(result)
  fileio.write_json_atomic(out_path, dict(
      what="Per-layer costs of the profiled rows of " + source
           + " (sere_jax.benchmarking.layer_costs; profiled steps launch kernels one "
             "by one, without command buffers)",
      command="python tools/decode_layer_costs.py " + shlex.join(argv[1:]),
      run_command=result.get("command"), env=result.get("env"),
      code=argv[3] if len(argv) > 3 else None, **costs), compact=True)


if __name__ == "__main__":
  main(sys.argv)

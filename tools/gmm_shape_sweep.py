"""Times the Triton grouped matmul's streaming rate against the weight's shape, on a GPU.

    python tools/gmm_shape_sweep.py OUT.json [LAYERS] [SHAPES] [TILINGS]

Qwen3-30B-A3B's down projection (`[E, 768, 2048]`) streams below its gate/up projection
(`[E, 2048, 1536]`) on an H200. This tool asks whether the weight's row stride (a power
of two for the down weight, 4 KiB) or its contraction depth sets that rate. For weights
`[128, K, N]` of the shapes in `SHAPES`, among them the down weight with 1536 to 2176
columns and padded down weights whose first 2048 columns are computed (`num_cols`), it
times the kernel with the tuned table (`tiles.TILES`) and with one K split, on
expert-sorted rows (8 per token) at B = 16 and 64, over exactly 8, 26, 77 and 128
distinct experts, each in a chain of LAYERS weight sets (default 6) inside one jitted
loop, as the tile sweep times a layer (`gmm_sweep.seconds_per_layer`, less the chain's
update). A straight line through the four counts per (shape, B, tiling) gives the time
per expert (`us_per_expert`) and so the rate at which the kernel streams the computed
columns' bytes (`slope_tbs`); the rows' own rates include the fixed part. The JSON also
holds the 4 GiB read probe (`read_tbs`). SHAPES (comma-separated names, default all)
and TILINGS (a JSON list of overrides of the table, as `benchmark --gmm_variants`
takes; default the table and one K split) narrow or widen the sweep; a tiling given
there is named by its JSON.
"""

from __future__ import annotations

import functools
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from sere_jax import benchmarking
from sere_jax import fileio
from sere_jax.benchmarking import bandwidth
from sere_jax.benchmarking import gmm_sweep
from sere_jax.kernels.gmm import tiles
from sere_jax.kernels.gmm.triton import gmm_triton

EXPERTS, TOP_K, BATCHES, DISTINCT = 128, 8, (16, 64), (8, 26, 77, 128)
MIN_SECONDS = 0.03  # per timed span, as `LayerChain` times by default
SHAPES = (  # name, K, N, columns computed (None: all)
    ("down_768x2048", 768, 2048, None),
    ("down_pad2176_valid2048", 768, 2176, 2048),
    ("gu_2048x1536", 2048, 1536, None),
    ("down_768x1536", 768, 1536, None),
    ("gu_2048x2048", 2048, 2048, None),
    ("down_768x2176", 768, 2176, None),
    ("down_pad2112_valid2048", 768, 2112, 2048),
    ("down_768x1920", 768, 1920, None),
    ("gu_2048x1664", 2048, 1664, None),
    ("k1536_2048", 1536, 2048, None),
)
VARIANTS = (("table", {}), ("ks1", dict(k_splits=1)))


def fits(rows: list[dict], variants=VARIANTS) -> list[dict]:
  """Per (shape, batch, tiling) with three or more counts: `us = fixed + per_expert * n`."""
  out = []
  for name, contract, width, cols in SHAPES:
    for batch in BATCHES:
      for variant, _ in variants:
        points = [(r["distinct"], r["us"]) for r in rows
                  if (r["shape"], r["batch"], r["variant"]) == (name, batch, variant)]
        if len(points) < 3:
          continue
        slope, intercept = np.polyfit(*np.array(points).T, 1)
        out.append(dict(shape=name, batch=batch, variant=variant, fixed_us=intercept,
                        us_per_expert=slope,
                        slope_tbs=contract * (cols or width) * 2 / (slope * 1e-6) / 1e12))
  return out


def main(argv: list[str]) -> None:
  out_path = argv[1]
  layers = int(argv[2]) if len(argv) > 2 else 6
  if layers < 1:
    raise ValueError(f"LAYERS must be positive, got {layers}")
  names = argv[3].split(",") if len(argv) > 3 and argv[3] else [s[0] for s in SHAPES]
  unknown = sorted(set(names) - {s[0] for s in SHAPES})
  if unknown:
    raise ValueError(f"unknown shapes {unknown}; known: {[s[0] for s in SHAPES]}")
  variants = VARIANTS
  if len(argv) > 4:
    variants = tuple((json.dumps(v, sort_keys=True), v)
                     for v in tiles.parse_overrides(argv[4]))
  fileio.check_writable(out_path, overwrite=True)
  read_tbs = bandwidth.probe(4 << 30)["read"]["tbs"]
  rng = np.random.default_rng(0)
  rows = []
  for name, contract, width, cols in SHAPES:
    if name not in names:
      continue
    keys = jax.random.split(jax.random.PRNGKey(contract * 7 + width), layers)
    weights = [jax.random.normal(key, (EXPERTS, contract, width), jnp.bfloat16)
               * contract ** -0.5 for key in keys]
    for batch in BATCHES:
      lhs = jax.random.normal(jax.random.PRNGKey(batch), (batch * TOP_K, contract),
                              jnp.bfloat16)
      x = jax.random.normal(jax.random.PRNGKey(batch + 1), (batch, 2048), jnp.bfloat16)
      overhead = benchmarking.chain_overhead(x, layers)
      for n in DISTINCT:
        scheds = gmm_sweep.forced_schedules(rng, batch, TOP_K, EXPERTS, n, layers)
        layer_args = [(s.group_offsets, None, w, lhs) for s, w in zip(scheds, weights)]
        for variant, override in variants:
          kernel = functools.partial(gmm_triton, num_cols=cols,
                                     **dict(tiles.TILES, **override))
          seconds = gmm_sweep.seconds_per_layer(kernel, x, layer_args,
                                                min_seconds=MIN_SECONDS) - overhead
          rows.append(dict(shape=name, K=contract, N=width, batch=batch, distinct=n,
                           variant=variant, us=seconds * 1e6,
                           tbs=n * contract * (cols or width) * 2 / seconds / 1e12))
          print(rows[-1], flush=True)
  fileio.write_json_atomic(out_path, dict(
      command="python tools/gmm_shape_sweep.py " + " ".join(argv[1:]),
      env=benchmarking.environment(), read_tbs=read_tbs, rows=rows, fits=fits(rows, variants)),
      compact=True)


if __name__ == "__main__":
  main(sys.argv)

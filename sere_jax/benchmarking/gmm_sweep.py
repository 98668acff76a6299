"""The tile sweep of a grouped-matmul kernel (`benchmark.py --suite=gmm_sweep`): the
Triton kernel or the Mosaic GPU one (`KERNELS`), on a GPU or interpreted.

For each batch size and forced distinct-expert count (exactly n experts used,
`kernels.forced_ids`), the gate+up projection (tokens gathered in-kernel) and the down
projection (expert-sorted rows) are timed once per tiling, each a set of overrides of
the kernel's table in `sere_jax.kernels.gmm.tiles` (`tiles.parse_overrides`), inside
one jit over a chain of layers with different weights (`timing.LayerChain`), against
the roofline: the experts' bytes over the read bandwidth measured in the same process.
A tiling the kernel cannot compile gets a row with its `error` instead of a time.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from sere_jax.benchmarking import bandwidth
from sere_jax.benchmarking import timing
from sere_jax.benchmarking.kernels import SCALES, forced_ids, make_weights
from sere_jax.kernels.gmm import tiles
from sere_jax.kernels.gmm import api as gmm_api
from sere_jax.kernels.gmm import mosaic_gpu
from sere_jax.kernels.gmm.triton import gmm_triton
from sere_jax.kernels.schedule import reference as schedule_lib

MATMULS = ("gate_up", "down")

# Per implementation the sweep takes: the tiles table it overrides and the kernel.
KERNELS = {"triton": ("triton", gmm_triton),
           "interpret": ("triton", functools.partial(gmm_triton, interpret=True)),
           "mosaic_gpu": ("mosaic_gpu", mosaic_gpu.gmm_mosaic_gpu),
           "mosaic_gpu_interpret": ("mosaic_gpu", functools.partial(
               mosaic_gpu.gmm_mosaic_gpu, interpret=True))}


def kernel_table(impl: str) -> str:
  """The tiles table (`tiles.SWEPT` key) of the kernel `impl` sweeps; a ValueError
  names the implementations a sweep takes."""
  if impl not in KERNELS:
    raise ValueError(f"the sweep times the Triton or Mosaic GPU grouped matmul "
                     f"({', '.join(KERNELS)}), not {impl!r}")
  return KERNELS[impl][0]


def forced_schedules(rng: np.random.Generator, batch: int, top_k: int, experts: int,
                     distinct: int, layers: int) -> list[schedule_lib.Schedule]:
  """One reference schedule per layer, each routing `batch` tokens to exactly
  `distinct` experts (`kernels.forced_ids`)."""
  return [schedule_lib.build_schedule(jnp.asarray(forced_ids(rng, batch, top_k, experts,
                                                             distinct)),
                                      jnp.ones((batch,), bool), experts)
          for _ in range(layers)]


def seconds_per_layer(kernel: Any, x: jax.Array, layer_args: Sequence[tuple], *,
                      min_seconds: float) -> float:
  """Seconds per layer of `kernel(lhs, w, offsets, row_token)` in a `timing.LayerChain`
  over `layer_args` of `(offsets, row_token, w, lhs)` (the chain's update included)."""
  def step(x, offsets, row_token, w, lhs):
    out = kernel(lhs, w, offsets, row_token)
    return x + jnp.sum(out[:1, :1]).astype(x.dtype) * 0
  return timing.LayerChain(step).seconds_per_layer(x, layer_args, min_seconds=min_seconds)


def gmm_sweep(env: dict[str, Any], *, impl: str, scale: str, batches: Sequence[int],
              distinct: Sequence[int], matmuls: Sequence[str],
              variants: Sequence[dict[str, Any]], layers: int,
              min_seconds: float) -> dict[str, Any]:
  """One row per (batch, distinct count, projection, tiling): µs per layer, its
  roofline and their ratio. `impl` is a key of `KERNELS`; `variants` override the
  table of its kernel (`kernel_table`)."""
  table, kernel = tiles.SWEPT[kernel_table(impl)][0], KERNELS[impl][1]
  gmm_api.REGISTRY.check(impl)  # a kernel that cannot run here fails now, not per row
  if impl == "mosaic_gpu":
    mosaic_gpu.check_device()
  unknown = sorted(set(matmuls) - set(MATMULS))
  if unknown:
    raise ValueError(f"unknown projections {unknown}; known: {list(MATMULS)}")
  configs = [dict(table, **v) for v in variants]
  shape = SCALES[scale]
  d, f, e, k = shape["dim"], shape["ffn"], shape["experts"], shape["top_k"]
  read_bw = bandwidth.probe(shape["bandwidth_bytes"])["read"]["tbs"] * 1e12
  weights = make_weights(shape, layers)
  rng = np.random.default_rng(0)
  rows = []
  for batch in batches:
    x = jax.random.normal(jax.random.PRNGKey(batch), (batch, d), jnp.bfloat16)
    hidden = jax.random.normal(jax.random.PRNGKey(batch + 1), (batch * k, f), jnp.bfloat16)
    overhead = timing.chain_overhead(x, layers, min_seconds=min_seconds)
    for n in distinct:
      if not k <= n <= min(e, batch * k):
        continue
      scheds = forced_schedules(rng, batch, k, e, n, len(weights))
      for matmul in matmuls:
        if matmul == "gate_up":
          layer_args = [(s.group_offsets, s.row_token, wg, x)
                        for s, (wg, _) in zip(scheds, weights)]
          roofline = n * d * 2 * f * 2 / read_bw
        else:
          layer_args = [(s.group_offsets, None, wd, hidden)
                        for s, (_, wd) in zip(scheds, weights)]
          roofline = n * f * d * 2 / read_bw
        for cfg in configs:
          row = dict(batch=batch, distinct=n, matmul=matmul, roofline_us=roofline * 1e6)
          try:
            t = seconds_per_layer(functools.partial(kernel, **cfg), x, layer_args,
                                  min_seconds=min_seconds) - overhead
          except (ValueError, RuntimeError) as err:  # e.g. shared memory overflows
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
          else:
            row.update(us=t * 1e6, ratio=t / roofline)
          rows.append(dict(row, **cfg))
          logging.info("%s", rows[-1])
  return dict(suite="gmm_sweep", env=env, shape=shape, impl=impl,
              read_bandwidth_tbs=read_bw / 1e12, rows=rows)

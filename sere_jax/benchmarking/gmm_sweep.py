"""The tile sweep of the Triton grouped matmul (`benchmark.py --suite=gmm_sweep`).

For each batch size and forced distinct-expert count (exactly n experts used,
`kernels.forced_ids`), the gate+up projection (tokens gathered in-kernel) and the down
projection (expert-sorted rows) are timed once per tiling, each a set of overrides of
`sere_jax.kernels.gmm.tiles.TILES` (`tiles.parse_overrides`), inside one jit over a
chain of layers with different weights (`timing.LayerChain`), against the roofline:
the experts' bytes over the read bandwidth measured in the same process.
"""

from __future__ import annotations

from typing import Any, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from sere_jax.benchmarking import bandwidth
from sere_jax.benchmarking import timing
from sere_jax.benchmarking.kernels import SCALES, forced_ids, make_weights
from sere_jax.kernels.gmm import tiles
from sere_jax.kernels.gmm.triton import gmm_triton
from sere_jax.kernels.schedule import reference as schedule_lib

MATMULS = ("gate_up", "down")


def gmm_sweep(env: dict[str, Any], *, impl: str, scale: str, batches: Sequence[int],
              distinct: Sequence[int], matmuls: Sequence[str],
              variants: Sequence[dict[str, Any]], layers: int,
              min_seconds: float) -> dict[str, Any]:
  """One row per (batch, distinct count, projection, tiling): µs per layer, its
  roofline and their ratio. `impl` is `triton` (a GPU) or `interpret`."""
  if impl not in ("triton", "interpret"):
    raise ValueError("the sweep times the Triton grouped matmul: run it on a GPU, or "
                     f"interpreted on a CPU (the implementation is {impl!r})")
  unknown = sorted(set(matmuls) - set(MATMULS))
  if unknown:
    raise ValueError(f"unknown projections {unknown}; known: {list(MATMULS)}")
  configs = [dict(tiles.TILES, **v) for v in variants]
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
      scheds = [schedule_lib.build_schedule(jnp.asarray(forced_ids(rng, batch, k, e, n)),
                                            jnp.ones((batch,), bool), e)
                for _ in weights]
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
          def step(x, offsets, row_token, w, lhs, cfg=cfg):
            out = gmm_triton(lhs, w, offsets, row_token, interpret=impl == "interpret",
                             **cfg)
            return x + jnp.sum(out[:1, :1]).astype(x.dtype) * 0
          t = timing.LayerChain(step).seconds_per_layer(
              x, layer_args, min_seconds=min_seconds) - overhead
          rows.append(dict(batch=batch, distinct=n, matmul=matmul,
                           roofline_us=roofline * 1e6, us=t * 1e6, ratio=t / roofline,
                           **cfg))
          logging.info("%s", rows[-1])
  return dict(suite="gmm_sweep", env=env, shape=shape, impl=impl,
              read_bandwidth_tbs=read_bw / 1e12, rows=rows)

"""Times one MoE layer on a GPU under variants of its grouped matmuls, side by side.

    python tools/moe_layer_variants.py OUT.json [BATCHES] [DISTINCT]

At Qwen3-30B-A3B shapes (policy none, exactly n distinct experts per layer,
`benchmarking.kernels.forced_ids`; defaults B = 1,16,64 and n = 8,16,32,64,128), the
routed-expert FFN (`moe_ffn`, schedule + gate/up + down + combine) is timed with:
  triton                 the Triton kernels, SwiGLU and the split-K sum in XLA
                         (`tiles.SWIGLU_TILES = None`)
  triton_swiglu_bnN_wW   the Triton gate/up kernel with the SwiGLU epilogue fused
                         (`tiles.SWIGLU_TILES` set to N-column blocks and W warps)
  mosaic_gpu             the Mosaic GPU grouped matmul (activation in XLA)
Times are µs per layer over a chain of 8 weight sets (`timing.LayerChain`, chain
update subtracted), with the read roofline of the distinct experts' bytes. The JSON
holds every row so far (rewritten after each); a table goes to stdout. A variant that
fails is recorded with its error (`<name>_error`, time NaN) and the others go on. Each
variant re-traces the layer with `tiles.SWIGLU_TILES` set for it (the table the op
reads at trace time).
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

from sere_jax import fileio
from sere_jax import routing
from sere_jax.benchmarking import bandwidth
from sere_jax.benchmarking import kernels as kernels_lib
from sere_jax.benchmarking import timing
from sere_jax.kernels.gmm import api as gmm_api
from sere_jax.kernels.gmm.tiles import TILES
from sere_jax.kernels.moe_ffn import moe_ffn

LAYERS = 8
SHAPE = kernels_lib.SCALES["qwen3_30b"]
# name -> (moe_ffn impl, SWIGLU_TILES while tracing)
VARIANTS = {"triton": ("triton", None), "mosaic_gpu": ("mosaic_gpu", None)}
for _block_n, _warps in ((32, 4), (64, 4)):
  VARIANTS[f"triton_swiglu_bn{_block_n}_w{_warps}"] = (
      "triton", dict(TILES, k_splits=1, block_n=_block_n, num_warps=_warps))


def time_variant(impl: str, swiglu_tiles, x, layer_args) -> float:
  """Seconds per layer of `moe_ffn(impl=impl)` traced with `swiglu_tiles`."""
  def step(x, ids, w, wg, wd):
    return moe_ffn(x, ids, w, wg, wd, impl=impl).y

  saved = gmm_api.SWIGLU_TILES
  gmm_api.SWIGLU_TILES = swiglu_tiles
  try:
    return timing.LayerChain(step).seconds_per_layer(x, layer_args)
  finally:
    gmm_api.SWIGLU_TILES = saved


def main(argv):
  out_path = argv[1]
  batches = [int(b) for b in (argv[2] if len(argv) > 2 else "1,16,64").split(",")]
  distinct = [int(n) for n in (argv[3] if len(argv) > 3 else "8,16,32,64,128").split(",")]
  read_bw = bandwidth.probe()["read"]["tbs"] * 1e12
  d, e, k = SHAPE["dim"], SHAPE["experts"], SHAPE["top_k"]
  expert_bytes = 3 * d * SHAPE["ffn"] * 2
  weights = kernels_lib.make_weights(SHAPE, LAYERS)
  result = dict(command="python tools/moe_layer_variants.py " + " ".join(argv[1:]),
                env=timing.environment(), read_bandwidth_tbs=read_bw / 1e12,
                variants={name: dict(impl=impl, swiglu_tiles=tiles)
                          for name, (impl, tiles) in VARIANTS.items()})
  rows = []
  print(f"{'B':>3} {'n':>4} {'roofline':>9} " + " ".join(f"{v:>26}" for v in VARIANTS))
  for batch in batches:
    rng = np.random.default_rng(batch)
    x = jax.random.normal(jax.random.PRNGKey(batch), (batch, d), jnp.bfloat16)
    overhead = timing.chain_overhead(x, LAYERS)
    for n in kernels_lib.forced_counts(SHAPE, batch, distinct):
      layer_args = []
      for wg, wd in weights:
        _, w = routing.route(jnp.asarray(rng.normal(size=(batch, e)), jnp.float32), k)
        ids = jnp.asarray(kernels_lib.forced_ids(rng, batch, k, e, n))
        layer_args.append((ids, w, wg, wd))
      row = dict(batch=batch, distinct=n, roofline_us=n * expert_bytes / read_bw * 1e6)
      for name, (impl, tiles) in VARIANTS.items():
        try:
          row[f"{name}_us"] = (time_variant(impl, tiles, x, layer_args) - overhead) * 1e6
        except Exception as err:  # pylint: disable=broad-except
          row[f"{name}_us"] = float("nan")
          row[f"{name}_error"] = f"{type(err).__name__}: {err}"
          print(f"{name}: {row[f'{name}_error'][:300]}", flush=True)
      rows.append(row)
      print(f"{batch:>3} {n:>4} {row['roofline_us']:>9.1f} "
            + " ".join(f"{row[f'{v}_us']:>26.1f}" for v in VARIANTS), flush=True)
      fileio.write_json_atomic(out_path, dict(result, rows=rows))  # a cut run keeps these


if __name__ == "__main__":
  main(sys.argv)

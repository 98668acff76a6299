"""Times what a kernel that streams a weight costs beyond its bytes, on a GPU.

    python tools/weight_stream_cost.py OUT.json [SIZES_MB]

A decode layer reads each weight once, in a kernel of its own, one after another. Each
such kernel costs its bytes over the bandwidth plus a fixed part: the ramp until its
first loads arrive and the tail while its last programs finish. This tool measures that
fixed part for two kernels that read a weight of S MB (default 8, 16, 32, 64, 128; a
multiple of 8), each in a chain of 8 layers with their own weights (so L2 never
serves a repeat) inside one jitted loop (`benchmarking.LayerChain`, whose update is
subtracted):
  xla_dot       the decode dot `x [16, 2048] @ W [2048, S / 4096 B]` as XLA compiles
                it (split-K and tiles by its autotuner), as the q/k/v, output and
                router projections run;
  triton_sum    the least a Pallas Triton kernel can do with the bytes: 256 programs,
                each summing its contiguous share of `W` in `[64, 256]` tiles in a
                pipelined loop (3 stages), and adding the sum (times 1e-30) to its
                share of `x`.
A straight line through the sizes gives each kernel's fixed part (`intercept_us`) and
its bandwidth (`slope_tbs`). The JSON holds µs per layer per size and `triton_sum`'s
error against jnp.
"""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from sere_jax import benchmarking
from sere_jax import fileio

TOKENS, DIM, LAYERS = 16, 2048, 8
PROGRAMS, TILE_ROWS, TILE_COLS = 256, 64, 256
MIN_MB = PROGRAMS * TILE_ROWS * TILE_COLS * 2 // 2 ** 20  # one tile per program


def xla_dot(x: jax.Array, w: jax.Array) -> jax.Array:
  """`x @ w` cut or zero-padded to `x`'s shape (XLA fuses that into the chain update)."""
  y = jnp.dot(x, w, preferred_element_type=jnp.float32)
  cols = y.shape[1]
  return y[:, :DIM] if cols >= DIM else jnp.pad(y, ((0, 0), (0, DIM - cols)))


def _sum_kernel(w_ref, x_ref, y_ref, *, tiles, scale):
  program = pl.program_id(0)
  cols = jnp.arange(TILE_COLS)

  def body(i, acc):
    rows = (program * tiles + i) * TILE_ROWS + jnp.arange(TILE_ROWS)
    return acc + plt.load(w_ref.at[rows[:, None], cols[None, :]]).astype(jnp.float32)

  acc = jax.lax.fori_loop(0, tiles, body, jnp.zeros((TILE_ROWS, TILE_COLS), jnp.float32))
  share = x_ref.shape[0] // PROGRAMS
  index = program * share + jnp.arange(share)
  plt.store(y_ref.at[index], plt.load(x_ref.at[index]) + jnp.sum(acc) * scale)


def triton_sum(x: jax.Array, w: jax.Array, scale: float = 1e-30) -> jax.Array:
  """`x` (as float32) plus `scale` times the sum of each program's share of
  `w [R, 256]` (bf16), read in `[64, 256]` tiles by 256 programs."""
  rows = w.shape[0]
  if w.shape[1] != TILE_COLS or rows % (PROGRAMS * TILE_ROWS):
    raise ValueError(f"w must be [R, {TILE_COLS}] with R a multiple of "
                     f"{PROGRAMS * TILE_ROWS}, got {w.shape}")
  flat = x.reshape(-1).astype(jnp.float32)
  y = pl.pallas_call(
      functools.partial(_sum_kernel, tiles=rows // (PROGRAMS * TILE_ROWS), scale=scale),
      grid=(PROGRAMS,), out_shape=jax.ShapeDtypeStruct(flat.shape, jnp.float32),
      compiler_params=plt.CompilerParams(num_warps=4, num_stages=3),
      interpret=jax.default_backend() == "cpu", name="weight_stream_sum")(w, flat)
  return y.reshape(x.shape)


def triton_sum_error(x: jax.Array, megabytes: int) -> float:
  """Largest difference of `triton_sum` (with `scale` 1) from the same sums in jnp,
  relative to the largest sum."""
  w = weights("triton_sum", megabytes, jax.random.PRNGKey(1))
  shares = w.astype(jnp.float32).reshape(PROGRAMS, -1).sum(axis=1)
  expected = x.astype(jnp.float32).reshape(PROGRAMS, -1) + shares[:, None]
  got = triton_sum(x, w, scale=1.0).reshape(PROGRAMS, -1)
  return float(jnp.max(jnp.abs(got - expected)) / jnp.max(jnp.abs(shares)))


def weights(kind: str, megabytes: int, key: jax.Array) -> jax.Array:
  """One layer's bf16 weight of `megabytes` MB in `kind`'s layout."""
  elements = megabytes * 2 ** 20 // 2
  shape = (DIM, elements // DIM) if kind == "xla_dot" else (elements // TILE_COLS, TILE_COLS)
  return jax.random.normal(key, shape, jnp.bfloat16)


STEPS = {"xla_dot": xla_dot, "triton_sum": triton_sum}


def fit(sizes_mb: list[int], us: list[float]) -> dict[str, float]:
  """Intercept (µs) and bandwidth (TB/s) of a straight line through the readings."""
  if len(set(sizes_mb)) < 2:
    return {}
  slope, intercept = np.polyfit(sizes_mb, us, 1)  # µs per MB, µs
  return dict(intercept_us=float(intercept), slope_tbs=float(2 ** 20 / slope / 1e6))


def main(argv: list[str]) -> None:
  out_path = argv[1]
  sizes = [int(s) for s in (argv[2] if len(argv) > 2 else "8,16,32,64,128").split(",")]
  if any(s <= 0 or s % MIN_MB for s in sizes):
    raise ValueError(f"sizes must be positive multiples of {MIN_MB} MB (the Triton "
                     f"kernel's {PROGRAMS} programs x {TILE_ROWS} rows of "
                     f"{TILE_COLS * 2} bytes), got {sizes}")
  fileio.check_writable(out_path, overwrite=True)
  x = jax.random.normal(jax.random.PRNGKey(0), (TOKENS, DIM), jnp.bfloat16)
  error = triton_sum_error(x, sizes[0])
  print("triton_sum relative error", error, flush=True)
  overhead_us = benchmarking.chain_overhead(x, LAYERS) * 1e6
  results = {}
  for kind, step in STEPS.items():
    rows = []
    for megabytes in sizes:
      keys = jax.random.split(jax.random.PRNGKey(16 * megabytes), LAYERS)
      layer_args = [(weights(kind, megabytes, k),) for k in keys]
      us = benchmarking.LayerChain(step).seconds_per_layer(x, layer_args) * 1e6
      rows.append(dict(mb=megabytes, us=us - overhead_us))
      print(kind, rows[-1], flush=True)
      del layer_args
    results[kind] = dict(rows=rows, **fit(sizes, [r["us"] for r in rows]))
    print(kind, {k: v for k, v in results[kind].items() if k != "rows"}, flush=True)
  fileio.write_json_atomic(out_path, dict(
      command="python tools/weight_stream_cost.py " + " ".join(argv[1:]),
      env=benchmarking.environment(), chain_overhead_us=overhead_us,
      triton_sum_relative_error=error, results=results),
      compact=True)


if __name__ == "__main__":
  main(sys.argv)

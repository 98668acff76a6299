"""Expert-skipping grouped matmul for NVIDIA GPUs (Pallas Triton).

Grid: (N blocks, K splits, experts in active order). A program whose slot in the
active-expert list is past `num_distinct` exits at once, so weights are read only for
experts that own rows. Each program loops over its expert's row blocks and, inside,
over its share of the contraction (a `fori_loop`, which Triton software-pipelines);
split-K partial sums are written in float32 and summed afterwards. Left-hand rows can
be gathered from the token array in-kernel (`row_token`), so no sorted copy is made.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt


def _gmm_kernel(num_active_ref, active_ref, offsets_ref, row_token_ref, x_ref, w_ref,
                out_ref, *, block_m, block_n, block_k, chunks_per_split, num_chunks,
                contract, n, gather, interpret):
  n_block, split, slot = pl.program_id(0), pl.program_id(1), pl.program_id(2)

  @pl.when(slot < num_active_ref[0])
  def _():
    expert = active_ref[slot]
    start, end = offsets_ref[expert], offsets_ref[expert + 1]
    cols = n_block * block_n + jnp.arange(block_n)
    col_ok = cols < n
    first = split * chunks_per_split
    last = jnp.minimum(first + chunks_per_split, num_chunks)

    def row_block(r, carry):
      row0 = start + r * block_m
      rows = row0 + jnp.arange(block_m)
      row_ok = rows < end
      if gather:
        tokens = plt.load(row_token_ref.at[rows], mask=row_ok, other=0)
      else:
        tokens = jnp.where(row_ok, rows, 0)

      def k_step(c, acc):
        ks = c * block_k + jnp.arange(block_k)
        k_ok = ks < contract
        lhs = plt.load(x_ref.at[tokens[:, None], ks[None, :]], mask=k_ok[None, :],
                       other=0)
        rhs = plt.load(w_ref.at[expert, ks[:, None], cols[None, :]],
                       mask=k_ok[:, None] & col_ok[None, :], other=0)
        if interpret:  # CPU dots take no bf16 x bf16 -> f32; the f32 product is exact.
          lhs, rhs = lhs.astype(jnp.float32), rhs.astype(jnp.float32)
        return acc + jnp.dot(lhs, rhs, preferred_element_type=jnp.float32)

      acc = jax.lax.fori_loop(first, last, k_step,
                              jnp.zeros((block_m, block_n), jnp.float32))
      plt.store(out_ref.at[split, rows[:, None], cols[None, :]], acc,
                mask=row_ok[:, None] & col_ok[None, :])
      return carry

    jax.lax.fori_loop(0, pl.cdiv(end - start, block_m), row_block, 0)


def tile_config(num_rows: int, num_experts: int) -> dict[str, int]:
  """Tiles for `num_rows = T*K` rows over `num_experts` experts, from a sweep on an
  H200 (docs/benchmarks/gmm_sweep_h200.md).

  What matters is the rows per active expert, which is only known on the device; the
  tiles are chosen for uniform routing, `num_rows / num_experts`. Few rows per expert
  favour 16-row blocks (less wasted work, more programs in flight: B = 256 tokens
  over 128 experts, 16 rows each, 207 µs vs 311 µs with 64-row blocks); many rows per
  expert favour 64-row blocks, since a program re-reads its weight tile for every row
  block of its expert (64 rows each: 62 µs vs 217 µs).
  """
  if num_rows < 32 * num_experts:
    return dict(block_m=16, block_n=128, block_k=64, k_splits=2, num_warps=4,
                num_stages=4)
  return dict(block_m=64, block_n=128, block_k=64, k_splits=4, num_warps=4, num_stages=3)


def _pow2_at_least(x: int, low: int) -> int:
  return max(low, 1 << (max(x, 1) - 1).bit_length())


@functools.partial(jax.jit, static_argnames=("num_rows", "block_m", "block_n", "block_k",
                                             "k_splits", "num_warps", "num_stages",
                                             "interpret"))
def gmm_triton(x: jax.Array, w: jax.Array, group_offsets: jax.Array,
               active_experts: jax.Array, num_active: jax.Array,
               row_token: jax.Array | None = None, *, num_rows: int | None = None,
               block_m: int = 64, block_n: int = 128, block_k: int = 64,
               k_splits: int = 4, num_warps: int = 4, num_stages: int = 3,
               interpret: bool = False) -> jax.Array:
  """Grouped matmul over active experts only; see `gmm_reference` for the semantics.

  Args:
    x: `[M, D]` rows in expert order, or `[T, D]` tokens when `row_token` is given.
    w: `[E, D, N]` expert weights (bf16 or f32).
    group_offsets: `[E + 1]` int32 row offsets per expert.
    active_experts: `[E]` int32 experts with rows first (see `Schedule`).
    num_active: int32 scalar, the number of experts with rows.
    row_token: optional `[M]` int32 token of each row.
    num_rows: M (required when `row_token` is None and x has extra rows).

  Returns:
    `[M, N]` float32; rows outside every group are unspecified.
  """
  num_experts, contract, n = w.shape
  gather = row_token is not None
  if num_rows is None:
    num_rows = row_token.shape[0] if gather else x.shape[0]
  if x.shape[1] != contract:
    raise ValueError(f"x has {x.shape[1]} columns but w contracts over {contract}")
  block_n = min(block_n, _pow2_at_least(n, 16))
  block_k = min(block_k, _pow2_at_least(contract, 16))
  num_chunks = pl.cdiv(contract, block_k)
  k_splits = max(1, min(k_splits, num_chunks))
  chunks_per_split = pl.cdiv(num_chunks, k_splits)
  k_splits = pl.cdiv(num_chunks, chunks_per_split)
  if row_token is None:
    row_token = jnp.zeros((1,), jnp.int32)  # unused placeholder
  kernel = functools.partial(
      _gmm_kernel, block_m=block_m, block_n=block_n, block_k=block_k,
      chunks_per_split=chunks_per_split, num_chunks=num_chunks, contract=contract, n=n,
      gather=gather, interpret=bool(interpret))
  partials = pl.pallas_call(
      kernel,
      grid=(pl.cdiv(n, block_n), k_splits, num_experts),
      out_shape=jax.ShapeDtypeStruct((k_splits, num_rows, n), jnp.float32),
      compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name="sere_gmm",
  )(jnp.reshape(num_active, (1,)).astype(jnp.int32), active_experts.astype(jnp.int32),
    group_offsets.astype(jnp.int32), row_token.astype(jnp.int32), x, w)
  return jnp.sum(partials, axis=0)

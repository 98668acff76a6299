"""Expert-skipping grouped matmul for TPUs (Pallas Mosaic).

Grid: (row blocks, N blocks, K blocks, expert slots). The innermost axis walks the
active experts whose row groups meet the current row block, in the order of
`active_experts` (whose groups are contiguous and ascending, so the experts meeting a
row block are a contiguous run of slots). Per-block metadata (first slot, slot count)
and the active-expert list are scalar-prefetched, so the weight `index_map` reads the
expert id: grid steps past a block's slot count map to the same weight block as the
step before, and Pallas TPU issues no DMA for a repeated block index. Weights of
experts without rows are therefore never read (beyond the pipeline's first fetch when
no expert has rows). With `dynamic_grid=True` the slot axis
is sized at run time to the largest per-block count (with one row block, exactly the
number of active experts), so skipped experts cost no grid steps either.

Inside a step the kernel multiplies only the row tiles that overlap the expert's
group and adds the rows of the group into the float32 output block, which stays in
VMEM across the K and slot axes. Left-hand rows are gathered by `row_token` with XLA
before the call (activations are small); weights are never padded or copied.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

_LANES = 128
_MIB = 2**20


def _gmm_kernel(active_ref, offsets_ref, first_ref, count_ref, x_ref, w_ref, out_ref,
                *, block_m, tile_m, compute_dtype):
  block, k, slot = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when((k == 0) & (slot == 0))
  def _():
    out_ref[...] = jnp.zeros_like(out_ref)

  @pl.when(slot < count_ref[block])
  def _():
    expert = active_ref[first_ref[block] + slot]
    row0 = block * block_m
    lo = jnp.maximum(offsets_ref[expert] - row0, 0)
    hi = jnp.minimum(offsets_ref[expert + 1] - row0, block_m)
    precision = (jax.lax.Precision.HIGHEST if compute_dtype == jnp.float32
                 else jax.lax.Precision.DEFAULT)

    def row_tile(t, carry):
      r0 = pl.multiple_of(t * tile_m, tile_m)
      part = jnp.dot(x_ref[pl.ds(r0, tile_m), :], w_ref[...].astype(compute_dtype),
                     precision=precision, preferred_element_type=jnp.float32)
      rows = r0 + jax.lax.broadcasted_iota(jnp.int32, part.shape, 0)
      inside = (rows >= lo) & (rows < hi)
      out_ref[pl.ds(r0, tile_m), :] += jnp.where(inside, part, 0.0)
      return carry

    # lo and hi are non-negative, so truncating division is floor division here.
    jax.lax.fori_loop(jax.lax.div(lo, tile_m), jax.lax.div(hi + tile_m - 1, tile_m),
                      row_tile, 0)


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _block_size(dim: int, target: int) -> int:
  """Largest multiple of 128 that divides `dim` and is <= `target`, else `dim`.

  Such blocks satisfy the TPU (8, 128) tiling rule in both the lane and the sublane
  position without padding the weights.
  """
  for size in range(target - target % _LANES, 0, -_LANES):
    if dim % size == 0:
      return size
  return dim


def _weight_block_index(b, j, k, s, active_ref, offsets_ref, first_ref, count_ref, *,
                        n_blocks, k_blocks):
  """Weight block of grid step (row block b, N block j, K block k, slot s).

  Past the row block's last slot it repeats that slot's block; a row block without
  rows repeats the final (K, N) block of the slot before it, which is where the
  previous row block ended. Either way the block index equals the previous step's,
  so no DMA is issued.
  """
  del offsets_ref
  has_rows = count_ref[b] > 0
  slot = jnp.maximum(jnp.minimum(first_ref[b] + s, first_ref[b] + count_ref[b] - 1), 0)
  return (active_ref[slot], jnp.where(has_rows, k, k_blocks - 1),
          jnp.where(has_rows, j, n_blocks - 1))


def _block_metadata(group_offsets, active_experts, num_active, num_blocks, block_m):
  """Per row block: first active slot whose group meets it, and how many do."""
  slot_ok = jnp.arange(active_experts.shape[0]) < num_active
  starts = group_offsets[active_experts]
  ends = group_offsets[active_experts + 1]
  row0 = jnp.arange(num_blocks, dtype=jnp.int32)[:, None] * block_m
  first = jnp.sum(slot_ok & (ends <= row0), axis=1, dtype=jnp.int32)
  stop = jnp.sum(slot_ok & (starts < row0 + block_m), axis=1, dtype=jnp.int32)
  return first, stop - first


@functools.partial(jax.jit, static_argnames=("num_rows", "block_m", "tile_m", "block_n",
                                             "block_k", "dynamic_grid", "interpret"))
def gmm_tpu(x: jax.Array, w: jax.Array, group_offsets: jax.Array,
            active_experts: jax.Array, num_active: jax.Array,
            row_token: jax.Array | None = None, *, num_rows: int | None = None,
            block_m: int = 512, tile_m: int = 128, block_n: int = 512,
            block_k: int = 2048, dynamic_grid: bool = True,
            interpret: bool | pltpu.InterpretParams = False) -> jax.Array:
  """Grouped matmul over active experts only; see `reference.gmm_reference`.

  Args:
    x: `[M, D]` rows in expert order, or `[T, D]` tokens when `row_token` is given.
    w: `[E, D, N]` expert weights (bf16 or f32).
    group_offsets: `[E + 1]` int32 row offsets per expert.
    active_experts: `[E]` int32 experts with rows first, ascending (see `Schedule`).
    num_active: int32 scalar, the number of experts with rows.
    row_token: optional `[M]` int32 token of each row.
    num_rows: M (required when `row_token` is None and x has extra rows).
    block_m: rows per grid block (held in VMEM with their output); rounded to
      `tile_m` and capped at the padded row count.
    tile_m: rows per matmul inside a step (a multiple of 16).
    block_n, block_k: target output / contraction block sizes; the blocks used are
      the largest multiples of 128 not above them that divide N / D, or N / D itself.
    dynamic_grid: size the expert-slot grid axis at run time; False keeps a static
      axis of E slots whose surplus steps repeat the previous block (no DMA, but a
      grid step each).
    interpret: run in Pallas interpret mode (True or `pltpu.InterpretParams`).

  Returns:
    `[M, N]` float32; rows outside every group are unspecified.
  """
  if w.ndim != 3 or x.ndim != 2:
    raise ValueError(f"w must be [E, D, N] and x 2-D, got shapes {w.shape} and {x.shape}")
  num_experts, contract, n = w.shape
  if x.shape[1] != contract:
    raise ValueError(f"x has {x.shape[1]} columns but w contracts over {contract}")
  if group_offsets.shape != (num_experts + 1,) or active_experts.shape != (num_experts,):
    raise ValueError(f"group_offsets must be [E + 1] and active_experts [E] for E = "
                     f"{num_experts}, got {group_offsets.shape} and {active_experts.shape}")
  if tile_m <= 0 or tile_m % 16:
    raise ValueError(f"tile_m must be a positive multiple of 16, got {tile_m}")
  if row_token is not None:
    if row_token.ndim != 1:
      raise ValueError(f"row_token must be [M], got shape {row_token.shape}")
    num_rows = row_token.shape[0] if num_rows is None else num_rows
    lhs = jnp.take(x, row_token[:num_rows], axis=0)
  else:
    num_rows = x.shape[0] if num_rows is None else num_rows
    if num_rows > x.shape[0]:
      raise ValueError(f"num_rows={num_rows} but x has only {x.shape[0]} rows")
    lhs = x[:num_rows]
  if lhs.shape[0] != num_rows or num_rows < 1:
    raise ValueError(f"num_rows={num_rows} must be positive and at most the number of "
                     f"row_token entries ({lhs.shape[0]})")

  compute_dtype = jnp.promote_types(x.dtype, w.dtype)
  tile_m = min(tile_m, _round_up(num_rows, 16))
  block_m = min(_round_up(max(block_m, tile_m), tile_m), _round_up(num_rows, tile_m))
  num_blocks = pl.cdiv(num_rows, block_m)
  lhs = jnp.pad(lhs.astype(compute_dtype), ((0, num_blocks * block_m - num_rows), (0, 0)))
  block_n, block_k = _block_size(n, block_n), _block_size(contract, block_k)
  n_blocks, k_blocks = n // block_n, contract // block_k

  offsets = group_offsets.astype(jnp.int32)
  active = active_experts.astype(jnp.int32)
  first, count = _block_metadata(offsets, active, num_active, num_blocks, block_m)
  slots = jnp.maximum(jnp.max(count), 1) if dynamic_grid else num_experts

  w_index = functools.partial(_weight_block_index, n_blocks=n_blocks, k_blocks=k_blocks)

  def x_index(b, j, k, s, *_):
    return b, k

  def out_index(b, j, k, s, *_):
    return b, j

  itemsize = jnp.dtype(compute_dtype).itemsize
  vmem_bytes = 2 * (block_m * block_k * itemsize + block_k * block_n * w.dtype.itemsize
                    + block_m * block_n * 4) + 4 * tile_m * block_n * 4
  kernel = functools.partial(_gmm_kernel, block_m=block_m, tile_m=tile_m,
                             compute_dtype=compute_dtype)
  out = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4,
          grid=(num_blocks, n_blocks, k_blocks, slots),
          in_specs=[pl.BlockSpec((block_m, block_k), x_index),
                    pl.BlockSpec((None, block_k, block_n), w_index)],
          out_specs=pl.BlockSpec((block_m, block_n), out_index)),
      out_shape=jax.ShapeDtypeStruct((num_blocks * block_m, n), jnp.float32),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary", "arbitrary"),
          vmem_limit_bytes=max(32 * _MIB, vmem_bytes + 8 * _MIB)),
      interpret=interpret,
      name="sere_gmm",
  )(active, offsets, first, count, lhs, w)
  return out[:num_rows]

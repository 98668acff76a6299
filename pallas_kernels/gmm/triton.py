"""Expert-skipping grouped matmul for NVIDIA GPUs (Pallas Triton).

Grid: (N blocks, K splits, item programs). A work item is one row block of one expert
with rows; each program builds the item list from the group offsets and loops over
every `item_programs`-th item from its own index, so weights are read only for experts
that own rows and no program is launched per possible-but-absent item. Row blocks of
one expert run side by side in different programs and share the expert's weight tiles
through L2. A program loops over its share of the contraction (a
`fori_loop`, which Triton software-pipelines); split-K partial sums are written in
float32 and summed afterwards. Left-hand rows can be gathered from the token array
in-kernel (`row_token`), so no sorted copy is made. With `swiglu=True` the kernel
computes the gate and up columns of one output block side by side over the whole
contraction (no K split) and writes `SiLU(gate) * up` in the output dtype: the MoE
layer's gate/up projection then needs no separate split-K sum and activation kernel.
The tuned tiles are `tiles.TILES` and `tiles.SWIGLU_TILES`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt


class _ItemTable:
  """The work items of one call, from the `[E + 1]` group offsets.

  Items are the row blocks of every expert with rows, in expert order. An expert's
  tile is the smallest of `row_tiles` that holds all its rows (one item), else the
  largest (several items). Every program builds the table from the offsets (a prefix
  sum over the experts), so the schedule need not know the tiling.
  """

  def __init__(self, offsets_ref, *, num_experts, row_tiles):
    self.num_experts = num_experts
    self.expert = jnp.arange(_pow2_at_least(num_experts, 16))
    real = self.expert < num_experts
    self.starts = plt.load(offsets_ref.at[self.expert], mask=real, other=0)
    self.ends = plt.load(offsets_ref.at[self.expert + 1], mask=real, other=0)
    sizes = self.ends - self.starts
    self.tile = jnp.full_like(sizes, row_tiles[-1])
    for tile in reversed(row_tiles[:-1]):
      self.tile = jnp.where(sizes <= tile, tile, self.tile)
    self.blocks = (sizes + self.tile - 1) // self.tile
    self.done_after = jnp.cumsum(self.blocks)  # items of experts 0..e
    self.count = jnp.sum(self.blocks)

  def item(self, index):
    """Item `index < count`: its expert, first row, the group's end and its tile."""
    done = self.done_after <= index  # experts whose items all come before `index`
    owner = jnp.sum(jnp.where(done, 1, 0))
    is_owner = self.expert == owner
    block = index - jnp.sum(jnp.where(done, self.blocks, 0))
    first = (jnp.sum(jnp.where(is_owner, self.starts, 0))
             + block * jnp.sum(jnp.where(is_owner, self.tile, 0)))
    return (jnp.minimum(owner, self.num_experts - 1), first,
            jnp.sum(jnp.where(is_owner, self.ends, 0)),
            jnp.sum(jnp.where(is_owner, self.tile, 0)))


def _gmm_kernel(offsets_ref, row_token_ref, x_ref, w_ref, out_ref, *, num_experts,
                row_tiles, block_n, block_k, chunks_per_split, num_chunks, contract, n,
                gather, swiglu, item_programs, interpret):
  n_block, split, program = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  items = _ItemTable(offsets_ref, num_experts=num_experts, row_tiles=row_tiles)
  cols = n_block * block_n + jnp.arange(block_n)
  col_ok = cols < n
  # The weight columns each accumulator reads: the block, and with `swiglu` the up
  # projection's matching block `n` columns further (the output has `n` columns).
  weight_cols = (cols, cols + n) if swiglu else (cols,)

  def row_block(tile_m, expert, row0, end):
    rows = row0 + jnp.arange(tile_m)
    row_ok = rows < end
    if gather:
      tokens = plt.load(row_token_ref.at[rows], mask=row_ok, other=0)
    else:
      tokens = jnp.where(row_ok, rows, 0)

    def k_step(c, accs):
      ks = c * block_k + jnp.arange(block_k)
      k_ok = ks < contract
      lhs = plt.load(x_ref.at[tokens[:, None], ks[None, :]], mask=k_ok[None, :], other=0)
      if interpret:  # CPU dots take no bf16 x bf16 -> f32; the f32 product is exact.
        lhs = lhs.astype(jnp.float32)
      new = []
      for acc, wcols in zip(accs, weight_cols):
        rhs = plt.load(w_ref.at[expert, ks[:, None], wcols[None, :]],
                       mask=k_ok[:, None] & col_ok[None, :], other=0)
        if interpret:
          rhs = rhs.astype(jnp.float32)
        new.append(acc + jnp.dot(lhs, rhs, preferred_element_type=jnp.float32))
      return tuple(new)

    first = split * chunks_per_split
    last = jnp.minimum(first + chunks_per_split, num_chunks)
    zeros = tuple(jnp.zeros((tile_m, block_n), jnp.float32) for _ in weight_cols)
    accs = jax.lax.fori_loop(first, last, k_step, zeros)
    if swiglu:
      gate, up = accs
      out = gate / (1.0 + jnp.exp(-gate)) * up  # SiLU(gate) * up
    else:
      (out,) = accs
    plt.store(out_ref.at[split, rows[:, None], cols[None, :]], out.astype(out_ref.dtype),
              mask=row_ok[:, None] & col_ok[None, :])

  def one_item(step, carry):
    expert, row0, end, tile = items.item(program + step * item_programs)
    if len(row_tiles) == 1:
      row_block(row_tiles[0], expert, row0, end)
    else:  # one branch per tile: Triton tiles have static shapes
      for tile_m in row_tiles:
        pl.when(tile == tile_m)(functools.partial(row_block, tile_m, expert, row0, end))
    return carry

  # Programs along the item axis take items program, program + item_programs, ...
  trips = jnp.maximum(items.count - program + item_programs - 1, 0) // item_programs
  jax.lax.fori_loop(0, trips, one_item, 0)


def _pow2_at_least(x: int, low: int) -> int:
  return max(low, 1 << (max(x, 1) - 1).bit_length())


@functools.partial(jax.jit, static_argnames=("num_rows", "swiglu", "out_dtype",
                                             "row_tiles", "block_n", "block_k",
                                             "k_splits", "num_warps", "num_stages",
                                             "max_programs", "interpret", "num_cols"))
def gmm_triton(x: jax.Array, w: jax.Array, group_offsets: jax.Array,
               row_token: jax.Array | None = None, *, num_rows: int | None = None,
               swiglu: bool = False, out_dtype=jnp.float32,
               row_tiles: tuple[int, ...] = (16,), block_n: int = 128, block_k: int = 64,
               k_splits: int = 4, num_warps: int = 4, num_stages: int = 3,
               max_programs: int | None = None, interpret: bool = False,
               num_cols: int | None = None) -> jax.Array:
  """Grouped matmul over experts with rows only; see `reference.gmm_reference`.

  Args:
    x: `[M, D]` rows in expert order, or `[T, D]` tokens when `row_token` is given.
    w: `[E, D, N]` expert weights (bf16 or f32).
    group_offsets: `[E + 1]` int32 row offsets per expert, ascending, at most M.
    row_token: optional `[M]` int32 token of each row.
    num_rows: M (required when `row_token` is None and x has extra rows).
    swiglu: `w` is a fused `[E, D, 2F]` gate/up projection (gate first) and the
      output is `SiLU(gate) * up`, `[M, F]`; needs `k_splits=1`.
    out_dtype: the output's dtype (accumulation is float32 either way).
    row_tiles: ascending powers of two (at least 16), the row-block sizes of the work
      items: an expert's rows go into the smallest tile that holds them all, or into
      several of the largest. See `tiles.TILES`.
    max_programs: cap on the programs launched; each then loops over several work
      items (None: one program per possible item, most of which exit at once when
      few experts have rows).

  Returns:
    `[M, N]` (`[M, N / 2]` with `swiglu`) in `out_dtype`; rows outside every group
    are unspecified.
  """
  num_experts, contract, n = w.shape
  if num_cols is not None:
    if swiglu or not 0 < num_cols <= n:
      raise ValueError(f"num_cols must be in [1, {n}] for w of shape {w.shape}, and "
                       f"without swiglu; got {num_cols} (swiglu={swiglu})")
    n = num_cols
  if swiglu:
    if n % 2 or k_splits != 1:
      raise ValueError("swiglu needs an even number of weight columns (gate, then up) "
                       f"and k_splits=1, got {n} columns and k_splits={k_splits}")
    n //= 2
  gather = row_token is not None
  if num_rows is None:
    num_rows = row_token.shape[0] if gather else x.shape[0]
  if x.shape[1] != contract:
    raise ValueError(f"x has {x.shape[1]} columns but w contracts over {contract}")
  if group_offsets.shape != (num_experts + 1,):
    raise ValueError(f"group_offsets must be [E + 1] = [{num_experts + 1}] for w of "
                     f"shape {w.shape}, got {group_offsets.shape}")
  row_tiles = tuple(row_tiles)
  if (not row_tiles or list(row_tiles) != sorted(set(row_tiles))
      or any(t < 16 or t & (t - 1) for t in row_tiles)):
    raise ValueError("row_tiles must be ascending distinct powers of two >= 16, got "
                     f"{row_tiles}")
  block_n = min(block_n, _pow2_at_least(n, 16))
  block_k = min(block_k, _pow2_at_least(contract, 16))
  num_chunks = pl.cdiv(contract, block_k)
  k_splits = max(1, min(k_splits, num_chunks))
  chunks_per_split = pl.cdiv(num_chunks, k_splits)
  k_splits = pl.cdiv(num_chunks, chunks_per_split)
  if row_token is None:
    row_token = jnp.zeros((1,), jnp.int32)  # unused placeholder
  # An expert of s rows has at most s // tile + 1 items (tile >= row_tiles[0]), and
  # at most min(E, M) experts have rows.
  max_items = max(min(num_experts, num_rows) + num_rows // row_tiles[0], 1)
  n_blocks = pl.cdiv(n, block_n)
  item_programs = max_items
  if max_programs is not None:
    item_programs = min(max_items, max(1, max_programs // (n_blocks * k_splits)))
  kernel = functools.partial(
      _gmm_kernel, num_experts=num_experts, row_tiles=row_tiles,
      block_n=block_n, block_k=block_k, chunks_per_split=chunks_per_split,
      num_chunks=num_chunks, contract=contract, n=n, gather=gather, swiglu=swiglu,
      item_programs=item_programs, interpret=bool(interpret))
  partial_dtype = out_dtype if k_splits == 1 else jnp.float32
  partials = pl.pallas_call(
      kernel,
      grid=(n_blocks, k_splits, item_programs),
      out_shape=jax.ShapeDtypeStruct((k_splits, num_rows, n), partial_dtype),
      compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name="sere_gmm",
  )(group_offsets.astype(jnp.int32), row_token.astype(jnp.int32), x, w)
  if k_splits == 1:
    return partials[0]
  return jnp.sum(partials, axis=0).astype(out_dtype)

"""Expert-skipping grouped matmul for Hopper GPUs (Pallas Mosaic GPU: TMA + wgmma).

A persistent kernel: one CTA per SM (`num_sms`) loops over work items. A work item is
the rows of one expert inside one aligned `BLOCK_M`-row block, one `block_n` column
block and one K split; the CTA streams the expert's weight tiles and the block's
activation tiles through shared memory with TMA copies (`plgpu.emit_pipeline`,
`max_concurrent_steps` deep) and multiplies them on the tensor cores with wgmma into a
float32 accumulator, then writes the item's rows with TMA stores. Weights of experts
without rows are never read.

The work-item table (each item's expert, row block, first row and row count, and the
number of items) is built from the group offsets in XLA (`item_table`); rows are in
expert order, so with `row_token` the tokens are gathered first. wgmma multiplies 64
rows at a time: rows of other experts in the block are computed and dropped, which
costs tensor-core time but no weight bytes (decode is bound by the weights' bytes).
The Triton kernel (`triton.py`) is the other GPU backend; `tiles.MOSAIC_GPU_TILES`
holds this one's options. Its reference is `reference.gmm_reference`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

# Rows per work item: the M of one warpgroup's wgmma.
BLOCK_M = 64
# SMs of an H100 SXM / H200: the CTAs launched where the device does not say (lowering
# for a GPU on a machine without one).
DEFAULT_NUM_SMS = 132


def num_sms() -> int:
  """CTAs to launch, one per SM: the default GPU's SM count, else `DEFAULT_NUM_SMS`."""
  device = jax.devices()[0]
  count = getattr(device, "core_count", None) if device.platform == "gpu" else None
  return int(count) if count else DEFAULT_NUM_SMS


def item_table(group_offsets: jax.Array, num_rows: int, num_experts: int
               ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
  """The work items of a call: `(expert, block, first_row, rows, count)`.

  The rows are cut into aligned `BLOCK_M`-row blocks (TMA copies address the
  activations in whole 8-row tiles); an item is one expert with rows and one block
  its group overlaps, in expert order. `expert`, `block`, `first_row` (the item's
  first row of the group inside the block) and `rows` are `[max_items]` int32
  (entries from `count` on are unused); `count` is `[1]` int32.
  """
  max_items = max(min(num_experts, num_rows) + pl.cdiv(num_rows, BLOCK_M), 1)
  offsets = group_offsets.astype(jnp.int32)
  starts, ends = offsets[:-1], offsets[1:]
  first_block = starts // BLOCK_M
  blocks = jnp.where(ends > starts, (ends - 1) // BLOCK_M - first_block + 1, 0)
  done_after = jnp.cumsum(blocks)  # items of experts 0..e
  index = jnp.arange(max_items, dtype=jnp.int32)
  expert = jnp.minimum(jnp.sum(done_after[None, :] <= index[:, None], axis=1),
                       num_experts - 1).astype(jnp.int32)
  block = first_block[expert] + index - (done_after[expert] - blocks[expert])
  first_row = jnp.maximum(starts[expert], block * BLOCK_M)
  rows = jnp.clip(jnp.minimum(ends[expert], (block + 1) * BLOCK_M) - first_row, 0,
                  BLOCK_M)
  return expert, block, first_row, rows, done_after[-1:]


def _store_rows(acc_smem, out_gmem, skip, first_row, rows, col0, block_n):
  """Writes `rows` (dynamic, 1..BLOCK_M) rows of `acc_smem` from row `skip` on to
  `out_gmem[first_row:, col0:col0 + block_n]`: TMA copies have static shapes, so one
  copy per set bit of `rows` (64, 32, ..., 1 rows)."""
  done = 0  # rows written so far
  size = BLOCK_M
  while size:
    bit = jax.lax.bitwise_and(rows, size)

    @pl.when(bit != 0)
    def _(size=size, done=done):
      plgpu.copy_smem_to_gmem(
          acc_smem.at[pl.ds(skip + done, size)],
          out_gmem.at[pl.ds(first_row + done, size), pl.ds(col0, block_n)])
    done = done + bit
    size //= 2
  plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _body(expert_ref, block_ref, first_row_ref, rows_ref, count_ref, x_gmem, w_gmem,
          out_gmem, *, ctas, n_blocks, k_splits, steps_per_split, block_n, block_k,
          max_concurrent_steps):
  sm = jax.lax.axis_index("sm")
  count = count_ref[0]
  total = count * n_blocks * k_splits
  trips = jax.lax.div(jax.lax.max(total - sm + ctas - 1, 0), ctas)

  def one_item(step, carry):
    # Items of the same column block and split are neighbours: the row blocks of one
    # expert run at the same time and share its weight tiles through L2.
    t = sm + step * ctas
    # (jax.lax integer ops: jnp's `%` and `//` are jitted helpers Mosaic GPU does not
    # lower.)
    item = jax.lax.rem(t, count)
    n_block = jax.lax.rem(jax.lax.div(t, count), n_blocks)
    split = jax.lax.div(t, count * n_blocks)
    expert, block, first_row = expert_ref[item], block_ref[item], first_row_ref[item]
    k0 = split * steps_per_split

    def accumulate(acc_ref):
      plgpu.emit_pipeline(
          lambda _, x_smem, w_smem: plgpu.wgmma(acc_ref, x_smem, w_smem),
          grid=(steps_per_split,),
          in_specs=[
              plgpu.BlockSpec((BLOCK_M, block_k), lambda k: (block, k0 + k),
                              delay_release=1),
              plgpu.BlockSpec((block_k, block_n), lambda k: (k0 + k, n_block),
                              delay_release=1),
          ],
          max_concurrent_steps=max_concurrent_steps,
      )(x_gmem, w_gmem.at[expert])
      return acc_ref[...]

    acc = pl.run_scoped(accumulate, plgpu.ACC((BLOCK_M, block_n)))

    def store(acc_smem):
      acc_smem[...] = acc
      plgpu.commit_smem()
      _store_rows(acc_smem, out_gmem.at[split], first_row - block * BLOCK_M, first_row,
                  rows_ref[item], n_block * block_n, block_n)

    pl.run_scoped(store, plgpu.SMEM((BLOCK_M, block_n), jnp.float32))
    return carry

  jax.lax.fori_loop(0, trips, one_item, 0)


def unsupported(x: jax.Array, w: jax.Array, *, block_k: int) -> str | None:
  """Why this kernel cannot take `x` and `w`, or None: it needs bf16 or f16 operands
  of one dtype, a contraction that is a multiple of `block_k` and an output width
  that is a multiple of 64 (TMA tiles are static)."""
  _, contract, n = w.shape
  if x.dtype != w.dtype or x.dtype not in (jnp.bfloat16, jnp.float16):
    return f"takes bf16 or f16 x and w of one dtype, not {x.dtype} and {w.dtype}"
  if contract % block_k or n % 64:
    return (f"needs a contraction ({contract}) that is a multiple of block_k={block_k} "
            f"and an output width ({n}) that is a multiple of 64")
  return None


def check_device() -> None:
  """Raises ValueError unless the default device is a Hopper GPU (wgmma is sm_90
  only); a device that does not report its compute capability is not checked."""
  device = jax.devices()[0]
  capability = getattr(device, "compute_capability", None)
  if capability is not None and not str(capability).startswith("9."):
    raise ValueError(f"the Mosaic GPU grouped matmul needs a Hopper GPU (compute "
                     f"capability 9.x), this {device.device_kind} has {capability}")


@functools.partial(jax.jit, static_argnames=(
    "num_rows", "block_n", "block_k", "k_splits", "max_concurrent_steps", "interpret"))
def gmm_mosaic_gpu(x: jax.Array, w: jax.Array, group_offsets: jax.Array,
                   row_token: jax.Array | None = None, *, num_rows: int | None = None,
                   block_n: int = 128, block_k: int = 64, k_splits: int = 1,
                   max_concurrent_steps: int = 4,
                   interpret: bool | plgpu.InterpretGPUParams = False) -> jax.Array:
  """Grouped matmul over experts with rows only; see `reference.gmm_reference`.

  Args:
    x: `[M, D]` rows in expert order, or `[T, D]` tokens when `row_token` is given.
    w: `[E, D, N]` expert weights, bf16 or f16 like `x`.
    group_offsets: `[E + 1]` int32 row offsets per expert, ascending, at most M.
    row_token: optional `[M]` int32 token of each row (gathered before the kernel).
    num_rows: M (required when `row_token` is None and x has extra rows).
    block_n, block_k: the column and contraction tile; D must be a multiple of
      `block_k` and N of 64 (`block_n` falls back to 64 where N is not a multiple).
    k_splits: the contraction is split this many ways (more work items when few
      experts have rows); float32 partial sums are added afterwards. Lowered to the
      largest number of ways that divides the `block_k` steps.
    max_concurrent_steps: TMA pipeline depth.
    interpret: run in Mosaic GPU interpret mode (any backend; tests): True, or the
      mode's parameters (e.g. with race detection).

  Returns:
    `[M, N]` float32; rows outside every group are unspecified.
  """
  num_experts, contract, n = w.shape
  if x.shape[1] != contract:
    raise ValueError(f"x has {x.shape[1]} columns but w contracts over {contract}")
  reason = unsupported(x, w, block_k=block_k)
  if reason:
    raise ValueError(f"the Mosaic GPU grouped matmul {reason}")
  if group_offsets.shape != (num_experts + 1,):
    raise ValueError(f"group_offsets must be [E + 1] = [{num_experts + 1}] for w of "
                     f"shape {w.shape}, got {group_offsets.shape}")
  if row_token is not None:
    num_rows = row_token.shape[0] if num_rows is None else num_rows
    x = x[row_token[:num_rows]]
  num_rows = x.shape[0] if num_rows is None else num_rows
  if n % block_n:
    block_n = 64
  steps = contract // block_k
  k_splits = max(d for d in range(1, max(1, min(k_splits, steps)) + 1) if steps % d == 0)
  table = item_table(group_offsets, num_rows, num_experts)
  padded = pl.cdiv(num_rows, BLOCK_M) * BLOCK_M  # whole row blocks for the TMA copies
  x = jnp.pad(x[:num_rows], ((0, padded - num_rows), (0, 0)))
  ctas = num_sms()
  body = functools.partial(
      _body, ctas=ctas, n_blocks=n // block_n, k_splits=k_splits,
      steps_per_split=steps // k_splits, block_n=block_n, block_k=block_k,
      max_concurrent_steps=max_concurrent_steps)
  kernel = plgpu.kernel(
      body,
      out_type=jax.ShapeDtypeStruct((k_splits, padded, n), jnp.float32),
      grid=(ctas,),
      grid_names=("sm",),
      kernel_name="sere_gmm_mosaic_gpu",
      compiler_params=plgpu.CompilerParams(
          lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      interpret=(interpret if isinstance(interpret, plgpu.InterpretGPUParams)
                 else plgpu.InterpretGPUParams() if interpret else None),
  )
  partials = kernel(*table, x, w)[:, :num_rows]
  return partials[0] if k_splits == 1 else jnp.sum(partials, axis=0)

"""The routed experts' FFN as one dataflow kernel for NVIDIA GPUs (Pallas Triton).

One launch does the work of four kernels of the grouped-matmul path (the gate/up
grouped matmul, XLA's split-K sum + SwiGLU, the down grouped matmul and XLA's weighted
combine). The programs take units of work from one queue, in order, through an atomic
ticket counter:

  gate/up  one item (a row block of one expert, `gmm.triton.ItemTable`) times one block
           of `block_f` gate columns and the matching up columns, over one of
           `gate_up_splits` slices of the contraction, written as float32 partials.
           The last split of an (item, column block) to finish (an atomic count) sums
           the partials and writes `SiLU(gate) * up`.
  down     one item times one block of `block_d` output columns over one of
           `down_splits` slices of the intermediate dimension, once all of the item's
           SwiGLU blocks are written; float32 partials.
  combine  a block of tokens times a block of columns, once every down unit is done:
           `y[t] = sum_j weights[t, j] * down[slot_row[t, j]]` over the valid slots.

A unit waits only on units with smaller tickets, which running programs hold (a program
takes a ticket only while it runs, and finishes its current unit before its next), so
the queue cannot deadlock whatever number of programs is resident. Down units of the
first experts start while the last experts' gate/up units still run: no grid-wide
barrier and no launch gap between the phases. Each count is released and acquired by
an atomic (acquire-release, GPU scope) after a CTA barrier; data other programs wrote
is read with volatile loads, except the SwiGLU rows, whose lines no program reads
before they are final (rows padded to whole 128-byte lines). In interpret mode the
programs run one after another and the first takes every ticket in order, so every
wait is met at once. Reference: `reference.ragged_dot_ffn` / `dense_ffn`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from sere_jax.kernels.gmm.triton import ItemTable

# Counter slots: the ticket, the number of finished down units, then per item and
# gate/up column block the finished splits, then per item the finished SwiGLU blocks.
_TICKET, _DOWN_DONE, _FIRST_COUNT = 0, 1, 2
# A wait gives up after this many polls (a fraction of a second): a safety net against a bug,
# never reached when the queue's order holds (see the module docstring).
_MAX_POLLS = 1 << 20

_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


def unsupported(x: jax.Array, w_gate_up: jax.Array, w_down: jax.Array) -> str | None:
  """Why the kernel cannot take these inputs (None when it can): tokens and both
  weights must share one dtype, bfloat16, float16 or float32."""
  dtypes = {a.dtype for a in (x, w_gate_up, w_down)}
  if len(dtypes) > 1 or dtypes.pop() not in _DTYPES:
    return (f"takes x and expert weights of one dtype (bfloat16, float16 or float32), "
            f"not {x.dtype}, {w_gate_up.dtype} and {w_down.dtype}")
  return None


def _fused_ffn_kernel(offsets_ref, row_token_ref, x_ref, w_gate_up_ref, w_down_ref,
                      weights_ref, slot_row_ref, valid_ref, counters_in_ref, y_ref,
                      gate_up_ref, hidden_ref, down_ref, counters_ref, *, num_experts,
                      num_tokens, top_k, dim, ffn_dim, row_tiles, block_f, block_d,
                      block_k, block_t, gate_up_splits, down_splits, slot_valid,
                      max_items, combine, poll_sleep_ns, interpret):
  del counters_in_ref  # aliased to counters_ref
  items = ItemTable(offsets_ref, num_experts=num_experts, row_tiles=row_tiles)
  f_blocks, d_blocks = pl.cdiv(ffn_dim, block_f), pl.cdiv(dim, block_d)
  gate_up_per_item = f_blocks * gate_up_splits
  down_per_item = d_blocks * down_splits
  num_gate_up = items.count * gate_up_per_item
  num_down = items.count * down_per_item
  num_units = num_gate_up + num_down
  if combine:
    num_units += pl.cdiv(num_tokens, block_t) * d_blocks
  split_count_base = _FIRST_COUNT
  swiglu_count_base = _FIRST_COUNT + max_items * f_blocks

  # Index and value of every atomic are traced scalars: interpret mode cannot discharge
  # a loop whose body holds array constants, which plain numbers would become there.
  traced_zero = pl.program_id(0) * 0

  def atomic_add(index, value):
    """`counters[index] += value` atomically; returns the old value."""
    return plt.atomic_add(counters_ref, (traced_zero + index,), traced_zero + value)

  def cta_barrier():
    # Interpret mode runs a program's lanes in order (and has no barrier primitive).
    if not interpret:
      plt.debug_barrier()

  def count(index, value=1):
    """Adds `value` to a counter after this program's stores; returns the old value."""
    cta_barrier()
    return atomic_add(index, value)

  def wait_for(index, target):
    """Waits until counter `index` reaches `target`, then acquires what it counts.

    Polls with volatile loads (atomics would queue behind the increments at the
    counter's L2 slice); one atomic read at the end synchronises with every increment
    (they form one release sequence)."""
    def read():
      return plt.load(counters_ref.at[traced_zero + index], volatile=True)

    def pending(carry):
      value, polls = carry
      return (value < target) & (polls < _MAX_POLLS)

    def poll(carry):
      return read(), sleep(carry[1]) + 1

    jax.lax.while_loop(pending, poll, (read(), traced_zero))
    atomic_add(index, 0)
    cta_barrier()

  def sleep(value):
    """`value`, after the thread sleeps `poll_sleep_ns` (PTX nanosleep): waiting
    programs then take fewer issue slots and L2 requests from the working ones."""
    if interpret or not poll_sleep_ns:
      return value
    lanes = jnp.full((1,), value)  # inline asm takes tensors, not scalars
    (lanes,) = plt.elementwise_inline_asm(
        f"nanosleep.u32 {poll_sleep_ns};\n\tmov.b32 $0, $1;", args=[lanes],
        constraints="=r,r", pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(lanes.shape, lanes.dtype)])
    return jnp.sum(lanes)

  def contraction(first_chunk, last_chunk, lhs_at, rhs_at, accs):
    """`accs[i] += lhs @ rhs_i` over the contraction chunks [first, last)."""
    def step(c, accs):
      ks = c * block_k + jnp.arange(block_k)
      lhs = lhs_at(ks)
      new = []
      for acc, rhs in zip(accs, rhs_at(ks)):
        if interpret:  # CPU dots take no bf16 x bf16 -> f32; the f32 product is exact.
          lhs, rhs = lhs.astype(jnp.float32), rhs.astype(jnp.float32)
        new.append(acc + jnp.dot(lhs, rhs, preferred_element_type=jnp.float32))
      return tuple(new)
    return jax.lax.fori_loop(first_chunk, last_chunk, step, accs)

  def split_range(split, size, splits):
    chunks = pl.cdiv(size, block_k)
    per_split = pl.cdiv(chunks, splits)
    return split * per_split, jnp.minimum((split + 1) * per_split, chunks)

  def per_tile(tile, body):
    """Runs `body(tile_m)` for the item's static tile size (Triton tiles are static)."""
    for tile_m in row_tiles:
      pl.when(tile == tile_m)(functools.partial(body, tile_m))

  def gate_up_unit(unit):
    item, rest = unit // gate_up_per_item, unit % gate_up_per_item
    f_block, split = rest // gate_up_splits, rest % gate_up_splits
    expert, row0, end, tile = items.item(item)
    cols = f_block * block_f + jnp.arange(block_f)
    col_ok = cols < ffn_dim

    def body(tile_m):
      rows = row0 + jnp.arange(tile_m)
      row_ok = rows < end
      tokens = plt.load(row_token_ref.at[rows], mask=row_ok, other=0)

      def lhs_at(ks):
        return plt.load(x_ref.at[tokens[:, None], ks[None, :]],
                        mask=(ks < dim)[None, :], other=0)

      def rhs_at(ks):
        ok = (ks < dim)[:, None] & col_ok[None, :]
        return [plt.load(w_gate_up_ref.at[expert, ks[:, None], c[None, :]], mask=ok,
                         other=0) for c in (cols, cols + ffn_dim)]

      zeros = tuple(jnp.zeros((tile_m, block_f), jnp.float32) for _ in range(2))
      gate, up = contraction(*split_range(split, dim, gate_up_splits), lhs_at, rhs_at,
                             zeros)
      ok = row_ok[:, None] & col_ok[None, :]
      if gate_up_splits > 1:
        for c, part in ((cols, gate), (cols + ffn_dim, up)):
          plt.store(gate_up_ref.at[split, rows[:, None], c[None, :]], part, mask=ok)
        done = count(split_count_base + item * f_blocks + f_block)

        @pl.when(done == gate_up_splits - 1)  # the last split: sum every split's part
        def _():
          cta_barrier()
          sums = []
          for c in (cols, cols + ffn_dim):
            total = jnp.zeros((tile_m, block_f), jnp.float32)
            for s in range(gate_up_splits):
              total += plt.load(gate_up_ref.at[s, rows[:, None], c[None, :]], mask=ok,
                                other=0.0, volatile=True)
            sums.append(total)
          write_hidden(item, rows, cols, ok, *sums)
      else:
        write_hidden(item, rows, cols, ok, gate, up)

    per_tile(tile, body)

  def write_hidden(item, rows, cols, ok, gate, up):
    hidden = gate / (1.0 + jnp.exp(-gate)) * up  # SiLU(gate) * up
    plt.store(hidden_ref.at[rows[:, None], cols[None, :]],
              hidden.astype(hidden_ref.dtype), mask=ok)
    count(swiglu_count_base + item)

  def down_unit(unit):
    item, rest = unit // down_per_item, unit % down_per_item
    d_block, split = rest // down_splits, rest % down_splits
    expert, row0, end, tile = items.item(item)
    cols = d_block * block_d + jnp.arange(block_d)
    col_ok = cols < dim
    wait_for(swiglu_count_base + item, f_blocks)

    def body(tile_m):
      rows = row0 + jnp.arange(tile_m)
      row_ok = rows < end

      def lhs_at(ks):
        return plt.load(hidden_ref.at[rows[:, None], ks[None, :]],
                        mask=row_ok[:, None] & (ks < ffn_dim)[None, :], other=0)

      def rhs_at(ks):
        return [plt.load(w_down_ref.at[expert, ks[:, None], cols[None, :]],
                         mask=(ks < ffn_dim)[:, None] & col_ok[None, :], other=0)]

      (out,) = contraction(*split_range(split, ffn_dim, down_splits), lhs_at, rhs_at,
                           (jnp.zeros((tile_m, block_d), jnp.float32),))
      plt.store(down_ref.at[split, rows[:, None], cols[None, :]], out,
                mask=row_ok[:, None] & col_ok[None, :])

    per_tile(tile, body)
    count(_DOWN_DONE)

  def combine_unit(unit):
    t_block, d_block = unit // d_blocks, unit % d_blocks
    tokens = t_block * block_t + jnp.arange(block_t)
    token_ok = tokens < num_tokens
    cols = d_block * block_d + jnp.arange(block_d)
    col_ok = cols < dim
    wait_for(_DOWN_DONE, num_down)
    out = jnp.zeros((block_t, block_d), jnp.float32)
    if not slot_valid:
      token_valid = plt.load(valid_ref.at[tokens], mask=token_ok, other=0) != 0
    for j in range(top_k):
      if slot_valid:
        ok = plt.load(valid_ref.at[tokens, j], mask=token_ok, other=0) != 0
      else:
        ok = token_valid
      ok &= token_ok
      row = plt.load(slot_row_ref.at[tokens, j], mask=ok, other=0)
      weight = plt.load(weights_ref.at[tokens, j], mask=ok, other=0.0)
      load_ok = ok[:, None] & col_ok[None, :]
      for s in range(down_splits):
        part = plt.load(down_ref.at[s, row[:, None], cols[None, :]], mask=load_ok,
                        other=0.0, volatile=True)
        out += weight.astype(jnp.float32)[:, None] * part
    plt.store(y_ref.at[tokens[:, None], cols[None, :]], out.astype(y_ref.dtype),
              mask=token_ok[:, None] & col_ok[None, :])

  def run(ticket):
    pl.when(ticket < num_gate_up)(lambda: gate_up_unit(ticket))
    pl.when((ticket >= num_gate_up) & (ticket < num_gate_up + num_down))(
        lambda: down_unit(ticket - num_gate_up))
    pl.when(ticket >= num_gate_up + num_down)(
        lambda: combine_unit(ticket - num_gate_up - num_down))

  def next_unit(ticket):
    following = atomic_add(_TICKET, 1)  # taken before the work
    run(ticket)
    return following

  jax.lax.while_loop(lambda ticket: ticket < num_units, next_unit,
                     atomic_add(_TICKET, 1))


@functools.partial(jax.jit, static_argnames=(
    "out_dtype", "row_tiles", "block_f", "block_d", "block_k", "block_t",
    "gate_up_splits", "down_splits", "num_warps", "num_stages", "max_programs",
    "combine", "poll_sleep_ns", "interpret"))
def fused_ffn_triton(x: jax.Array, w_gate_up: jax.Array, w_down: jax.Array,
                     group_offsets: jax.Array, row_token: jax.Array, weights: jax.Array,
                     slot_row: jax.Array, valid: jax.Array, *, out_dtype=None,
                     row_tiles: tuple[int, ...] = (16, 32, 64), block_f: int = 64,
                     block_d: int = 128, block_k: int = 64, block_t: int = 16,
                     gate_up_splits: int = 2, down_splits: int = 2, num_warps: int = 4,
                     num_stages: int = 3, max_programs: int = 528,
                     combine: bool = True, poll_sleep_ns: int = 100,
                     interpret: bool = False) -> jax.Array:
  """The routed experts' FFN over a schedule's rows, combined per token, in one kernel.

  Args:
    x: `[T, D]` tokens.
    w_gate_up: `[E, D, 2F]` gate then up projections; `w_down`: `[E, F, D]`.
    group_offsets: `[E + 1]` the schedule's row offsets per expert (rows in expert
      order); `row_token`: `[M]` each row's token (M = T * K).
    weights: `[T, K]` routing weights; `slot_row`: `[T, K]` each slot's row.
    valid: `[T]` (tokens) or `[T, K]` (slots); invalid ones add nothing.
    out_dtype: the output's dtype (default x's).
    row_tiles: ascending powers of two (at least 16), as `gmm.triton.gmm_triton`'s.
    block_f: gate (and up) columns per gate/up unit; `block_d`: output columns per
      down and combine unit; `block_k`: contraction step; `block_t`: tokens per
      combine unit; `gate_up_splits`, `down_splits`: slices of each contraction.
    num_warps, num_stages: Triton options; `max_programs`: the programs launched
      (more than run at once only cost their launch: they find the queue empty).
    combine: combine in the kernel; else return the down projection's float32
      split partials `[down_splits, M, D]` for `reference.combine` of their sum.
    poll_sleep_ns: how long a waiting program sleeps between polls (0: no sleep).

  Returns:
    `y [T, D]`, as `reference.ragged_dot_ffn` computes it (or the partials).
  """
  num_experts, dim, two_f = w_gate_up.shape
  ffn_dim = two_f // 2
  num_tokens, top_k = weights.shape
  num_rows = row_token.shape[0]
  if two_f % 2 or w_down.shape != (num_experts, ffn_dim, dim) or x.shape != (num_tokens,
                                                                             dim):
    raise ValueError(f"fused FFN: x {x.shape}, w_gate_up {w_gate_up.shape} and w_down "
                     f"{w_down.shape} do not fit [T, D], [E, D, 2F] and [E, F, D]")
  if group_offsets.shape != (num_experts + 1,) or slot_row.shape != weights.shape:
    raise ValueError(f"fused FFN: group_offsets {group_offsets.shape} must be "
                     f"[{num_experts + 1}] and slot_row {slot_row.shape} must be "
                     f"{weights.shape}")
  if valid.shape not in ((num_tokens,), (num_tokens, top_k)):
    raise ValueError(f"fused FFN: valid must be [T] or [T, K], got {valid.shape}")
  row_tiles = tuple(row_tiles)
  if (not row_tiles or list(row_tiles) != sorted(set(row_tiles))
      or any(t < 16 or t & (t - 1) for t in row_tiles)):
    raise ValueError("row_tiles must be ascending distinct powers of two >= 16, got "
                     f"{row_tiles}")
  for name, value in (("block_f", block_f), ("block_d", block_d), ("block_k", block_k),
                      ("block_t", block_t)):
    if value < 16 or value & (value - 1):
      raise ValueError(f"{name} must be a power of two >= 16, got {value}")
  out_dtype = out_dtype or x.dtype
  # As in `gmm_triton`: at most min(E, M) experts have rows, each at most s // tile + 1
  # items.
  max_items = max(min(num_experts, num_rows) + num_rows // row_tiles[0], 1)
  f_blocks, d_blocks = pl.cdiv(ffn_dim, block_f), pl.cdiv(dim, block_d)
  max_units = (max_items * (f_blocks * gate_up_splits + d_blocks * down_splits)
               + pl.cdiv(num_tokens, block_t) * d_blocks)
  num_counters = _FIRST_COUNT + max_items * (f_blocks + 1)
  hidden_width = pl.cdiv(ffn_dim, 64) * 64  # whole 128-byte lines per bf16 row
  kernel = functools.partial(
      _fused_ffn_kernel, num_experts=num_experts, num_tokens=num_tokens, top_k=top_k,
      dim=dim, ffn_dim=ffn_dim, row_tiles=row_tiles, block_f=block_f, block_d=block_d,
      block_k=block_k, block_t=block_t, gate_up_splits=gate_up_splits,
      down_splits=down_splits, slot_valid=valid.ndim == 2, max_items=max_items,
      combine=combine, poll_sleep_ns=poll_sleep_ns, interpret=bool(interpret))
  f32 = jnp.float32
  y, _, _, down, _ = pl.pallas_call(
      kernel,
      grid=(max(1, min(max_units, max_programs)),),
      out_shape=(jax.ShapeDtypeStruct((num_tokens, dim), out_dtype),
                 jax.ShapeDtypeStruct((gate_up_splits, num_rows, two_f), f32),
                 jax.ShapeDtypeStruct((num_rows, hidden_width), w_down.dtype),
                 jax.ShapeDtypeStruct((down_splits, num_rows, dim), f32),
                 jax.ShapeDtypeStruct((num_counters,), jnp.int32)),
      input_output_aliases={8: 4},
      compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name="sere_fused_ffn",
  )(group_offsets.astype(jnp.int32), row_token.astype(jnp.int32), x, w_gate_up, w_down,
    weights.astype(f32), slot_row.astype(jnp.int32), valid.astype(jnp.int32),
    jnp.zeros((num_counters,), jnp.int32))
  return y if combine else down

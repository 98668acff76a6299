"""Fused SERE re-routing + expert-skip schedule for NVIDIA GPUs (Pallas Triton).

Grid: one program per block of `chunk` slots (a power of two, as Triton tiles
require). Every program first derives, for the whole batch, what its block needs: the
primary set (flags scattered into the program's own scratch row), each expert's target
(a masked argmax over the `[E, E]` similarity) and the re-routed ids of all slots (a
gather of the targets); these element-wise passes take up to `max_scan_chunk` slots
per step (the whole batch in one step up to 2048 slots). It then places its own
slots: a slot's row is the number of valid slots that sort before it by (expert, slot
index), a comparison count against every slot (up to `max_place_chunk` other slots
per step: the whole batch in one step up to 512 slots), so no prefix sum crosses
programs and the sort is stable. The same pass
counts, for the program's slice of the experts, the valid slots below each expert
(the group offsets) and marks the experts in use (the distinct count). Its outputs
equal `reference.reference_schedule` exactly; the active-expert list is derived from
the offsets outside the kernel (and dropped by XLA where nothing reads it). A
non-finite similarity entry counts as the least similar value, as the reference's
`validation.similarity_for_routing` defines; the kernel applies that rule on load.

Programs share nothing: each repeats the batch-wide steps (latency-bound work done in
parallel) instead of waiting on a grid-wide barrier, which Triton lacks. Within a
program, `debug_barrier` orders its scratch writes before the reads.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from sere_jax import validation
from sere_jax.config import RerouteConfig
from sere_jax.kernels.schedule import reference as schedule_lib

# Rows of a program's scratch, each `experts_pad` wide, followed by the new ids.
_PRIMARY, _SECONDARY, _TARGET, _USED_AFTER = range(4)
_SCRATCH_ROWS = 4


def _pow2_at_least(x: int) -> int:
  return 1 << (max(x, 1) - 1).bit_length()


def _count(mask) -> jax.Array:
  return jnp.sum(jnp.where(mask, 1, 0))


def _over_chunks(num_chunks: int, body, carry):
  """`carry = body(c, carry)` over the slot chunks: inline for one chunk, else a loop.

  Unrolling many chunks made the kernel too slow to compile on the H200 (T*K = 2048
  with `sere` did not compile within 100 s).
  """
  if num_chunks == 1:
    return body(0, carry)
  return jax.lax.fori_loop(0, num_chunks, body, carry)


def _schedule_kernel(ids_ref, valid_ref, sim_ref, new_ids_ref, slot_row_ref,
                     row_token_ref, offsets_ref, stats_ref, scratch_ref, *, num_tokens,
                     top_k, num_experts, select_top_k, threshold, min_batch, chunk,
                     num_chunks, scan_chunk, place_chunk, experts_pad, expert_slice,
                     interpret):
  num_slots = num_tokens * top_k
  program = pl.program_id(0)
  expert = jnp.arange(experts_pad)
  real = expert < num_experts
  scratch_width = _SCRATCH_ROWS * experts_pad + num_chunks * chunk

  def scratch(row, index):
    """This program's scratch at `index` of `row` (row `_SCRATCH_ROWS`: new ids)."""
    return scratch_ref.at[program, row * experts_pad + index]

  def barrier():
    # Interpret mode runs a program's lanes in order (and has no barrier primitive).
    if not interpret:
      plt.debug_barrier()

  def load_chunk(c, size=chunk):
    """Slot indices, ids, token, rank within token and validity of the `c`-th block
    of `size` slots."""
    slot = c * size + jnp.arange(size)
    in_range = slot < num_slots
    token = slot // top_k
    ids = plt.load(ids_ref.at[slot], mask=in_range, other=0)
    valid = (plt.load(valid_ref.at[token], mask=in_range, other=0) != 0) & in_range
    return slot, in_range, ids, token, slot % top_k, valid

  def scatter_ones(row, ids, mask):
    # Masked-off lanes point past the scratch: no write on GPU, dropped in interpret
    # mode (where a masked scatter would otherwise write back stale values).
    index = jnp.where(mask, row * experts_pad + ids, scratch_width)
    plt.store(scratch_ref.at[program, index], jnp.ones_like(ids), mask=mask)

  def flags(row):
    return plt.load(scratch(row, expert), volatile=True) > 0

  reroute = select_top_k > 0
  num_scans = pl.cdiv(num_slots, scan_chunk)
  zero_rows = (_PRIMARY, _SECONDARY, _USED_AFTER) if reroute else (_USED_AFTER,)
  for row in zero_rows:
    plt.store(scratch(row, expert), jnp.zeros_like(expert))
  barrier()

  distinct_before = critical_kept = slots_rerouted = None
  if reroute:
    sim = validation.least_similar_where_non_finite(plt.load(
        sim_ref.at[expert[:, None], expert[None, :]],
        mask=real[:, None] & real[None, :], other=0.0))  # padding: never a primary

    def mark(c, valid_tokens):  # which experts are primary, used by secondaries
      _, _, ids, _, j, valid = load_chunk(c, scan_chunk)
      scatter_ones(_PRIMARY, ids, valid & (j < select_top_k))
      scatter_ones(_SECONDARY, ids, valid & (j >= select_top_k))
      return valid_tokens + _count(valid & (j == 0))

    valid_tokens = _over_chunks(num_scans, mark, jnp.int32(0))
    barrier()
    is_primary, secondary_used = flags(_PRIMARY), flags(_SECONDARY)
    distinct_before = _count((is_primary | secondary_used) & real)

    # Per-expert target: itself, or its most similar primary expert.
    apply = (_count(is_primary) > 0) & (valid_tokens >= max(min_batch, 1))
    masked = jnp.where(is_primary[None, :], sim, -jnp.inf)
    nearest = jnp.argmax(masked, axis=1).astype(jnp.int32)
    critical = ~is_primary & apply
    if threshold > 0:
      critical &= jnp.max(masked, axis=1) < threshold
    else:
      critical &= False
    target = jnp.where(is_primary | critical | ~apply, expert, nearest)
    critical_kept = _count(critical & secondary_used & real)
    plt.store(scratch(_TARGET, expert), target)
    barrier()

    def reroute_chunk(c, rerouted):  # every slot's new id, into this program's scratch
      slot, in_range, ids, _, j, valid = load_chunk(c, scan_chunk)
      mapped = plt.load(scratch(_TARGET, ids), mask=in_range, other=0, volatile=True)
      new_ids = jnp.where(j >= select_top_k, mapped, ids)
      plt.store(scratch(_SCRATCH_ROWS, slot), new_ids, mask=in_range)
      return rerouted + _count(valid & (new_ids != ids))

    slots_rerouted = _over_chunks(num_scans, reroute_chunk, jnp.int32(0))
    barrier()

  def rerouted_chunk(c, size=chunk):
    slot, in_range, ids, token, _, valid = load_chunk(c, size)
    if reroute:
      ids = plt.load(scratch(_SCRATCH_ROWS, slot), mask=in_range, other=0, volatile=True)
    return slot, in_range, ids, token, valid

  # This program's slots and experts: a slot's row is the number of valid slots
  # before it in (expert, slot) order; an expert's offset the number below it.
  slot, in_range, new_ids, token, valid = rerouted_chunk(program)
  my_experts = program * expert_slice + jnp.arange(expert_slice)

  def place(c, carry):
    rows, below, total = carry
    other_slot, _, other_ids, _, other_valid = rerouted_chunk(c, place_chunk)
    scatter_ones(_USED_AFTER, other_ids, other_valid)
    before = (other_ids[None, :] < new_ids[:, None]) | (
        (other_ids[None, :] == new_ids[:, None]) & (other_slot[None, :] < slot[:, None]))
    rows += jnp.sum(jnp.where(before & other_valid[None, :], 1, 0), axis=1)
    lower = (other_ids[:, None] < my_experts[None, :]) & other_valid[:, None]
    below += jnp.sum(jnp.where(lower, 1, 0), axis=0)
    return rows, below, total + _count(other_valid)

  zeros = (jnp.zeros_like(slot), jnp.zeros_like(my_experts), jnp.int32(0))
  rows, below, total = _over_chunks(pl.cdiv(num_slots, place_chunk), place, zeros)
  plt.store(new_ids_ref.at[slot], new_ids, mask=in_range)
  plt.store(slot_row_ref.at[slot], jnp.where(valid, rows, 0), mask=in_range)
  plt.store(row_token_ref.at[slot], jnp.zeros_like(slot), mask=in_range & (slot >= total))
  # Masked-off lanes point past the end: no write on GPU, dropped in interpret mode.
  plt.store(row_token_ref.at[jnp.where(valid, rows, num_slots)], token, mask=valid)
  plt.store(offsets_ref.at[my_experts], below, mask=my_experts < num_experts)
  barrier()

  @pl.when(program == 0)
  def _():
    offsets_ref[num_experts] = total
    num_distinct = _count(flags(_USED_AFTER) & real)
    stat_index = jnp.arange(8)
    stats = jnp.zeros((8,), jnp.int32)
    for i, value in enumerate((
        num_distinct if distinct_before is None else distinct_before, num_distinct,
        0 if critical_kept is None else critical_kept,
        0 if slots_rerouted is None else slots_rerouted, total)):
      stats = jnp.where(stat_index == i, value, stats)
    plt.store(stats_ref.at[stat_index], stats,
              mask=stat_index < len(schedule_lib.STAT_NAMES))


@functools.partial(jax.jit, static_argnames=("config", "num_experts", "max_chunk",
                                             "max_scan_chunk", "max_place_chunk",
                                             "num_warps", "interpret"))
def schedule_triton(ids: jax.Array, valid: jax.Array, similarity: jax.Array | None,
                    config: RerouteConfig, *, num_experts: int, max_chunk: int = 64,
                    max_scan_chunk: int = 2048, max_place_chunk: int = 512,
                    num_warps: int = 8,
                    interpret: bool = False) -> schedule_lib.Schedule:
  """Re-routes `ids [T, K]` (policy `none` or `sere`) and builds the schedule.

  Args:
    ids: `[T, K]` top-K expert ids sorted by score.
    valid: `[T]` bool mask of real tokens.
    similarity: `[E, E]` similarity (ignored when the config does not re-route).
    config: the re-routing config.
    num_experts: E.
    max_chunk: slots per program (a power of two of at least 64).
    max_scan_chunk: slots per step of the batch-wide element-wise passes (marking the
      primary set, re-routing); a power of two, raised to the program's chunk.
    max_place_chunk: slots compared with a program's own per step of the placing
      pass (a power of two, raised to the program's chunk).
    num_warps: warps per program.

  The defaults come from the schedule sweep on an H200
  (`docs/benchmarks/schedule_sweep_h200.json`): placing in one 512-slot step instead
  of 64-slot steps took SERE S=2 from 14.2 to 10.6 us at B = 64 and from 38.6 to 30.0
  at B = 256; 8 warps then 10.4 and 26.8.
  """
  num_tokens, top_k = ids.shape
  select_top_k, threshold, min_batch = schedule_lib.sere_kernel_config(config, top_k)
  for name, value in (("max_chunk", max_chunk), ("max_scan_chunk", max_scan_chunk),
                      ("max_place_chunk", max_place_chunk)):
    if value < 64 or value & (value - 1):
      raise ValueError(f"{name} must be a power of two >= 64, got {value}")
  # Triton tiles hold a power of two of elements; tiny slot tiles mis-lowered on an
  # H200 (T=1, K=8), so a chunk holds at least 64 slots and at most `max_chunk`.
  num_slots = num_tokens * top_k
  chunk = min(max(64, _pow2_at_least(num_slots)), max_chunk)
  num_chunks = pl.cdiv(num_slots, chunk)
  scan_chunk = max(chunk, min(_pow2_at_least(num_slots), max_scan_chunk))
  place_chunk = max(chunk, min(_pow2_at_least(num_slots), max_place_chunk))
  experts_pad = _pow2_at_least(num_experts)
  # Each program counts the offsets of a slice of the experts (at least 16 lanes);
  # the slices together cover every expert.
  expert_slice = max(16, _pow2_at_least(pl.cdiv(experts_pad, num_chunks)))
  if similarity is None or not select_top_k:
    similarity = jnp.zeros((1, 1), jnp.float32)
  kernel = functools.partial(
      _schedule_kernel, num_tokens=num_tokens, top_k=top_k, num_experts=num_experts,
      select_top_k=select_top_k, threshold=threshold, min_batch=min_batch,
      chunk=chunk, num_chunks=num_chunks, scan_chunk=scan_chunk, place_chunk=place_chunk,
      experts_pad=experts_pad, expert_slice=expert_slice, interpret=bool(interpret))
  i32 = jnp.int32
  scratch_width = _SCRATCH_ROWS * experts_pad + num_chunks * chunk
  new_ids, slot_row, row_token, offsets, stats, _ = pl.pallas_call(
      kernel,
      grid=(num_chunks,),
      out_shape=(jax.ShapeDtypeStruct((num_slots,), i32),
                 jax.ShapeDtypeStruct((num_slots,), i32),
                 jax.ShapeDtypeStruct((num_slots,), i32),
                 jax.ShapeDtypeStruct((num_experts + 1,), i32),
                 jax.ShapeDtypeStruct((len(schedule_lib.STAT_NAMES),), i32),
                 jax.ShapeDtypeStruct((num_chunks, scratch_width), i32)),  # per program
      compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret,
      name="sere_schedule",
  )(ids.reshape(-1).astype(i32), valid.astype(i32), similarity.astype(jnp.float32))
  return schedule_lib.Schedule(new_ids.reshape(num_tokens, top_k),
                               slot_row.reshape(num_tokens, top_k), row_token, offsets,
                               schedule_lib.active_experts_from_offsets(offsets), stats)

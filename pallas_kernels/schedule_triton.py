"""Fused SERE re-routing + expert-skip schedule for NVIDIA GPUs (Pallas Triton).

One program walks the batch's `T*K` slots in register chunks (a power of two, as
Triton requires) and does, without leaving the kernel:
primary set -> most similar primary per expert (masked argmax over the `[E, E]`
similarity) -> critical experts -> re-routed ids -> stable counting sort by expert
(one-hot prefix sums, carried across chunks) -> group offsets, the active-expert
list and statistics.
Its outputs equal `schedule.reference_schedule` exactly.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from sere_jax.config import RerouteConfig
from sere_jax.kernels import schedule as schedule_lib


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
                     row_token_ref, offsets_ref, active_ref, stats_ref, *,
                     num_tokens, top_k, num_experts, select_top_k, threshold, min_batch,
                     chunk, num_chunks, experts_pad):
  num_slots = num_tokens * top_k
  expert = jnp.arange(experts_pad)

  def load_chunk(c):
    """Slot indices, ids, token, rank within token and validity of chunk `c`."""
    slot = c * chunk + jnp.arange(chunk)
    in_range = slot < num_slots
    token = slot // top_k
    ids = plt.load(ids_ref.at[slot], mask=in_range, other=0)
    valid = (plt.load(valid_ref.at[token], mask=in_range, other=0) != 0) & in_range
    return slot, in_range, ids, token, slot % top_k, valid

  def expert_hits(mask):  # [chunk, experts] -> [experts] int32, 1 where any slot hits
    return jnp.max(jnp.where(mask, 1, 0), axis=0)

  # Pass 1: which experts are used, primary, and used by secondary slots.
  def pass1(c, carry):
    used, primary, secondary, valid_tokens = carry
    _, _, ids, _, j, valid = load_chunk(c)
    onehot = ids[:, None] == expert[None, :]
    used = jnp.maximum(used, expert_hits(onehot & valid[:, None]))
    if select_top_k > 0:
      primary = jnp.maximum(primary, expert_hits(
          onehot & (valid & (j < select_top_k))[:, None]))
      secondary = jnp.maximum(secondary, expert_hits(
          onehot & (valid & (j >= select_top_k))[:, None]))
      valid_tokens += _count(valid & (j == 0))
    return used, primary, secondary, valid_tokens

  none_hit = jnp.zeros_like(expert)
  used, is_primary, secondary_used, valid_tokens = _over_chunks(
      num_chunks, pass1, (none_hit, none_hit, none_hit, jnp.int32(0)))
  is_primary, secondary_used = is_primary > 0, secondary_used > 0
  distinct_before = _count(used > 0)

  # Per-expert target: itself, or its most similar primary expert.
  critical_kept = 0
  target = expert
  if select_top_k > 0:
    apply = (_count(is_primary) > 0) & (valid_tokens >= max(min_batch, 1))
    real = expert < num_experts
    sim = plt.load(sim_ref.at[expert[:, None], expert[None, :]],
                   mask=real[:, None] & real[None, :], other=-jnp.inf)
    masked = jnp.where(is_primary[None, :], sim, -jnp.inf)
    nearest = jnp.argmax(masked, axis=1).astype(jnp.int32)
    critical = ~is_primary & apply
    if threshold > 0:
      critical &= jnp.max(masked, axis=1) < threshold
    else:
      critical &= False
    target = jnp.where(is_primary | critical | ~apply, expert, nearest)
    critical_kept = _count(critical & secondary_used)

  def rerouted_chunk(c):
    slot, in_range, ids, token, j, valid = load_chunk(c)
    if select_top_k > 0:
      mapped = jnp.sum(jnp.where(ids[:, None] == expert[None, :], target[None, :], 0),
                       axis=1)
      new_ids = jnp.where(j >= select_top_k, mapped, ids)
    else:
      new_ids = ids
    member = (new_ids[:, None] == expert[None, :]) & valid[:, None]
    return slot, in_range, ids, new_ids, token, valid, member

  # Pass 2: re-routed ids and group sizes.
  def pass2(c, carry):
    sizes, slots_rerouted = carry
    slot, in_range, ids, new_ids, _, valid, member = rerouted_chunk(c)
    plt.store(new_ids_ref.at[slot], new_ids, mask=in_range)
    return (sizes + jnp.sum(jnp.where(member, 1, 0), axis=0),
            slots_rerouted + _count(valid & (new_ids != ids)))

  sizes, slots_rerouted = _over_chunks(num_chunks, pass2, (none_hit, jnp.int32(0)))
  total = jnp.sum(sizes)
  offsets_excl = jnp.cumsum(sizes) - sizes

  # Pass 3: stable counting sort: row = group offset + rank among the group's slots.
  def pass3(c, before):
    slot, in_range, _, _, token, valid, member = rerouted_chunk(c)
    member_i = jnp.where(member, 1, 0)
    position = jnp.cumsum(member_i, axis=0) - 1 + before[None, :]
    row = jnp.sum(jnp.where(member, position, 0), axis=1)
    plt.store(slot_row_ref.at[slot], jnp.where(valid, row, 0), mask=in_range)
    plt.store(row_token_ref.at[slot], jnp.zeros_like(slot),
              mask=in_range & (slot >= total))
    # Masked-off lanes point past the end: no write on GPU, dropped in interpret mode.
    plt.store(row_token_ref.at[jnp.where(valid, row, num_slots)], token, mask=valid)
    return before + jnp.sum(member_i, axis=0)

  _over_chunks(num_chunks, pass3, offsets_excl)

  real = expert < num_experts
  plt.store(offsets_ref.at[expert], offsets_excl, mask=real)
  offsets_ref[num_experts] = total
  active = sizes > 0
  num_distinct = _count(active)
  last_active = jnp.maximum(jnp.max(jnp.where(active, expert, -1)), 0)
  active_rank = jnp.cumsum(jnp.where(active, 1, 0)) - 1
  plt.store(active_ref.at[expert], jnp.full_like(expert, last_active),
            mask=(expert >= num_distinct) & real)
  plt.store(active_ref.at[jnp.where(active, active_rank, num_experts)], expert, mask=active)

  stat_index = jnp.arange(8)
  stats = jnp.zeros((8,), jnp.int32)
  for i, value in enumerate((distinct_before, num_distinct, critical_kept,
                             slots_rerouted, total)):
    stats = jnp.where(stat_index == i, value, stats)
  plt.store(stats_ref.at[stat_index], stats, mask=stat_index < len(schedule_lib.STAT_NAMES))


@functools.partial(jax.jit, static_argnames=("config", "num_experts", "max_chunk",
                                             "num_warps", "interpret"))
def schedule_triton(ids: jax.Array, valid: jax.Array, similarity: jax.Array | None,
                    config: RerouteConfig, *, num_experts: int, max_chunk: int = 256,
                    num_warps: int = 8,
                    interpret: bool = False) -> schedule_lib.Schedule:
  """Re-routes `ids [T, K]` (policy `none` or `sere`) and builds the schedule.

  Args:
    ids: `[T, K]` top-K expert ids sorted by score.
    valid: `[T]` bool mask of real tokens.
    similarity: `[E, E]` similarity (ignored when the config does not re-route).
    config: the re-routing config.
    num_experts: E.
  """
  num_tokens, top_k = ids.shape
  select_top_k, threshold, min_batch = schedule_lib.sere_kernel_config(config, top_k)
  # Triton tiles hold a power of two of elements; tiny slot tiles mis-lowered on an
  # H200 (T=1, K=8), so a chunk holds at least 64 slots and at most `max_chunk`.
  chunk = min(max(64, _pow2_at_least(num_tokens * top_k)), max_chunk)
  if similarity is None or not select_top_k:
    similarity = jnp.zeros((1, 1), jnp.float32)
  num_slots = num_tokens * top_k
  kernel = functools.partial(
      _schedule_kernel, num_tokens=num_tokens, top_k=top_k, num_experts=num_experts,
      select_top_k=select_top_k, threshold=threshold, min_batch=min_batch,
      chunk=chunk, num_chunks=pl.cdiv(num_slots, chunk),
      experts_pad=_pow2_at_least(num_experts))
  i32 = jnp.int32
  new_ids, slot_row, row_token, offsets, active, stats = pl.pallas_call(
      kernel,
      grid=(1,),
      out_shape=(jax.ShapeDtypeStruct((num_slots,), i32),
                 jax.ShapeDtypeStruct((num_slots,), i32),
                 jax.ShapeDtypeStruct((num_slots,), i32),
                 jax.ShapeDtypeStruct((num_experts + 1,), i32),
                 jax.ShapeDtypeStruct((num_experts,), i32),
                 jax.ShapeDtypeStruct((len(schedule_lib.STAT_NAMES),), i32)),
      compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret,
      name="sere_schedule",
  )(ids.reshape(-1).astype(i32), valid.astype(i32), similarity.astype(jnp.float32))
  return schedule_lib.Schedule(new_ids.reshape(num_tokens, top_k),
                               slot_row.reshape(num_tokens, top_k), row_token, offsets,
                               active, stats)

"""Fused SERE re-routing + expert-skip schedule for TPUs (Pallas Mosaic).

One kernel invocation holds the batch's `S = T*K` slots in VMEM as 2-D arrays (TPU
vector units work on (8, 128) tiles, so there are no 1-D values): per-slot fields
both as a column `[S, 1]` and as a row `[1, S]`, experts padded to a multiple of 128
lanes. It does, without leaving the kernel:
primary set -> most similar primary per expert (masked arg-max over the `[E, E]`
similarity) -> critical experts -> re-routed ids -> stable counting sort by expert
(pairwise comparisons of `(expert, slot)` keys, no cumsum) -> group offsets, the
active-expert list and statistics. Orientation changes of small vectors are
masked reductions against an identity mask, so no transposes are lowered. Integer
arithmetic avoids division. Outputs equal `reference.reference_schedule` exactly; a
non-finite similarity entry counts as the least similar value, as the reference's
`validation.similarity_for_routing` defines (applied in the kernel).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from sere_jax import validation
from sere_jax.config import RerouteConfig
from sere_jax.kernels.schedule import reference as schedule_lib

_LANES = 128
_SLOT_CHUNK = 256  # slots per pass of the [chunk, S] sort comparisons
_FIELDS = ("id", "valid", "rank", "token")  # per-slot inputs, in this order


def _ints(mask) -> jax.Array:
  return jnp.where(mask, 1, 0)


def _any(mask, axis: int) -> jax.Array:
  return jnp.max(_ints(mask), axis=axis, keepdims=True) > 0


def _count(mask) -> jax.Array:
  """`[1, 1]` number of true entries of a 2-D mask."""
  return jnp.sum(jnp.sum(_ints(mask), axis=0, keepdims=True), axis=1, keepdims=True)


def _iota(shape, axis: int) -> jax.Array:
  return jax.lax.broadcasted_iota(jnp.int32, shape, axis)


def _schedule_kernel(col_ref, row_ref, ints_ref, rho_ref, sim_ref, ids_ref, slot_row_ref,
                     row_token_ref, offsets_ref, active_ref, stats_ref, *, reroute):
  slots, experts = col_ref.shape[1], offsets_ref.shape[1]
  ids_c, valid_c, rank_c, token_c = (col_ref[j] for j in range(len(_FIELDS)))  # [S, 1]
  ids_r, valid_r, rank_r = (row_ref[j] for j in range(3))  # [1, S]; tokens: column only
  valid_c, valid_r = valid_c != 0, valid_r != 0
  e_lane, e_sub = _iota((1, experts), 1), _iota((experts, 1), 0)
  onehot = ids_c == e_lane  # [S, E]
  onehot_t = ids_r == e_sub  # [E, S]
  distinct_before = _count(_any(onehot_t & valid_r, axis=1))

  if reroute:
    select_top_k, min_batch, threshold = ints_ref[0], ints_ref[1], rho_ref[0]
    is_primary_r = _any(onehot & (valid_c & (rank_c < select_top_k)), axis=0)  # [1, E]
    is_primary_c = _any(onehot_t & (valid_r & (rank_r < select_top_k)), axis=1)
    apply = (_count(valid_r & (rank_r == 0)) >= min_batch) & _any(is_primary_r, axis=1)
    sim = validation.least_similar_where_non_finite(sim_ref[...])
    masked = jnp.where(is_primary_r, sim, -jnp.inf)  # [expert, primary]
    best = jnp.max(masked, axis=1, keepdims=True)
    nearest = jnp.min(jnp.where(masked == best, e_lane, experts), axis=1, keepdims=True)
    critical = ~is_primary_c & apply & (best < threshold)  # [E, 1]
    target_c = jnp.where(is_primary_c | critical | ~apply, e_sub, nearest)  # [E, 1]
    target_r = jnp.sum(jnp.where(e_sub == e_lane, target_c, 0), axis=0, keepdims=True)
    secondary_c, secondary_r = rank_c >= select_top_k, rank_r >= select_top_k
    new_c = jnp.where(secondary_c,
                      jnp.sum(jnp.where(onehot, target_r, 0), axis=1, keepdims=True), ids_c)
    new_r = jnp.where(secondary_r,
                      jnp.sum(jnp.where(onehot_t, target_c, 0), axis=0, keepdims=True),
                      ids_r)
    secondary_used = _any(onehot_t & (valid_r & secondary_r), axis=1)
    critical_kept = _count(critical & secondary_used)
    slots_rerouted = _count(valid_r & (new_r != ids_r))
  else:
    new_c, new_r = ids_c, ids_r
    critical_kept = slots_rerouted = jnp.zeros((1, 1), jnp.int32)

  # Group offsets: lane e counts valid slots of experts below e (lane E: all of them).
  offsets_ref[...] = jnp.sum(_ints((new_c < e_lane) & valid_c), axis=0, keepdims=True)
  sizes_c = jnp.sum(_ints((new_r == e_sub) & valid_r), axis=1, keepdims=True)
  sizes_r = jnp.sum(_ints((new_c == e_lane) & valid_c), axis=0, keepdims=True)
  total = _count(valid_r)

  # Stable counting sort: a valid slot's row is the number of valid slots whose
  # (expert, slot) key is smaller; row_token inverts that map.
  s_lane = _iota((1, slots), 1)
  key_r = new_r * slots + s_lane
  row_token = jnp.zeros((1, slots), jnp.int32)
  for start in range(0, slots, _SLOT_CHUNK):
    part = slice(start, min(start + _SLOT_CHUNK, slots))
    key_c = new_c[part] * slots + _iota((part.stop - start, 1), 0) + start
    row = jnp.sum(_ints(valid_r & (key_r < key_c)), axis=1, keepdims=True)
    slot_row_ref[part, :] = jnp.where(valid_c[part], row, 0)
    row_token += jnp.sum(jnp.where(valid_c[part] & (row == s_lane), token_c[part], 0),
                         axis=0, keepdims=True)
  row_token_ref[...] = row_token
  ids_ref[...] = new_r

  # Active experts ascending: expert e goes to lane (number of active experts below e).
  active_c, active_r = sizes_c > 0, sizes_r > 0
  num_distinct = _count(active_r)
  rank = jnp.sum(_ints(active_r & (e_lane < e_sub)), axis=1, keepdims=True)  # [E, 1]
  packed = jnp.sum(jnp.where(active_c & (rank == e_lane), e_sub, 0), axis=0,
                   keepdims=True)
  last = jnp.max(jnp.where(active_c, e_sub, 0), axis=0, keepdims=True)
  active_ref[...] = jnp.where(e_lane < num_distinct, packed, last)

  stat_lane = _iota(stats_ref.shape, 1)
  stats = jnp.zeros(stats_ref.shape, jnp.int32)
  for i, value in enumerate((distinct_before, num_distinct, critical_kept,
                             slots_rerouted, total)):
    stats = jnp.where(stat_lane == i, value, stats)
  stats_ref[...] = stats


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def schedule_tpu(ids: jax.Array, valid: jax.Array, similarity: jax.Array | None,
                 config: RerouteConfig, *, num_experts: int,
                 interpret: bool | pltpu.InterpretParams = False
                 ) -> schedule_lib.Schedule:
  """Re-routes `ids [T, K]` (policy `none` or `sere`) and builds the schedule.

  S, rho and min_batch reach the kernel as run-time values, so all `sere` configs
  share one compiled kernel per shape.

  Args:
    ids: `[T, K]` top-K expert ids sorted by score.
    valid: `[T]` bool mask of real tokens.
    similarity: `[E, E]` similarity (ignored when the config does not re-route).
    config: the re-routing config.
    num_experts: E.
    interpret: run in Pallas interpret mode (True or `pltpu.InterpretParams`).
  """
  if ids.ndim != 2 or valid.shape != ids.shape[:1]:
    raise ValueError(f"ids must be [T, K] and valid [T], got shapes {ids.shape} and "
                     f"{valid.shape}")
  select_top_k, threshold, min_batch = schedule_lib.sere_kernel_config(config, ids.shape[1])
  if not select_top_k:
    similarity = None
  elif similarity is None or similarity.shape != (num_experts, num_experts):
    raise ValueError(f"policy 'sere' needs a [{num_experts}, {num_experts}] similarity, "
                     f"got {None if similarity is None else similarity.shape}")
  ints = jnp.array([select_top_k, max(min_batch, 1)], jnp.int32)
  # rho = 0 turns critical-expert preservation off: no similarity is below -inf.
  rho = jnp.array([threshold if threshold > 0 else -jnp.inf], jnp.float32)
  return _schedule(ids, valid, similarity, ints, rho, num_experts=num_experts,
                   interpret=interpret)


@functools.partial(jax.jit, static_argnames=("num_experts", "interpret"))
def _schedule(ids, valid, similarity, ints, rho, *, num_experts, interpret):
  num_tokens, top_k = ids.shape
  num_slots = num_tokens * top_k
  slots = _round_up(max(num_slots, 1), _LANES)
  experts = _round_up(num_experts + 1, _LANES)  # the offsets need E + 1 lanes
  reroute = similarity is not None
  if reroute:
    sim = jnp.pad(similarity.astype(jnp.float32),
                  ((0, experts - num_experts), (0, experts - num_experts)))
  else:
    sim = jnp.zeros((8, _LANES), jnp.float32)  # not read

  fields = jnp.stack([ids.reshape(-1).astype(jnp.int32),
                      jnp.repeat(valid.astype(jnp.int32), top_k),
                      jnp.tile(jnp.arange(top_k, dtype=jnp.int32), num_tokens),
                      jnp.repeat(jnp.arange(num_tokens, dtype=jnp.int32), top_k)])
  fields = jnp.pad(fields, ((0, 0), (0, slots - num_slots)))  # padding slots are invalid
  vmem = pl.BlockSpec(memory_space=pltpu.VMEM)
  smem = pl.BlockSpec(memory_space=pltpu.SMEM)

  i32 = jnp.int32
  new_ids, slot_row, row_token, offsets, active, stats = pl.pallas_call(
      functools.partial(_schedule_kernel, reroute=reroute),
      out_shape=(jax.ShapeDtypeStruct((1, slots), i32),
                 jax.ShapeDtypeStruct((slots, 1), i32),
                 jax.ShapeDtypeStruct((1, slots), i32),
                 jax.ShapeDtypeStruct((1, experts), i32),
                 jax.ShapeDtypeStruct((1, experts), i32),
                 jax.ShapeDtypeStruct((1, _LANES), i32)),
      in_specs=[vmem, vmem, smem, smem, vmem],
      interpret=interpret,
      name="sere_schedule",
  )(fields[:, :, None], fields[:, None, :], ints, rho, sim)
  return schedule_lib.Schedule(
      new_ids[0, :num_slots].reshape(num_tokens, top_k),
      slot_row[:num_slots, 0].reshape(num_tokens, top_k), row_token[0, :num_slots],
      offsets[0, :num_experts + 1], active[0, :num_experts],
      stats[0, :len(schedule_lib.STAT_NAMES)])

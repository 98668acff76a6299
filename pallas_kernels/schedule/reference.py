"""The expert-skip schedule and its pure-jnp reference.

A batch's `T*K` (token, slot) pairs become rows sorted by expert. Slots of invalid
tokens (or invalid slots, given a `[T, K]` mask) get no row. `Schedule` is the data
every grouped-matmul backend consumes; `reference_schedule` (re-routing with `none` or
`sere`, then `build_schedule`) is the definition that the kernels in `triton.py` and
`tpu.py` must reproduce exactly.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from sere_jax import policies
from sere_jax.config import RerouteConfig

# Layout of `Schedule.stats`.
STAT_NAMES = ("distinct_before", "distinct_after", "critical_kept", "slots_rerouted",
              "valid_rows")


class Schedule(NamedTuple):
  """Re-routed ids and the rows of the grouped matmuls, sorted by expert.

  With `M = T*K` rows (rows past `valid_rows` are padding) and `E` experts:
    ids: `[T, K]` int32 re-routed expert ids.
    slot_row: `[T, K]` int32 row of each slot (0 for slots of invalid tokens).
    row_token: `[M]` int32 token of each row (0 on padding rows).
    group_offsets: `[E + 1]` int32; expert `e` owns rows `[offsets[e], offsets[e+1])`.
    active_experts: `[E]` int32 experts with rows, ascending, padded with the last
      active expert (0 when none is active) so that padded steps repeat a block index.
    stats: `[5]` int32, see `STAT_NAMES`; `stats[1]` is the number of distinct experts.
  """

  ids: jax.Array
  slot_row: jax.Array
  row_token: jax.Array
  group_offsets: jax.Array
  active_experts: jax.Array
  stats: jax.Array

  @property
  def num_distinct(self) -> jax.Array:
    return self.stats[1]

  @property
  def group_sizes(self) -> jax.Array:
    return jnp.diff(self.group_offsets)


def sere_kernel_config(config: RerouteConfig, top_k: int) -> tuple[int, float, int]:
  """`(S, rho, min_batch)` for the schedule kernels, which implement `none` and `sere`.

  Raises ValueError for policies that the kernels do not fuse.
  """
  if not config.is_active(top_k):
    return 0, 0.0, 0
  if config.policy != "sere":
    raise ValueError(f"the fused schedule kernels implement policies 'none' and 'sere', "
                     f"not {config.policy!r}; re-route with sere_jax.reroute first")
  return config.select_top_k, float(config.threshold), config.min_batch


def active_experts_from_offsets(group_offsets: jax.Array) -> jax.Array:
  """`[E]` experts with rows, ascending, padded with the last one (0 when none)."""
  num_experts = group_offsets.shape[0] - 1
  active = jnp.diff(group_offsets) > 0
  num_distinct = jnp.sum(active, dtype=jnp.int32)
  experts = jnp.arange(num_experts, dtype=jnp.int32)
  packed = jnp.sort(jnp.where(active, experts, num_experts))
  last = jnp.where(num_distinct > 0, packed[jnp.maximum(num_distinct - 1, 0)], 0)
  return jnp.where(experts < num_distinct, packed, last).astype(jnp.int32)


def slot_mask(valid: jax.Array, shape: tuple[int, int]) -> jax.Array:
  """`[T, K]` bool from a token mask `valid [T]` or a slot mask `[T, K]`."""
  valid = valid.astype(jnp.bool_)
  return valid if valid.ndim == 2 else jnp.broadcast_to(valid[:, None], shape)


def build_schedule(ids: jax.Array, valid: jax.Array, num_experts: int,
                   stats: policies.RerouteStats | None = None) -> Schedule:
  """Sorts already re-routed `ids [T, K]` of valid tokens (`valid [T]`) or valid slots
  (`[T, K]`) by expert (stable)."""
  num_tokens, top_k = ids.shape
  num_rows = num_tokens * top_k
  slot_valid = slot_mask(valid, ids.shape).reshape(-1)
  flat = ids.reshape(-1)
  sizes = jnp.zeros((num_experts,), jnp.int32).at[flat].add(slot_valid.astype(jnp.int32))
  offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(sizes, dtype=jnp.int32)])
  order = jnp.argsort(jnp.where(slot_valid, flat, num_experts), stable=True)
  rows = jnp.arange(num_rows, dtype=jnp.int32)
  slot_row = jnp.zeros((num_rows,), jnp.int32).at[order].set(rows)
  slot_row = jnp.where(slot_valid, slot_row, 0).reshape(num_tokens, top_k)
  valid_rows = offsets[-1]
  row_token = jnp.where(rows < valid_rows, (order // top_k).astype(jnp.int32), 0)

  num_distinct = jnp.sum(sizes > 0, dtype=jnp.int32)
  active_experts = active_experts_from_offsets(offsets)

  if stats is None:
    stats = policies.RerouteStats(num_distinct, num_distinct, jnp.int32(0), jnp.int32(0))
  stat_vec = jnp.stack([stats.distinct_before, num_distinct, stats.critical_kept,
                        stats.slots_rerouted, valid_rows]).astype(jnp.int32)
  return Schedule(ids.astype(jnp.int32), slot_row, row_token, offsets, active_experts,
                  stat_vec)


def reference_schedule(ids: jax.Array, weights: jax.Array, valid: jax.Array,
                       similarity: jax.Array | None, config: RerouteConfig,
                       num_experts: int) -> Schedule:
  """Pure-jnp re-routing (`none` or `sere`) followed by the schedule."""
  s, _, _ = sere_kernel_config(config, ids.shape[1])
  if s:
    ids, _, stats = policies.reroute(ids, weights, valid, similarity, config,
                                     num_experts=num_experts)
  else:
    before = policies.count_distinct(ids, valid.astype(jnp.bool_), num_experts)
    stats = policies.RerouteStats(before, before, jnp.int32(0), jnp.int32(0))
  return build_schedule(ids, valid, num_experts, stats)

"""Re-routing policies: SERE (docs/concepts.md), its per-token hybrid `sere_hybrid`, its
expert-parallel form `sere_ep`, and the baselines and controls of docs/concepts.md (the
controls live in `control_policies`).

Every policy maps a top-K routing of one batch to a new one with the same static
shapes: `ids [T, K]`, `weights [T, K]`. Slots that a policy drops keep the token's
first expert with weight 0, so they never add an expert to the batch. `reroute` is
the one entry point.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from sere_jax import control_policies
from sere_jax import placement
from sere_jax import validation
from sere_jax.config import SIMILARITY_POLICIES, RerouteConfig

# Policies whose `renormalize` field, when set, overrides the model's top-K rule.
_TRUNCATING = ("topk_truncate", "keep_active")


class RerouteStats(NamedTuple):
  """Per-call statistics (int32 scalars), counted over valid tokens only."""

  distinct_before: jax.Array  # distinct experts of the original routing
  distinct_after: jax.Array  # distinct experts after re-routing
  critical_kept: jax.Array  # secondary experts kept because no primary was similar
  slots_rerouted: jax.Array  # slots whose expert or weight changed
  # 1 when the step's similarity held NaN or inf under jit (routed as
  # `validation.similarity_for_routing` says), else 0.
  invalid_similarity: jax.Array | int = 0
  # The most distinct experts any one device reads after re-routing, with experts
  # placed on `RerouteConfig.expert_devices` devices (`sere_jax.placement`);
  # `distinct_after` on one device.
  max_device_distinct: jax.Array | int = 0


def count_distinct(ids: jax.Array, valid: jax.Array, num_experts: int) -> jax.Array:
  """Number of distinct experts that valid tokens' slots `ids [T, K]` use."""
  used = jnp.zeros((num_experts,), jnp.bool_).at[ids].max(
      jnp.broadcast_to(valid[:, None], ids.shape))
  return jnp.sum(used, dtype=jnp.int32)


def primary_mask(ids: jax.Array, valid: jax.Array, select_top_k: int,
                 num_experts: int) -> jax.Array:
  """`[E]` bool: experts that some valid token holds among its top-S."""
  primary = ids[:, :select_top_k]
  return jnp.zeros((num_experts,), jnp.bool_).at[primary].max(
      jnp.broadcast_to(valid[:, None], primary.shape))


def nearest_primary(is_primary: jax.Array, similarity: jax.Array, threshold: float
                    ) -> tuple[jax.Array, jax.Array]:
  """Each expert's most similar primary and critical flag (docs/concepts.md, the method, step 3).

  Returns `nearest [E] int32` (argmax of `similarity[e, p]` over primaries p, ties to
  the lowest index) and `critical [E]`: not primary, and its best similarity to the
  primary set is below `threshold` (never when `threshold` is 0 or there is no primary).
  """
  masked = jnp.where(is_primary[None, :], similarity.astype(jnp.float32), -jnp.inf)
  nearest = jnp.argmax(masked, axis=1).astype(jnp.int32)
  nearest_sim = jnp.take_along_axis(masked, nearest[:, None], axis=1)[:, 0]
  critical = ~is_primary & jnp.any(is_primary)
  critical &= (nearest_sim < threshold) if threshold > 0 else False
  return nearest, critical


def sere_targets(is_primary: jax.Array, similarity: jax.Array, threshold: float
                 ) -> tuple[jax.Array, jax.Array]:
  """Per-expert re-routing target and critical flag (docs/concepts.md, the method, step 3).

  Returns `target [E] int32` (an expert maps to itself when primary or critical,
  else to its most similar primary, ties to the lowest index) and `critical [E]`.
  With no primary expert every target is the expert itself.
  """
  experts = jnp.arange(is_primary.shape[0], dtype=jnp.int32)
  nearest, critical = nearest_primary(is_primary, similarity, threshold)
  keep = is_primary | critical | ~jnp.any(is_primary)
  return jnp.where(keep, experts, nearest), critical


def sere_ep_targets(ids: jax.Array, weights: jax.Array, valid: jax.Array,
                    is_primary: jax.Array, similarity: jax.Array, threshold: float,
                    select_top_k: int, num_devices: int) -> tuple[jax.Array, jax.Array]:
  """`sere_ep`: SERE's per-expert targets under a per-device budget of experts.

  Experts sit on `num_devices` devices in contiguous blocks (`sere_jax.placement`).
  The budget is the most primary experts any device holds. A critical expert (as in
  `sere_targets`) that some valid token's secondary slot uses is kept only while its
  device stays within the budget: per device, the critical experts with the most
  secondary routing weight first (ties to the lowest index), as many as the device's
  primaries leave room for. Every other non-primary expert maps to its most similar
  primary, so no device reads more experts than the budget. With `threshold` 0 there
  is no critical expert and this is `sere_targets`. Returns `target [E] int32` and
  `kept [E]` (critical experts kept).
  """
  num_experts = is_primary.shape[0]
  experts = jnp.arange(num_experts, dtype=jnp.int32)
  nearest, critical = nearest_primary(is_primary, similarity, threshold)
  device = placement.device_of_expert(num_experts, num_devices)
  primaries = jnp.zeros((num_devices,), jnp.int32).at[device].add(
      is_primary.astype(jnp.int32))
  secondary = ids[:, select_top_k:]
  slot_weight = jnp.where(valid[:, None], weights[:, select_top_k:].astype(jnp.float32), 0.)
  used = jnp.zeros((num_experts,), jnp.bool_).at[secondary].max(
      jnp.broadcast_to(valid[:, None], secondary.shape))
  mass = jnp.zeros((num_experts,), jnp.float32).at[secondary].add(slot_weight)
  wanted = critical & used
  # Rank of each wanted expert among the wanted experts of its device.
  ahead = (mass[None, :] > mass[:, None]) | ((mass[None, :] == mass[:, None])
                                             & (experts[None, :] < experts[:, None]))
  ahead &= wanted[None, :] & (device[None, :] == device[:, None])
  rank = jnp.sum(ahead, axis=1, dtype=jnp.int32)
  kept = wanted & (rank < jnp.max(primaries) - primaries[device])
  keep = is_primary | kept | ~jnp.any(is_primary)
  return jnp.where(keep, experts, nearest), kept


def hybrid_secondary(ids: jax.Array, is_primary: jax.Array, similarity: jax.Array,
                     router_scores: jax.Array, select_top_k: int, threshold: float,
                     score_weight: float) -> tuple[jax.Array, jax.Array]:
  """`sere_hybrid`: per-token substitutes for the secondary slots of `ids [T, K]`.

  A secondary expert e that is neither primary nor critical (critical as in SERE) is
  replaced by the primary p maximising `(1 - lam) * similarity[e, p] + lam *
  router_scores[t, p]` (ties to the lowest index), `lam = score_weight`. Returns the
  new `ids [T, K]` and `critical [E]`.
  """
  _, critical = nearest_primary(is_primary, similarity, threshold)
  secondary = ids[:, select_top_k:]  # [T, K - S]
  sim_rows = similarity.astype(jnp.float32)[secondary]  # [T, K - S, E]
  scores = router_scores.astype(jnp.float32)[:, None, :]  # [T, 1, E]
  mixed = (1.0 - score_weight) * sim_rows + score_weight * scores
  pick = jnp.argmax(jnp.where(is_primary, mixed, -jnp.inf), axis=-1).astype(ids.dtype)
  keep = is_primary[secondary] | critical[secondary] | ~jnp.any(is_primary)
  return jnp.concatenate([ids[:, :select_top_k], jnp.where(keep, secondary, pick)],
                         axis=1), critical


def random_targets(is_primary: jax.Array, key: jax.Array) -> jax.Array:
  """Per-expert target: itself if primary, else a uniformly random primary."""
  num_experts = is_primary.shape[0]
  experts = jnp.arange(num_experts, dtype=jnp.int32)
  noise = jax.random.gumbel(key, (num_experts, num_experts))
  pick = jnp.argmax(jnp.where(is_primary[None, :], noise, -jnp.inf), axis=1)
  keep = is_primary | ~jnp.any(is_primary)
  return jnp.where(keep, experts, pick.astype(jnp.int32))


def _mix32(h: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finaliser (uint32 arithmetic wraps)."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def routing_fingerprint(ids: jax.Array, weights: jax.Array, valid: jax.Array
                        ) -> jax.Array:
  """A uint32 hash of the valid tokens' routing: each slot's weight bits, expert id
  and position. Different layers and decode steps route differently, so they hash
  differently; equal routings hash equally."""
  bits = jax.lax.bitcast_convert_type(weights.astype(jnp.float32), jnp.uint32)
  position = jnp.arange(ids.size, dtype=jnp.uint32).reshape(ids.shape)
  slot = _mix32(ids.astype(jnp.uint32) * jnp.uint32(0x9E3779B9) + position)
  slot = jnp.where(valid[:, None], _mix32(bits ^ slot), jnp.uint32(0))
  return _mix32(jnp.sum(slot, dtype=jnp.uint32))


def random_key(ids: jax.Array, weights: jax.Array, valid: jax.Array, seed: int
               ) -> jax.Array:
  """The `random` policy's default key: `PRNGKey(seed)` folded with the batch's
  `routing_fingerprint`, a fresh draw per step and layer without a key to thread."""
  return jax.random.fold_in(jax.random.PRNGKey(seed),
                            routing_fingerprint(ids, weights, valid))


def _remap_secondary(ids: jax.Array, target: jax.Array, select_top_k: int) -> jax.Array:
  return jnp.concatenate([ids[:, :select_top_k], target[ids[:, select_top_k:]]], axis=1)


def _truncate(ids, weights, select_top_k, renormalize):
  rest = ids.shape[1] - select_top_k
  new_ids = jnp.concatenate(
      [ids[:, :select_top_k], jnp.repeat(ids[:, :1], rest, axis=1)], axis=1)
  new_w = jnp.concatenate([weights[:, :select_top_k],
                           jnp.zeros_like(weights[:, select_top_k:])], axis=1)
  if renormalize:
    new_w = control_policies.rescale_to_total(new_w, weights).astype(weights.dtype)
  return new_ids, new_w


def _oea(ids, weights, is_primary, router_scores, select_top_k, renormalize):
  """Slots past S take the token's best-scoring experts among the active ones."""
  num_tokens, top_k = ids.shape
  rest = top_k - select_top_k
  scores = router_scores.astype(jnp.float32)
  own = jnp.zeros(scores.shape, jnp.bool_).at[
      jnp.arange(num_tokens)[:, None], ids[:, :select_top_k]].set(True)
  candidate = is_primary[None, :] & ~own
  best, picked = jax.lax.top_k(jnp.where(candidate, scores, -jnp.inf), rest)
  found = jnp.isfinite(best)
  new_ids = jnp.concatenate(
      [ids[:, :select_top_k], jnp.where(found, picked, ids[:, :1])], axis=1)
  raw = jnp.where(jnp.concatenate([jnp.ones((num_tokens, select_top_k), jnp.bool_), found], 1),
                  jnp.take_along_axis(scores, new_ids, axis=1), 0.0)
  if renormalize:
    total = jnp.sum(weights, axis=1, keepdims=True)
    new_w = raw * total / jnp.sum(raw, axis=1, keepdims=True)
  else:
    # Top-S weights stay as they are; new slots get their score on the same
    # per-token scale as the original weights.
    scale = weights[:, :1] / jnp.take_along_axis(scores, ids[:, :1], axis=1)
    new_w = jnp.concatenate([weights[:, :select_top_k],
                             raw[:, select_top_k:] * scale], axis=1)
  return new_ids.astype(ids.dtype), new_w.astype(weights.dtype)


def oracle_ids(ids: jax.Array, valid: jax.Array, expert_out: jax.Array,
               select_top_k: int) -> jax.Array:
  """The `oracle` policy's ids (weights are unchanged).

  Each secondary slot j >= S of token t gets the primary expert of the batch (top-S of
  a valid token) whose output `expert_out[t, p]` is nearest in L2 to the original
  expert's `expert_out[t, e]`, ties to the lowest index; e stays when it is a primary.
  `expert_out [T, E, D]` is every expert's output for every token.
  """
  is_primary = primary_mask(ids, valid.astype(jnp.bool_), select_top_k,
                            expert_out.shape[1])
  return control_policies.oracle_secondary(ids, is_primary, expert_out, select_top_k)


def max_device_distinct(ids: jax.Array, valid: jax.Array, num_experts: int,
                        expert_devices: int, distinct_after: jax.Array) -> jax.Array:
  """`RerouteStats.max_device_distinct` of the routing `ids [T, K]`: the most distinct
  experts one of `expert_devices` devices reads; on one device (0 or 1) that is
  `distinct_after`, the routing's distinct experts, which the caller has counted."""
  if expert_devices <= 1:
    return distinct_after
  return placement.max_distinct_per_device(ids, valid, num_experts, expert_devices)


def rerouting_stats(ids: jax.Array, weights: jax.Array, new_ids: jax.Array,
                    new_weights: jax.Array, valid: jax.Array, num_experts: int,
                    critical_kept: jax.Array | int = 0,
                    invalid_similarity: jax.Array | int = 0,
                    expert_devices: int = 0) -> RerouteStats:
  """`RerouteStats` of a re-routing `(ids, weights) -> (new_ids, new_weights)`."""
  changed = ((new_ids != ids) | (new_weights != weights)) & valid[:, None]
  distinct_after = count_distinct(new_ids, valid, num_experts)
  return RerouteStats(
      distinct_before=count_distinct(ids, valid, num_experts),
      distinct_after=distinct_after,
      critical_kept=jnp.asarray(critical_kept, jnp.int32),
      slots_rerouted=jnp.sum(changed, dtype=jnp.int32),
      invalid_similarity=jnp.asarray(invalid_similarity, jnp.int32),
      max_device_distinct=max_device_distinct(
          new_ids, valid, num_experts, expert_devices, distinct_after))


def reroute(ids: jax.Array, weights: jax.Array, valid: jax.Array,
            similarity: jax.Array | None, config: RerouteConfig, *,
            num_experts: int | None = None, router_scores: jax.Array | None = None,
            renormalize: bool = False, key: jax.Array | None = None,
            output_norm: jax.Array | None = None, pool_scale: jax.Array | None = None,
            expert_out: jax.Array | None = None
            ) -> tuple[jax.Array, jax.Array, RerouteStats]:
  """Applies `config.policy` to one batch's top-K routing.

  Args:
    ids: `[T, K]` expert ids, sorted by descending router score.
    weights: `[T, K]` routing weights.
    valid: `[T]` bool; invalid tokens (padding, finished sequences) add no experts.
    similarity: `[E, E]` expert similarity; required by `sere`, `sere_hybrid`,
      `sere_ep` and `expert_pool`.
    config: the policy and its parameters (static under jit). `S <= 0` or `S >= K`
      leaves the routing unchanged (`config.is_active`).
    num_experts: E; inferred from `similarity` or `router_scores` when omitted.
    router_scores: `[T, E]` the router's per-expert scores on the weights' scale
      (softmax probabilities for Qwen); required by `oea` and `sere_hybrid`.
    renormalize: the model renormalises top-K weights (`oea` then renormalises the
      weights it keeps, and so do `topk_truncate` and `keep_active` unless
      `config.renormalize` says otherwise).
    key: PRNG key of `random`. By default `random_key`: `PRNGKey(config.seed)` folded
      with a hash of this batch's routing, so every layer and decode step draws
      afresh while equal inputs give equal outputs.
    output_norm: `[E]` each expert's mean output norm (`expert_pool`; default ones).
    pool_scale: `[E, E]` the weight scale of a slot moved from e to p (`expert_pool`;
      default ones; clipped to [0, 2]).
    expert_out: `[T, E, D]` every expert's output for every token; required by
      `oracle` (`MoeBlock` computes it).

  Returns:
    `(new_ids, new_weights, stats)`.

  Inputs are checked by `sere_jax.validation`: bad shapes raise ValueError always, bad
  values where concrete; a traced similarity with NaN or inf sets
  `stats.invalid_similarity` (see that module).
  """
  num_experts = _infer_num_experts(num_experts, similarity, router_scores)
  validation.check_routing(ids, weights, valid, num_experts)
  valid = valid.astype(jnp.bool_)
  s = config.select_top_k
  policy = config.policy
  devices = config.expert_devices
  if devices:
    placement.check_placement(num_experts, devices)
  if not config.is_active(ids.shape[1]):
    return ids, weights, rerouting_stats(ids, weights, ids, weights, valid, num_experts,
                                         expert_devices=devices)
  invalid_similarity = jnp.zeros((), jnp.int32)
  if policy in SIMILARITY_POLICIES:
    similarity, invalid_similarity = validation.similarity_for_routing(
        similarity, num_experts, policy)

  is_primary = primary_mask(ids, valid, s, num_experts)
  renorm = renormalize
  if policy in _TRUNCATING and config.renormalize is not None:
    renorm = config.renormalize
  critical_kept = jnp.zeros((), jnp.int32)
  new_w = weights
  if policy in ("sere", "sere_hybrid", "sere_ep"):
    if policy == "sere":
      target, critical = sere_targets(is_primary, similarity, config.threshold)
      new_ids = _remap_secondary(ids, target, s)
    elif policy == "sere_ep":
      target, critical = sere_ep_targets(ids, weights, valid, is_primary, similarity,
                                         config.threshold, s, devices)
      new_ids = _remap_secondary(ids, target, s)
    else:
      validation.check_router_scores(router_scores, policy, ids.shape[0], num_experts)
      new_ids, critical = hybrid_secondary(ids, is_primary, similarity, router_scores, s,
                                           config.threshold, config.score_weight)
    secondary_used = jnp.zeros((num_experts,), jnp.bool_).at[ids[:, s:]].max(
        jnp.broadcast_to(valid[:, None], ids[:, s:].shape))
    critical_kept = jnp.sum(critical & secondary_used, dtype=jnp.int32)
  elif policy == "random":
    key = random_key(ids, weights, valid, config.seed) if key is None else key
    new_ids = _remap_secondary(ids, random_targets(is_primary, key), s)
  elif policy == "topk_truncate":
    new_ids, new_w = _truncate(ids, weights, s, renorm)
  elif policy == "keep_active":
    new_ids, new_w = control_policies.keep_active(ids, weights, is_primary, s, renorm)
  elif policy == "oea":
    validation.check_router_scores(router_scores, policy, ids.shape[0], num_experts)
    new_ids, new_w = _oea(ids, weights, is_primary, router_scores, s, renorm)
  elif policy == "expert_pool":
    output_norm = _pool_array(output_norm, "output_norm", (num_experts,))
    pool_scale = _pool_array(pool_scale, "pool_scale", (num_experts, num_experts))
    new_ids, new_w = control_policies.expert_pool(
        ids, weights, valid, similarity, output_norm, pool_scale, config.pool_size)
  elif policy == "oracle":
    if expert_out is None:
      raise ValueError("policy 'oracle' needs every expert's output expert_out "
                       "[T, E, D]: run it in a MoeBlock, or call oracle_ids")
    if expert_out.shape[:2] != (ids.shape[0], num_experts):
      raise ValueError(f"expert_out must be [T, E, D] with [T, E] = "
                       f"{(ids.shape[0], num_experts)}, got shape {expert_out.shape}")
    new_ids = oracle_ids(ids, valid, expert_out, s)
  else:  # RerouteConfig validation makes this unreachable.
    raise ValueError(f"unknown policy {policy!r}")

  apply = jnp.sum(valid) >= max(config.min_batch, 1)
  new_ids = jnp.where(apply, new_ids, ids)
  new_w = jnp.where(apply, new_w, weights)
  stats = rerouting_stats(ids, weights, new_ids, new_w, valid, num_experts,
                          jnp.where(apply, critical_kept, 0), invalid_similarity, devices)
  return new_ids, new_w, stats


def _pool_array(value, name: str, shape: tuple[int, ...]) -> jax.Array:
  if value is None:
    return jnp.ones(shape, jnp.float32)
  validation.check_shape(value, name, shape)
  return value


def _infer_num_experts(num_experts, similarity, router_scores) -> int:
  if num_experts is not None:
    return num_experts
  if similarity is not None:
    return similarity.shape[0]
  if router_scores is not None:
    return router_scores.shape[1]
  raise ValueError("num_experts is required when neither similarity nor "
                   "router_scores is given")

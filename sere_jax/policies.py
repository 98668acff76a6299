"""Re-routing policies: SERE (DESIGN.md §4), its per-token hybrid `sere_hybrid`, and
the baselines of DESIGN.md §5.

Every policy maps a top-K routing of one batch to a new one with the same static
shapes: `ids [T, K]`, `weights [T, K]`. Slots that a policy drops keep the token's
first expert with weight 0, so they never add an expert to the batch.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from sere_jax import validation
from sere_jax.config import RerouteConfig


class RerouteStats(NamedTuple):
  """Per-call statistics (int32 scalars), counted over valid tokens only."""

  distinct_before: jax.Array  # distinct experts of the original routing
  distinct_after: jax.Array  # distinct experts after re-routing
  critical_kept: jax.Array  # secondary experts kept because no primary was similar
  slots_rerouted: jax.Array  # slots whose expert or weight changed


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
  """Each expert's most similar primary and critical flag (DESIGN.md §4, step 3).

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
  """Per-expert re-routing target and critical flag (DESIGN.md §4, step 3).

  Returns `target [E] int32` (an expert maps to itself when primary or critical,
  else to its most similar primary, ties to the lowest index) and `critical [E]`.
  With no primary expert every target is the expert itself.
  """
  experts = jnp.arange(is_primary.shape[0], dtype=jnp.int32)
  nearest, critical = nearest_primary(is_primary, similarity, threshold)
  keep = is_primary | critical | ~jnp.any(is_primary)
  return jnp.where(keep, experts, nearest), critical


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


def _remap_secondary(ids: jax.Array, target: jax.Array, select_top_k: int) -> jax.Array:
  return jnp.concatenate([ids[:, :select_top_k], target[ids[:, select_top_k:]]], axis=1)


def _truncate(ids, weights, select_top_k, renormalize):
  top_w = weights[:, :select_top_k]
  if renormalize:
    top_w = top_w * (jnp.sum(weights, axis=1, keepdims=True)
                     / jnp.sum(top_w, axis=1, keepdims=True))
  rest = ids.shape[1] - select_top_k
  new_ids = jnp.concatenate(
      [ids[:, :select_top_k], jnp.repeat(ids[:, :1], rest, axis=1)], axis=1)
  new_w = jnp.concatenate([top_w, jnp.zeros_like(weights[:, select_top_k:])], axis=1)
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


def reroute(ids: jax.Array, weights: jax.Array, valid: jax.Array,
            similarity: jax.Array | None, config: RerouteConfig, *,
            num_experts: int | None = None, router_scores: jax.Array | None = None,
            renormalize: bool = False, key: jax.Array | None = None
            ) -> tuple[jax.Array, jax.Array, RerouteStats]:
  """Applies `config.policy` to one batch's top-K routing.

  Args:
    ids: `[T, K]` expert ids, sorted by descending router score.
    weights: `[T, K]` routing weights.
    valid: `[T]` bool; invalid tokens (padding, finished sequences) add no experts.
    similarity: `[E, E]` expert similarity; required by `sere` and `sere_hybrid`.
    config: the policy and its parameters (static under jit).
    num_experts: E; inferred from `similarity` or `router_scores` when omitted.
    router_scores: `[T, E]` the router's per-expert scores on the weights' scale
      (softmax probabilities for Qwen); required by `oea` and `sere_hybrid`.
    renormalize: the model renormalises top-K weights (`topk_truncate` and `oea`
      then renormalise the weights they keep).
    key: PRNG key of `random`; defaults to `PRNGKey(config.seed)`.

  Returns:
    `(new_ids, new_weights, stats)`.
  """
  num_experts = _infer_num_experts(num_experts, similarity, router_scores)
  validation.check_routing(ids, weights, valid, num_experts)
  valid = valid.astype(jnp.bool_)
  s = config.select_top_k
  top_k = ids.shape[1]
  before = count_distinct(ids, valid, num_experts)
  zero = jnp.zeros((), jnp.int32)
  if not config.is_active(top_k):
    return ids, weights, RerouteStats(before, before, zero, zero)

  is_primary = primary_mask(ids, valid, s, num_experts)
  critical_kept = zero
  if config.policy in ("sere", "sere_hybrid"):
    if similarity is None:
      raise ValueError(f"policy {config.policy!r} needs a similarity matrix")
    validation.check_similarity(similarity, num_experts)
    if config.policy == "sere":
      target, critical = sere_targets(is_primary, similarity, config.threshold)
      new_ids = _remap_secondary(ids, target, s)
    else:
      _check_router_scores(router_scores, config.policy, ids.shape[0], num_experts)
      new_ids, critical = hybrid_secondary(ids, is_primary, similarity, router_scores, s,
                                           config.threshold, config.score_weight)
    new_w = weights
    secondary_used = jnp.zeros((num_experts,), jnp.bool_).at[ids[:, s:]].max(
        jnp.broadcast_to(valid[:, None], ids[:, s:].shape))
    critical_kept = jnp.sum(critical & secondary_used, dtype=jnp.int32)
  elif config.policy == "random":
    key = jax.random.PRNGKey(config.seed) if key is None else key
    new_ids, new_w = _remap_secondary(ids, random_targets(is_primary, key), s), weights
  elif config.policy == "topk_truncate":
    new_ids, new_w = _truncate(ids, weights, s, renormalize)
  elif config.policy == "oea":
    _check_router_scores(router_scores, config.policy, ids.shape[0], num_experts)
    new_ids, new_w = _oea(ids, weights, is_primary, router_scores, s, renormalize)
  else:  # RerouteConfig validation makes this unreachable.
    raise ValueError(f"unknown policy {config.policy!r}")

  apply = jnp.sum(valid) >= max(config.min_batch, 1)
  new_ids = jnp.where(apply, new_ids, ids)
  new_w = jnp.where(apply, new_w, weights)
  changed = ((new_ids != ids) | (new_w != weights)) & valid[:, None]
  stats = RerouteStats(
      distinct_before=before,
      distinct_after=count_distinct(new_ids, valid, num_experts),
      critical_kept=jnp.where(apply, critical_kept, 0),
      slots_rerouted=jnp.sum(changed, dtype=jnp.int32))
  return new_ids, new_w, stats


def _check_router_scores(router_scores, policy: str, num_tokens: int,
                         num_experts: int) -> None:
  if router_scores is None:
    raise ValueError(f"policy {policy!r} needs router_scores [T, E]")
  if router_scores.shape != (num_tokens, num_experts):
    raise ValueError(f"router_scores must be [T, E] = {(num_tokens, num_experts)}, "
                     f"got shape {router_scores.shape}")


def _infer_num_experts(num_experts, similarity, router_scores) -> int:
  if num_experts is not None:
    return num_experts
  if similarity is not None:
    return similarity.shape[0]
  if router_scores is not None:
    return router_scores.shape[1]
  raise ValueError("num_experts is required when neither similarity nor "
                   "router_scores is given")

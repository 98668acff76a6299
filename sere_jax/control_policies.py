"""The controls and rivals that SERE is measured against (docs/concepts.md).

`keep_active` (drop what is not already active), `expert_pool` (a per-batch pool of
experts in the manner of ExFold, arXiv 2608.24938) and the per-token `oracle` ceiling.
Pure, jit-compatible functions on one batch's top-K routing (`ids [T, K]`, `weights
[T, K]`, static shapes); `sere_jax.policies.reroute` is their entry point. Dropped
slots keep the token's first expert with weight 0, so they add no expert.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rescale_to_total(new_weights: jax.Array, weights: jax.Array) -> jax.Array:
  """`new_weights [T, K]` scaled per token to the token's original total weight (a token
  that keeps no weight stays at zero)."""
  kept = jnp.sum(new_weights, axis=1, keepdims=True)
  total = jnp.sum(weights, axis=1, keepdims=True)
  safe = jnp.where(kept > 0, kept, 1)
  return jnp.where(kept > 0, new_weights * (total / safe), new_weights)


def keep_active(ids: jax.Array, weights: jax.Array, is_primary: jax.Array,
                select_top_k: int, renormalize: bool) -> tuple[jax.Array, jax.Array]:
  """`keep_active`: the top-S slots stay; a slot past S stays if its expert is a primary
  of the batch (`is_primary [E]`) and is dropped otherwise. With `renormalize`, the
  kept weights are rescaled to each token's original total."""
  secondary = ids[:, select_top_k:]
  keep = is_primary[secondary]
  new_ids = jnp.concatenate(
      [ids[:, :select_top_k], jnp.where(keep, secondary, ids[:, :1])], axis=1)
  new_w = jnp.concatenate(
      [weights[:, :select_top_k],
       jnp.where(keep, weights[:, select_top_k:], jnp.zeros((), weights.dtype))], axis=1)
  if renormalize:
    new_w = rescale_to_total(new_w, weights).astype(weights.dtype)
  return new_ids, new_w


def pool_members(ids: jax.Array, weights: jax.Array, valid: jax.Array,
                 output_norm: jax.Array, pool_size: int) -> jax.Array:
  """`[E]` bool: the batch's expert pool.

  `importance[e]` is the sum over valid tokens' slots routed to e of the routing weight
  times `output_norm[e]`; the pool holds the `pool_size` most important experts that
  valid tokens use (ties to the lower index), or all of them when fewer are used.
  """
  num_experts = output_norm.shape[0]
  w = weights.astype(jnp.float32) * output_norm.astype(jnp.float32)[ids]
  importance = jnp.zeros((num_experts,), jnp.float32).at[ids].add(
      jnp.where(valid[:, None], w, 0.0))
  used = jnp.zeros((num_experts,), jnp.bool_).at[ids].max(
      jnp.broadcast_to(valid[:, None], ids.shape))
  best, members = jax.lax.top_k(jnp.where(used, importance, -jnp.inf),
                                min(pool_size, num_experts))
  return jnp.zeros((num_experts,), jnp.bool_).at[members].set(jnp.isfinite(best))


def expert_pool(ids: jax.Array, weights: jax.Array, valid: jax.Array,
                similarity: jax.Array, output_norm: jax.Array, scale: jax.Array,
                pool_size: int) -> tuple[jax.Array, jax.Array]:
  """`expert_pool`: every slot whose expert e is outside the pool (`pool_members`)
  moves to the pool member p most similar to e (ties to the lowest index), its weight
  multiplied by `scale[e, p]` clipped to [0, 2]. Every slot, a token's top experts
  included, may move; in-pool slots are unchanged."""
  num_experts = similarity.shape[0]
  experts = jnp.arange(num_experts, dtype=ids.dtype)
  in_pool = pool_members(ids, weights, valid, output_norm, pool_size)
  nearest = jnp.argmax(jnp.where(in_pool[None, :], similarity.astype(jnp.float32),
                                 -jnp.inf), axis=1).astype(ids.dtype)
  stay = in_pool | ~jnp.any(in_pool)
  target = jnp.where(stay, experts, nearest)
  factor = jnp.where(stay, 1.0, jnp.clip(scale.astype(jnp.float32)[experts, nearest],
                                         0.0, 2.0))
  new_w = (weights.astype(jnp.float32) * factor[ids]).astype(weights.dtype)
  return target[ids], new_w


def oracle_secondary(ids: jax.Array, is_primary: jax.Array, expert_out: jax.Array,
                     select_top_k: int) -> jax.Array:
  """The `oracle` ids: each slot j >= S of token t holding expert e takes the primary p
  (`is_primary [E]`) whose output `expert_out[t, p]` is nearest in L2 to `expert_out[t,
  e]` (ties to the lowest index); e itself when it is a primary or there is none.
  `expert_out` is `[T, E, D]`, every expert's output for every token."""
  out = expert_out.astype(jnp.float32)
  secondary = ids[:, select_top_k:]  # [T, R]
  original = jnp.take_along_axis(out, secondary[..., None], axis=1)  # [T, R, D]
  # ||o - p||^2 = ||o||^2 + ||p||^2 - 2 <o, p>; ||o||^2 is the same for every p.
  cross = jnp.einsum("trd,ted->tre", original, out, precision="highest")
  dist = jnp.sum(out * out, axis=-1)[:, None, :] - 2.0 * cross
  pick = jnp.argmin(jnp.where(is_primary, dist, jnp.inf), axis=-1).astype(ids.dtype)
  keep = is_primary[secondary] | ~jnp.any(is_primary)
  return jnp.concatenate([ids[:, :select_top_k], jnp.where(keep, secondary, pick)],
                         axis=1)

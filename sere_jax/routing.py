"""Top-K routing from router logits (the generic softmax router)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def route(router_logits: jax.Array, top_k: int, *, normalize: bool = False
          ) -> tuple[jax.Array, jax.Array]:
  """Softmax top-K routing.

  Args:
    router_logits: `[T, E]` router logits.
    top_k: K, experts per token.
    normalize: renormalise the K weights to sum to 1 (Qwen3's `norm_topk_prob`).

  Returns:
    `ids [T, K] int32` sorted by descending score (ties: lower expert first) and
    `weights [T, K] float32`.
  """
  if router_logits.ndim != 2:
    raise ValueError(f"router_logits must be [T, E], got shape {router_logits.shape}")
  num_experts = router_logits.shape[1]
  if not 0 < top_k <= num_experts:
    raise ValueError(f"top_k must be in [1, {num_experts}], got {top_k}")
  probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
  weights, ids = jax.lax.top_k(probs, top_k)
  if normalize:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return ids.astype(jnp.int32), weights


def load_balancing_loss(router_logits: jax.Array, ids: jax.Array, valid: jax.Array
                        ) -> jax.Array:
  """Switch-Transformer auxiliary loss `E * sum_e f_e * P_e` over valid tokens.

  `f_e` is the fraction of the valid tokens' top-K slots `ids [T, K]` that go to
  expert e (no gradient), `P_e` the mean router probability of e. It is 1 under
  perfectly uniform routing and grows as the load concentrates.
  """
  num_experts = router_logits.shape[-1]
  mask = valid.astype(jnp.float32)
  count = jnp.maximum(jnp.sum(mask), 1.0)
  probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
  mean_prob = jnp.sum(probs * mask[:, None], axis=0) / count
  slots = jnp.zeros((num_experts,), jnp.float32).at[ids].add(
      jnp.broadcast_to(mask[:, None], ids.shape))
  fraction = jax.lax.stop_gradient(slots / (count * ids.shape[1]))
  return num_experts * jnp.sum(fraction * mean_prob)

"""Softmax top-K routing in jnp: the definition the router kernel is tested against.

It is the core's generic router, `sere_jax.routing.route` (softmax over the experts,
`lax.top_k`, optional renormalisation); the kernel must give the same ids (ties to
the lower expert) and the same weights. Both take the logits whole `[T, E]` or as
float32 split-K partials `[P, T, E]` that sum to them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sere_jax import routing
from sere_jax.numerics import sum_partials


def check_logits(router_logits: jax.Array) -> int:
  """The number of partials in `[T, E]` logits (1) or `[P, T, E]` partials (P); raises
  ValueError on any other shape or on partials that are not float32."""
  if router_logits.ndim == 2:
    return 1
  if router_logits.ndim == 3 and router_logits.dtype == jnp.float32:
    return router_logits.shape[0]
  raise ValueError("router_logits must be [T, E] logits or float32 [P, T, E] partials, "
                   f"got {router_logits.dtype} {router_logits.shape}")


def summed_logits(router_logits: jax.Array) -> jax.Array:
  """`[T, E]` logits from either form (`check_logits`), partials summed in order."""
  check_logits(router_logits)
  if router_logits.ndim == 2:
    return router_logits
  return sum_partials(router_logits)


def route_reference(router_logits: jax.Array, top_k: int, *, normalize: bool = False
                    ) -> tuple[jax.Array, jax.Array]:
  """`[T, E]` logits (or `[P, T, E]` partials) -> `(ids [T, K] int32, weights [T, K]
  float32)`, ids by descending score; see `sere_jax.routing.route`."""
  return routing.route(summed_logits(router_logits), top_k, normalize=normalize)

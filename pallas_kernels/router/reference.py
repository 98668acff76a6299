"""Softmax top-K routing in jnp: the definition the router kernel is tested against.

It is the core's generic router, `sere_jax.routing.route` (softmax over the experts,
`lax.top_k`, optional renormalisation); the kernel must give the same ids (ties to
the lower expert) and the same weights.
"""

from __future__ import annotations

import jax

from sere_jax import routing


def route_reference(router_logits: jax.Array, top_k: int, *, normalize: bool = False
                    ) -> tuple[jax.Array, jax.Array]:
  """`[T, E]` logits -> `(ids [T, K] int32, weights [T, K] float32)`, ids by
  descending score; see `sere_jax.routing.route`."""
  return routing.route(router_logits, top_k, normalize=normalize)

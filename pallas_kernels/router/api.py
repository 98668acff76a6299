"""The softmax top-K router op: `route(..., implementation=)`.

`[T, E]` router logits -> the K best experts per token by softmax score and their
weights (optionally renormalised to sum to 1). Implementations (`IMPLEMENTATIONS`,
`REGISTRY`):
  triton     one Pallas Triton kernel (NVIDIA GPUs), `triton.route_triton`.
  interpret  the Triton kernel in Pallas interpret mode (any backend).
  xla        the jnp reference, `reference.route_reference`.
  auto       triton on GPU, interpret on CPU, xla on TPU (no TPU kernel).
"""

from __future__ import annotations

import jax

from sere_jax.kernels import registry
from sere_jax.kernels.router.reference import route_reference
from sere_jax.kernels.router.triton import route_triton

IMPLEMENTATIONS = {
    "triton": route_triton,
    "interpret": lambda *args, **kw: route_triton(*args, interpret=True, **kw),
    "xla": route_reference,
}
REGISTRY = registry.Registry("route", IMPLEMENTATIONS, references=("xla",),
                             fallback="xla")


def route(router_logits: jax.Array, top_k: int, *, normalize: bool = False,
          implementation: str = "auto", **options) -> tuple[jax.Array, jax.Array]:
  """Softmax top-K routing: `(ids [T, K] int32, weights [T, K] float32)`.

  `implementation` is one of `REGISTRY.names`; `**options` are the chosen backend's
  tuning knobs (`block_t`, `num_warps` for the Triton kernel).
  """
  fn = REGISTRY.get(implementation)
  return fn(router_logits, top_k, normalize=normalize, **options)

"""The fused re-routing + expert-skip schedule op: `schedule(..., implementation=)`.

Re-routes `ids [T, K]` with policy `none` or `sere` and sorts the slots by expert
(`reference.Schedule`). `route_schedule` does the same from router logits, routing
included (`ROUTE_REGISTRY`: `triton`, `interpret`, `xla`, `auto`; the Triton kernel
then routes too). Implementations of `schedule` (`IMPLEMENTATIONS`, `REGISTRY`):
  triton         Pallas Triton kernel (NVIDIA GPUs), `triton.schedule_triton`.
  tpu            Pallas Mosaic kernel (TPUs), `tpu.schedule_tpu`.
  interpret      the Triton kernel in Pallas interpret mode (any backend).
  tpu_interpret  the TPU kernel in Pallas' TPU interpret mode (any backend).
  xla            the pure-jnp reference, `reference.reference_schedule`.
  auto           triton on GPU, tpu on TPU, interpret elsewhere.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

from sere_jax import validation
from sere_jax.config import RerouteConfig
from sere_jax.kernels import registry
from sere_jax.kernels.router.reference import check_logits
from sere_jax.kernels.schedule.reference import (Schedule, reference_route_schedule,
                                                 reference_schedule)
from sere_jax.kernels.schedule.tpu import schedule_tpu
from sere_jax.kernels.schedule.triton import route_schedule_triton, schedule_triton


def _reference(ids, valid, similarity, config, *, num_experts):
  # Weights do not change under `none` and `sere`: the reference re-routes ones.
  return reference_schedule(ids, jnp.ones(ids.shape, jnp.float32), valid, similarity,
                            config, num_experts)


IMPLEMENTATIONS = {
    "triton": schedule_triton,
    "tpu": schedule_tpu,
    "interpret": lambda *args, **kw: schedule_triton(*args, interpret=True, **kw),
    "tpu_interpret": lambda *args, **kw: schedule_tpu(
        *args, interpret=pltpu.InterpretParams(), **kw),
    "xla": _reference,
}
REGISTRY = registry.Registry("schedule", IMPLEMENTATIONS, references=("xla",),
                             fallback="xla")


def schedule(ids: jax.Array, valid: jax.Array, similarity: jax.Array | None,
             config: RerouteConfig, *, num_experts: int, implementation: str = "auto",
             **options) -> Schedule:
  """Re-routes `ids [T, K]` (policy `none` or `sere`) and builds the schedule.

  Args:
    ids: `[T, K]` top-K expert ids sorted by score.
    valid: `[T]` bool mask of real tokens.
    similarity: `[E, E]` finite similarity (ignored when the config does not
      re-route), checked by `sere_jax.validation`: its shape always, its values where
      concrete. A traced one's NaN or inf is caught one level up, by `moe_ffn`.
    config: the re-routing config; other policies raise ValueError (re-route them
      with `sere_jax.reroute` and use `reference.build_schedule`).
    num_experts: E.
    implementation: one of `REGISTRY.names`.
    **options: tuning knobs of the chosen backend (see its function).
  """
  fn = REGISTRY.get(implementation)
  validation.check_ids(ids, valid, num_experts)
  if config.policy == "sere" and config.is_active(ids.shape[1]):
    validation.check_similarity(similarity, num_experts)
  return fn(ids, valid, similarity, config, num_experts=num_experts, **options)


ROUTE_IMPLEMENTATIONS = {
    "triton": route_schedule_triton,
    "interpret": lambda *args, **kw: route_schedule_triton(*args, interpret=True, **kw),
    "xla": reference_route_schedule,
}
ROUTE_REGISTRY = registry.Registry("route_schedule", ROUTE_IMPLEMENTATIONS,
                                   references=("xla",), fallback="xla")


def route_schedule(router_logits: jax.Array, valid: jax.Array,
                   similarity: jax.Array | None, config: RerouteConfig, *, top_k: int,
                   normalize: bool = False, implementation: str = "auto", **options
                   ) -> tuple[jax.Array, jax.Array, Schedule]:
  """Softmax top-K routing, then `schedule`: one kernel with `triton`.

  Args:
    router_logits: `[T, E]` logits, or float32 split-K partials `[P, T, E]` that sum
      to them.
    valid, similarity, config: as for `schedule`.
    top_k, normalize: the router's K and whether its weights sum to 1
      (`kernels.router.route`).
    implementation: one of `ROUTE_REGISTRY.names`.
    **options: tuning knobs of the chosen backend (see its function).

  Returns:
    `(ids [T, K] int32, weights [T, K] float32, Schedule)`: the router's top-K ids
    and weights (before re-routing) and the schedule of the re-routed batch.
  """
  fn = ROUTE_REGISTRY.get(implementation)
  check_logits(router_logits)
  num_tokens, num_experts = router_logits.shape[-2:]
  if valid.shape != (num_tokens,):
    raise ValueError(f"valid must be [T] = ({num_tokens},), got shape {valid.shape}")
  if not 0 < top_k <= num_experts:
    raise ValueError(f"top_k must be in [1, {num_experts}], got {top_k}")
  if config.policy == "sere" and config.is_active(top_k):
    validation.check_similarity(similarity, num_experts)
  return fn(router_logits, valid, similarity, config, top_k=top_k, normalize=normalize,
            **options)

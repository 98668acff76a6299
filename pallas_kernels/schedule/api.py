"""The fused re-routing + expert-skip schedule op: `schedule(..., implementation=)`.

Re-routes `ids [T, K]` with policy `none` or `sere` and sorts the slots by expert
(`reference.Schedule`). Implementations (`IMPLEMENTATIONS`, `REGISTRY`):
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
from sere_jax.kernels.schedule.reference import Schedule, reference_schedule
from sere_jax.kernels.schedule.tpu import schedule_tpu
from sere_jax.kernels.schedule.triton import schedule_triton


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

"""The MoE FFN op: re-routing -> schedule -> grouped matmuls -> weighted combine.

`moe_ffn` is the entry point; `routed_ffn` runs the FFN of an already re-routed batch on
a subset of its slots (one device's experts under expert parallelism). Implementations
(`impl`, or its alias `implementation`; `IMPLS`, `REGISTRY`):
  triton     Pallas Triton kernels (NVIDIA GPUs): fused schedule kernel and an
             expert-skipping grouped matmul; weights of inactive experts are not read.
  tpu        Pallas Mosaic kernels (TPUs), same structure.
  mosaic_gpu the Triton schedule and router with the Mosaic GPU grouped matmul
             (Hopper GPUs; TMA + wgmma).
  interpret  the Triton kernels in Pallas interpret mode (any backend; for tests).
  tpu_interpret  the TPU kernels in Pallas' TPU interpret mode (any backend; tests).
  mosaic_gpu_interpret  `mosaic_gpu` in the interpret modes (any backend; tests).
  xla_dense  reference: every expert applied to every token, combined by weight.
  ragged_dot reference: `jax.lax.ragged_dot` over expert-sorted rows.
  auto       triton on GPU, tpu on TPU, interpret on CPU.
The kernels are the `schedule`, `gmm` and `router` ops (`BACKENDS` names each one's
implementation per `impl`); the references live in `reference.py`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from sere_jax import policies
from sere_jax import validation
from sere_jax.config import RerouteConfig
from sere_jax.kernels import registry
# Imported eagerly: importing Pallas backends registers config state, and doing it
# during a first trace would change the tracing context and force a recompile.
from sere_jax.kernels.gmm import api as gmm_api
from sere_jax.kernels.moe_ffn.reference import combine, dense_ffn, ragged_dot_ffn
from sere_jax.kernels.schedule import api as schedule_api
from sere_jax.kernels.schedule import reference as schedule_lib

_NO_REROUTE = RerouteConfig(policy="none")


class Backends(NamedTuple):
  """The implementations of the kernel ops one kernel `impl` runs."""

  schedule: str  # the `schedule` op's
  gmm: str  # the `gmm` op's
  router: str | None  # the `router` op's fused top-K, or None for `routing.route`


BACKENDS = {
    "triton": Backends("triton", "triton", "triton"),
    "tpu": Backends("tpu", "tpu", None),
    "mosaic_gpu": Backends("triton", "mosaic_gpu", "triton"),
    "interpret": Backends("interpret", "interpret", "interpret"),
    "tpu_interpret": Backends("tpu_interpret", "tpu_interpret", None),
    "mosaic_gpu_interpret": Backends("interpret", "mosaic_gpu_interpret", "interpret"),
}


class MoeOutput(NamedTuple):
  """`y [T, D]`, the re-routed `ids [T, K]` and `weights [T, K]`, and statistics."""

  y: jax.Array
  ids: jax.Array
  weights: jax.Array
  stats: policies.RerouteStats


def _grouped_ffn(impl, x, ids, weights, valid, sched, w_gate_up, w_down, out_dtype=None):
  """The FFN with the grouped-matmul kernels of `impl` over the schedule's rows."""
  del ids  # the schedule holds them
  matmul = functools.partial(gmm_api.gmm, implementation=BACKENDS[impl].gmm,
                             active_experts=sched.active_experts,
                             num_active=sched.num_distinct)
  hidden = matmul(x, w_gate_up, sched.group_offsets, sched.row_token,
                  activation="swiglu", out_dtype=w_down.dtype)
  down = matmul(hidden, w_down, sched.group_offsets)
  return combine(down, weights, valid, sched.slot_row, out_dtype or x.dtype)


def _ragged_dot(x, ids, weights, valid, sched, w_gate_up, w_down, out_dtype=None):
  del ids
  return ragged_dot_ffn(x, weights, valid, sched, w_gate_up, w_down, out_dtype)


def _xla_dense(x, ids, weights, valid, sched, w_gate_up, w_down, out_dtype=None):
  del sched  # not built: every expert is applied
  return dense_ffn(x, ids, weights, valid, w_gate_up, w_down, out_dtype)


# name -> `ffn(x, ids, weights, valid, sched, w_gate_up, w_down, out_dtype=None) ->
# y [T, D]` (in out_dtype, default x.dtype), after re-routing; `valid` is `[T]` or a
# slot mask `[T, K]`; `sched` is None for `xla_dense`.
IMPLEMENTATIONS = {
    **{name: functools.partial(_grouped_ffn, name) for name in BACKENDS},
    "xla_dense": _xla_dense,
    "ragged_dot": _ragged_dot,
}
REGISTRY = registry.Registry("moe_ffn", IMPLEMENTATIONS,
                             references=("xla_dense", "ragged_dot"), fallback="xla_dense",
                             arg="impl")
IMPLS = REGISTRY.names  # ("auto", "triton", "tpu", ...)
_KERNEL_IMPLS = REGISTRY.kernels


def resolve_impl(impl: str) -> str:
  """Maps `auto` to the implementation of the default backend."""
  return REGISTRY.resolve(impl)


# Input checks live in `sere_jax.validation`; kept here as this op's public name.
check_expert_weights = validation.check_expert_weights


def moe_ffn(x: jax.Array, ids: jax.Array, weights: jax.Array, w_gate_up: jax.Array,
            w_down: jax.Array, *, valid: jax.Array | None = None,
            similarity: jax.Array | None = None, config: RerouteConfig = _NO_REROUTE,
            router_scores: jax.Array | None = None, renormalize: bool = False,
            key: jax.Array | None = None, impl: str = "auto",
            implementation: str | None = None) -> MoeOutput:
  """Routed-expert FFN of one MoE layer for a batch of tokens.

  Args:
    x: `[T, D]` token activations.
    ids: `[T, K]` top-K expert ids sorted by router score; `weights`: `[T, K]`.
    w_gate_up: `[E, D, 2F]` fused gate and up projections; `w_down`: `[E, F, D]`.
    valid: `[T]` bool, real tokens (default: all). Invalid tokens add no experts
      and their output rows are zero.
    similarity: `[E, E]` expert similarity (policies `sere`, `sere_hybrid`,
      `expert_pool`).
    config: the re-routing policy (default: none). Only `none` and `sere` use the fused
      schedule kernel; every other policy re-routes with `sere_jax.reroute` first.
      `S <= 0` or `S >= K` leaves the routing unchanged.
    router_scores, renormalize, key: passed to `sere_jax.reroute` (policies `oea`,
      `sere_hybrid`, `topk_truncate`, `random`).
    impl: one of `IMPLS`; a kernel backend that cannot run on this device (`triton`
      off GPUs, `tpu` off TPUs) raises ValueError.
    implementation: the same as `impl` (the other kernel ops' keyword); when given,
      it wins over the default `impl`.

  Returns:
    `MoeOutput(y [T, D] in x.dtype, ids, weights, stats)`.

  Every implementation checks its inputs the same way (`sere_jax.validation`): bad
  shapes raise ValueError always, bad values where concrete; a traced similarity with
  NaN or inf sets `stats.invalid_similarity`.
  """
  if implementation is not None:
    if impl not in ("auto", implementation):
      raise ValueError(f"impl={impl!r} and implementation={implementation!r} disagree")
    impl = implementation
  impl = resolve_impl(impl)
  REGISTRY.check(impl)
  num_experts = w_gate_up.shape[0]
  valid = jnp.ones(x.shape[:1], jnp.bool_) if valid is None else valid.astype(jnp.bool_)
  validation.check_ffn_inputs(x, ids, weights, valid, w_gate_up, w_down)

  active = config.is_active(ids.shape[1])
  if impl in _KERNEL_IMPLS and (config.policy in ("none", "sere") or not active):
    invalid_similarity = jnp.zeros((), jnp.int32)
    if active and config.policy == "sere":
      # The schedule kernels read non-finite entries as the least similar value
      # themselves: no select over [E, E] in XLA, only the flag.
      similarity, invalid_similarity = validation.similarity_for_routing(
          similarity, num_experts, config.policy, sanitize=False)
    sched = kernel_schedule(impl, ids, valid, similarity, config, num_experts)
  else:
    ids, weights, stats = policies.reroute(
        ids, weights, valid, similarity, config, num_experts=num_experts,
        router_scores=router_scores, renormalize=renormalize, key=key)
    if impl == "xla_dense":
      y = IMPLEMENTATIONS[impl](x, ids, weights, valid, None, w_gate_up, w_down)
      return MoeOutput(y, ids, weights, stats)
    invalid_similarity = stats.invalid_similarity
    sched = schedule_lib.build_schedule(ids, valid, num_experts, stats)

  y = IMPLEMENTATIONS[impl](x, sched.ids, weights, valid, sched, w_gate_up, w_down)
  stats = policies.RerouteStats(
      *(sched.stats[i] for i in range(4)), invalid_similarity,
      policies.max_device_distinct(sched.ids, valid, num_experts, config.expert_devices,
                                   sched.num_distinct))
  return MoeOutput(y, sched.ids, weights, stats)


def kernel_schedule(impl: str, ids: jax.Array, valid: jax.Array,
                    similarity: jax.Array | None, config: RerouteConfig,
                    num_experts: int) -> schedule_lib.Schedule:
  """The fused re-routing + schedule kernel of `impl` (policies `none`, `sere`)."""
  return schedule_api.schedule(ids, valid, similarity, config, num_experts=num_experts,
                               implementation=BACKENDS[impl].schedule)


def routed_ffn(x: jax.Array, ids: jax.Array, weights: jax.Array, slot_valid: jax.Array,
               w_gate_up: jax.Array, w_down: jax.Array, *, impl: str = "auto",
               out_dtype=None) -> jax.Array:
  """`y [T, D]`: the FFN of an already re-routed batch over the slots `slot_valid [T, K]`
  only; other slots read no expert and add nothing.

  The building block of expert parallelism: each device runs it on the slots of its
  own experts (`ids` local to its weights) and the partial outputs are summed. No
  re-routing happens here; the schedule is `schedule.reference.build_schedule`, the
  grouped matmuls are `impl`'s. `out_dtype` (default `x.dtype`) lets partial sums
  stay in float32.
  """
  impl = resolve_impl(impl)
  REGISTRY.check(impl)
  validation.check_shape(slot_valid, "slot_valid", ids.shape)
  validation.check_ffn_inputs(x, ids, weights, jnp.ones(x.shape[:1], jnp.bool_),
                              w_gate_up, w_down)
  slot_valid = slot_valid.astype(jnp.bool_)
  sched = None
  if impl != "xla_dense":
    sched = schedule_lib.build_schedule(ids, slot_valid, w_gate_up.shape[0])
  return IMPLEMENTATIONS[impl](x, ids, weights, slot_valid, sched, w_gate_up, w_down,
                              out_dtype)

"""The MoE FFN op: re-routing -> schedule -> grouped matmuls -> weighted combine.

`moe_ffn` is the one entry point. Implementations (`impl`):
  triton     Pallas Triton kernels (NVIDIA GPUs): fused schedule kernel and an
             expert-skipping grouped matmul; weights of inactive experts are not read.
  tpu        Pallas Mosaic kernels (TPUs), same structure.
  interpret  the Triton kernels in Pallas interpret mode (any backend; for tests).
  tpu_interpret  the TPU kernels in Pallas' TPU interpret mode (any backend; tests).
  xla_dense  reference: every expert applied to every token, combined by weight.
  ragged_dot reference: `jax.lax.ragged_dot` over expert-sorted rows.
  auto       triton on GPU, tpu on TPU, interpret on CPU.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp

from sere_jax import policies
from sere_jax import validation
from sere_jax.numerics import mixed_dot_operands
from sere_jax.config import RerouteConfig
from sere_jax.kernels import schedule as schedule_lib
# Imported eagerly: importing Pallas backends registers config state, and doing it
# during a first trace would change the tracing context and force a recompile.
from sere_jax.kernels.gmm_tpu import gmm_tpu
from sere_jax.kernels.gmm_triton import TILES, gmm_triton
from sere_jax.kernels.schedule_tpu import schedule_tpu
from sere_jax.kernels.schedule_triton import schedule_triton

IMPLS = ("auto", "triton", "tpu", "interpret", "tpu_interpret", "xla_dense", "ragged_dot")
_KERNEL_IMPLS = ("triton", "tpu", "interpret", "tpu_interpret")
_NO_REROUTE = RerouteConfig(policy="none")


class MoeOutput(NamedTuple):
  """`y [T, D]`, the re-routed `ids [T, K]` and `weights [T, K]`, and statistics."""

  y: jax.Array
  ids: jax.Array
  weights: jax.Array
  stats: policies.RerouteStats


def resolve_impl(impl: str) -> str:
  """Maps `auto` to the implementation of the default backend."""
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
  if impl != "auto":
    return impl
  return {"gpu": "triton", "tpu": "tpu"}.get(jax.default_backend(), "interpret")


def check_expert_weights(x: jax.Array, w_gate_up: jax.Array, w_down: jax.Array) -> None:
  """Raises ValueError unless `x [T, D]`, `w_gate_up [E, D, 2F]`, `w_down [E, F, D]`."""
  if x.ndim != 2:
    raise ValueError(f"x must be [T, D], got shape {x.shape}")
  if w_gate_up.ndim != 3 or w_down.ndim != 3:
    raise ValueError(f"w_gate_up must be [E, D, 2F] and w_down [E, F, D], got shapes "
                     f"{w_gate_up.shape} and {w_down.shape}")
  num_experts, dim, two_f = w_gate_up.shape
  if dim != x.shape[1] or two_f % 2:
    raise ValueError(f"w_gate_up shape {w_gate_up.shape} does not fit x [T, {x.shape[1]}]"
                     " (expected [E, D, 2F])")
  if w_down.shape != (num_experts, two_f // 2, dim):
    raise ValueError(f"w_down must be [E, F, D] = {(num_experts, two_f // 2, dim)}, "
                     f"got {w_down.shape}")


def swiglu(gate_up: jax.Array) -> jax.Array:
  """`SiLU(gate) * up` of a fused `[..., 2F]` projection (gate first)."""
  gate, up = jnp.split(gate_up, 2, axis=-1)
  return jax.nn.silu(gate) * up


def moe_ffn(x: jax.Array, ids: jax.Array, weights: jax.Array, w_gate_up: jax.Array,
            w_down: jax.Array, *, valid: jax.Array | None = None,
            similarity: jax.Array | None = None, config: RerouteConfig = _NO_REROUTE,
            router_scores: jax.Array | None = None, renormalize: bool = False,
            key: jax.Array | None = None, impl: str = "auto") -> MoeOutput:
  """Routed-expert FFN of one MoE layer for a batch of tokens.

  Args:
    x: `[T, D]` token activations.
    ids: `[T, K]` top-K expert ids sorted by router score; `weights`: `[T, K]`.
    w_gate_up: `[E, D, 2F]` fused gate and up projections; `w_down`: `[E, F, D]`.
    valid: `[T]` bool, real tokens (default: all). Invalid tokens add no experts
      and their output rows are zero.
    similarity: `[E, E]` expert similarity (policies `sere`, `sere_hybrid`).
    config: the re-routing policy (default: none). Only `none` and `sere` use the fused
      schedule kernel; every other policy re-routes with `sere_jax.reroute` first.
    router_scores, renormalize, key: passed to `sere_jax.reroute` (policies `oea`,
      `sere_hybrid`, `topk_truncate`, `random`).
    impl: one of `IMPLS`.

  Returns:
    `MoeOutput(y [T, D] in x.dtype, ids, weights, stats)`.
  """
  check_expert_weights(x, w_gate_up, w_down)
  impl = resolve_impl(impl)
  num_experts = w_gate_up.shape[0]
  valid = jnp.ones(x.shape[:1], jnp.bool_) if valid is None else valid.astype(jnp.bool_)
  validation.check_routing(ids, weights, valid, num_experts)

  fused_policy = config.policy in ("none", "sere") or not config.is_active(ids.shape[1])
  if impl in _KERNEL_IMPLS and fused_policy:
    sched = kernel_schedule(impl, ids, valid, similarity, config, num_experts)
  else:
    ids, weights, stats = policies.reroute(
        ids, weights, valid, similarity, config, num_experts=num_experts,
        router_scores=router_scores, renormalize=renormalize, key=key)
    if impl == "xla_dense":
      return MoeOutput(_dense_ffn(x, ids, weights, valid, w_gate_up, w_down), ids,
                       weights, stats)
    sched = schedule_lib.build_schedule(ids, valid, num_experts, stats)

  if impl == "ragged_dot":
    y = _ragged_dot_ffn(x, weights, valid, sched, w_gate_up, w_down)
  else:
    y = _grouped_ffn(impl, x, weights, valid, sched, w_gate_up, w_down)
  stats = policies.RerouteStats(*(sched.stats[i] for i in range(4)))
  return MoeOutput(y, sched.ids, weights, stats)


def kernel_schedule(impl: str, ids: jax.Array, valid: jax.Array,
                    similarity: jax.Array | None, config: RerouteConfig,
                    num_experts: int) -> schedule_lib.Schedule:
  """The fused re-routing + schedule kernel of `impl` (policies `none`, `sere`)."""
  if impl in ("tpu", "tpu_interpret"):
    return schedule_tpu(ids, valid, similarity, config, num_experts=num_experts,
                        interpret=_tpu_interpret(impl))
  return schedule_triton(ids, valid, similarity, config, num_experts=num_experts,
                         interpret=impl == "interpret")


def _tpu_interpret(impl):
  if impl != "tpu_interpret":
    return False
  return pltpu.InterpretParams()


def _gmm_fn(impl):
  """`gmm(x, w, sched, row_token=None)` of a kernel implementation."""
  if impl in ("tpu", "tpu_interpret"):
    interpret = _tpu_interpret(impl)
    return lambda x, w, sched, row_token=None: gmm_tpu(
        x, w, sched.group_offsets, sched.active_experts, sched.num_distinct, row_token,
        interpret=interpret)
  return lambda x, w, sched, row_token=None: gmm_triton(
      x, w, sched.group_offsets, row_token, interpret=impl == "interpret", **TILES)


def _combine(rows: jax.Array, weights, valid, slot_row, dtype) -> jax.Array:
  """`y[t] = sum_j weights[t, j] * rows[slot_row[t, j]]` over valid tokens."""
  gathered = rows[slot_row]  # [T, K, D]
  scaled = gathered * weights[..., None].astype(jnp.float32)
  y = jnp.sum(jnp.where(valid[:, None, None], scaled, 0.0), axis=1)
  return y.astype(dtype)


def _grouped_ffn(impl, x, weights, valid, sched, w_gate_up, w_down):
  gmm = _gmm_fn(impl)
  gate_up = gmm(x, w_gate_up, sched, sched.row_token)
  hidden = swiglu(gate_up).astype(w_down.dtype)
  down = gmm(hidden, w_down, sched)
  return _combine(down, weights, valid, sched.slot_row, x.dtype)


def _ragged_dot_ffn(x, weights, valid, sched, w_gate_up, w_down):
  # Rows past the last group belong to no expert: ragged_dot leaves them zero.
  sizes = sched.group_sizes
  lhs, w_gate_up = mixed_dot_operands(x[sched.row_token], w_gate_up)
  gate_up = jax.lax.ragged_dot(lhs, w_gate_up, sizes, preferred_element_type=jnp.float32)
  hidden, w_down = mixed_dot_operands(swiglu(gate_up).astype(w_down.dtype), w_down)
  down = jax.lax.ragged_dot(hidden, w_down, sizes, preferred_element_type=jnp.float32)
  return _combine(down, weights, valid, sched.slot_row, x.dtype)


def _dense_ffn(x, ids, weights, valid, w_gate_up, w_down):
  num_experts = w_gate_up.shape[0]
  combine = jnp.sum(jax.nn.one_hot(ids, num_experts, dtype=jnp.float32)
                    * weights[..., None].astype(jnp.float32), axis=1)
  combine = jnp.where(valid[:, None], combine, 0.0)  # [T, E]
  lhs, w_gate_up = mixed_dot_operands(x, w_gate_up)
  gate_up = jnp.einsum("td,edf->tef", lhs, w_gate_up, preferred_element_type=jnp.float32)
  hidden, w_down = mixed_dot_operands(swiglu(gate_up).astype(w_down.dtype), w_down)
  out = jnp.einsum("tef,efd->ted", hidden, w_down, preferred_element_type=jnp.float32)
  return jnp.einsum("ted,te->td", out, combine).astype(x.dtype)

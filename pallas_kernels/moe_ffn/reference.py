"""The MoE FFN's XLA references and the glue shared with the kernel path.

Given re-routed `ids`, `weights` and (for `ragged_dot`) the schedule:
  dense_ffn       (`xla_dense`) every expert applied to every token, combined by the
                  routing weights: the plain definition.
  ragged_dot_ffn  (`ragged_dot`) `jax.lax.ragged_dot` over the expert-sorted rows.
`combine` is the step after the grouped matmuls, used by every implementation (the
activation between them, `gmm.reference.swiglu`, is re-exported here). `valid` is
`[T]` (tokens) or `[T, K]` (slots: expert parallelism computes on each device only the
slots of its own experts).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sere_jax.numerics import mixed_dot_operands
from sere_jax.kernels.gmm.reference import swiglu
from sere_jax.kernels.schedule.reference import Schedule, slot_mask


def combine(rows: jax.Array, weights: jax.Array, valid: jax.Array, slot_row: jax.Array,
            dtype) -> jax.Array:
  """`y[t] = sum_j weights[t, j] * rows[slot_row[t, j]]` over valid tokens (or slots)."""
  gathered = rows[slot_row]  # [T, K, D]
  scaled = gathered * weights[..., None].astype(jnp.float32)
  mask = slot_mask(valid, weights.shape)
  y = jnp.sum(jnp.where(mask[..., None], scaled, 0.0), axis=1)
  return y.astype(dtype)


def ragged_dot_ffn(x: jax.Array, weights: jax.Array, valid: jax.Array, sched: Schedule,
                   w_gate_up: jax.Array, w_down: jax.Array, out_dtype=None) -> jax.Array:
  """The FFN with `jax.lax.ragged_dot` over the schedule's expert-sorted rows."""
  # Rows past the last group belong to no expert: ragged_dot leaves them zero.
  sizes = sched.group_sizes
  lhs, w_gate_up = mixed_dot_operands(x[sched.row_token], w_gate_up)
  gate_up = jax.lax.ragged_dot(lhs, w_gate_up, sizes, preferred_element_type=jnp.float32)
  hidden, w_down = mixed_dot_operands(swiglu(gate_up).astype(w_down.dtype), w_down)
  down = jax.lax.ragged_dot(hidden, w_down, sizes, preferred_element_type=jnp.float32)
  return combine(down, weights, valid, sched.slot_row, out_dtype or x.dtype)


def dense_ffn(x: jax.Array, ids: jax.Array, weights: jax.Array, valid: jax.Array,
              w_gate_up: jax.Array, w_down: jax.Array, out_dtype=None) -> jax.Array:
  """The FFN with every expert applied to every token, combined by weight."""
  num_experts = w_gate_up.shape[0]
  slot_weights = jnp.where(slot_mask(valid, ids.shape), weights.astype(jnp.float32), 0.0)
  combine_weights = jnp.sum(jax.nn.one_hot(ids, num_experts, dtype=jnp.float32)
                            * slot_weights[..., None], axis=1)  # [T, E]
  lhs, w_gate_up = mixed_dot_operands(x, w_gate_up)
  gate_up = jnp.einsum("td,edf->tef", lhs, w_gate_up, preferred_element_type=jnp.float32)
  hidden, w_down = mixed_dot_operands(swiglu(gate_up).astype(w_down.dtype), w_down)
  out = jnp.einsum("tef,efd->ted", hidden, w_down, preferred_element_type=jnp.float32)
  return jnp.einsum("ted,te->td", out, combine_weights).astype(out_dtype or x.dtype)

"""Dot-product operand precision shared by the kernels' references, the models and the
library."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def mixed_dot_operands(*arrays: jax.Array) -> tuple[jax.Array, ...]:
  """Operands for a dot with `preferred_element_type=float32`.

  Low-precision operands stay as they are (the GPU and TPU multiply bf16 into f32
  directly, without an f32 copy of a weight in memory); the CPU backend has no
  bf16 x bf16 -> f32 dot, so there they are upcast (exact).
  """
  if jax.default_backend() == "cpu":
    return tuple(a.astype(jnp.float32) for a in arrays)
  return arrays


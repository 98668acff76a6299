"""Input checks that fail early with errors that name the problem."""

from __future__ import annotations

import jax
import numpy as np


def is_concrete(x) -> bool:
  """True when `x` holds values (not a tracer inside jit)."""
  return not isinstance(x, jax.core.Tracer)


def check_similarity(similarity, num_experts: int) -> None:
  """Rejects a similarity matrix that is not a finite `[E, E]` array.

  The shape is checked always; the values only where they are concrete.
  """
  shape = getattr(similarity, "shape", None)
  if shape is None or len(shape) != 2 or shape[0] != shape[1]:
    raise ValueError(f"similarity must be a square [E, E] matrix, got shape {shape}")
  if shape[0] != num_experts:
    raise ValueError(
        f"similarity is {shape[0]}x{shape[1]} but the layer has {num_experts} experts")
  if is_concrete(similarity) and not np.all(np.isfinite(np.asarray(similarity))):
    raise ValueError("similarity holds non-finite values (NaN or inf)")


def check_routing(ids, weights, valid, num_experts: int) -> None:
  """Checks shapes of `ids [T, K]`, `weights [T, K]`, `valid [T]` and id range."""
  if ids.ndim != 2:
    raise ValueError(f"ids must be [T, K], got shape {ids.shape}")
  if weights.shape != ids.shape:
    raise ValueError(f"weights shape {weights.shape} does not match ids shape {ids.shape}")
  if valid.shape != ids.shape[:1]:
    raise ValueError(f"valid must be [T] = {ids.shape[:1]}, got shape {valid.shape}")
  if not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"ids must be integers, got dtype {ids.dtype}")
  if is_concrete(ids) and ids.size:
    lo, hi = int(np.min(np.asarray(ids))), int(np.max(np.asarray(ids)))
    if lo < 0 or hi >= num_experts:
      raise ValueError(f"ids must lie in [0, {num_experts}), got values in [{lo}, {hi}]")

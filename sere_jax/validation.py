"""Input checks of every MoE path, in one place, with errors that name the problem.

`RerouteConfig`, `policies.reroute`, the `moe_ffn` op (every implementation:
`xla_dense`, `ragged_dot`, `interpret`, `tpu_interpret`, `triton`, `tpu`), the
`schedule` op and `MoeBlock` check their inputs here:

* Shapes and static parameters (tokens T, slots K, experts E, hidden size D, S, rho,
  the pool size) are known while tracing, so they raise ValueError always, inside
  `jit` too.
* Values (a finite similarity, ids in [0, E)) raise ValueError where the array is
  concrete (eager calls).
* Inside `jit` a value cannot raise. It is checked with `checkify.debug_check`: a
  caller that wraps the step in `jax.experimental.checkify.checkify` gets the error
  back (`err.throw()`); without checkify the check costs nothing.

A traced similarity also has an always-on fallback, `similarity_for_routing`: the
step's `RerouteStats.invalid_similarity` is 1 when the similarity held NaN or inf (an
uncalibrated layer's is all NaN), else 0, and the step routes as if every non-finite
entry were the least similar value (the dtype's minimum). Such an entry never wins a
substitute over a finite one; an expert whose similarity to every primary is
non-finite is critical (kept) under a threshold rho > 0 and goes to the lowest-index
primary at rho = 0. The routing stays deterministic, in range and equal on every
backend (a NaN reaching a kernel's argmax could yield an id past E), and the flag says
that it happened; generation and evaluation can surface it. The schedule kernels apply
that rule to the values they load (`least_similar_where_non_finite`), so the fused
path adds only the flag's reduction over `[E, E]` per layer, which XLA drops where the
flag is unused (as in `generate`); the XLA paths add one select too. Switching
re-routing off for the step instead would cost a second schedule or a device-side
branch per layer in the fused kernels.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
from jax.experimental import checkify
import jax.numpy as jnp
import numpy as np

from sere_jax import placement

if TYPE_CHECKING:
  from sere_jax.config import RerouteConfig

# Policies that leave `select_top_k` unused.
_NO_SELECT_POLICIES = ("none", "expert_pool")
_NON_FINITE = ("holds non-finite values (NaN or inf); re-routing needs a calibrated "
               "similarity (an uncalibrated layer's is NaN): calibrate the model or load "
               "one with its similarity")


def is_concrete(x) -> bool:
  """True when `x` holds values (not a tracer inside jit)."""
  return not isinstance(x, jax.core.Tracer)


def check_int(name: str, value, low: int, high: int | None = None) -> None:
  """Rejects a non-integer (bools included) or one outside `[low, high]`."""
  bound = f">= {low}" if high is None else f"in [{low}, {high}]"
  if (isinstance(value, bool) or not isinstance(value, int) or value < low
      or (high is not None and value > high)):
    raise ValueError(f"{name} must be an integer {bound}, got {value!r}")


def check_unit(name: str, value) -> None:
  """Rejects anything but a number in [0, 1] (NaN and bools included)."""
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
  if not 0.0 <= float(value) <= 1.0:
    raise ValueError(f"{name} must be in [0, 1], got {value}")


def check_layer_config(config: RerouteConfig, top_k: int, num_experts: int) -> None:
  """Rejects a config that cannot act on a top-`top_k` layer of `num_experts` experts.

  The policy functions follow the paper (S <= 0 or S >= K: no change); a layer that
  is configured that way is a mistake, so here every policy but `none` and
  `expert_pool` needs `1 <= select_top_k < top_k`, `expert_pool` needs
  `pool_size <= num_experts`, and an expert placement (`expert_devices`) at most
  `num_experts` devices.
  """
  if config.expert_devices:
    placement.check_placement(num_experts, config.expert_devices)
  if config.policy == "expert_pool":
    if config.pool_size > num_experts:
      raise ValueError(f"policy 'expert_pool' has pool_size={config.pool_size}, more "
                       f"than the layer's {num_experts} experts")
  elif config.policy not in _NO_SELECT_POLICIES and not 0 < config.select_top_k < top_k:
    raise ValueError(
        f"policy {config.policy!r} needs 1 <= select_top_k < top_k, got select_top_k="
        f"{config.select_top_k} with top_k={top_k}: it would leave the top-{top_k} "
        "routing unchanged (use policy 'none' for that)")


def check_similarity(similarity, num_experts: int, name: str = "similarity") -> None:
  """Rejects a similarity that is not a finite `[E, E]` array (`name` in errors).

  The shape is checked always; the values only where they are concrete.
  """
  shape = getattr(similarity, "shape", None)
  if shape is None or len(shape) != 2 or shape[0] != shape[1]:
    raise ValueError(f"{name} must be a square [E, E] matrix, got shape {shape}")
  if shape[0] != num_experts:
    raise ValueError(f"{name} is {shape[0]}x{shape[1]} but the layer has {num_experts} "
                     "experts")
  if is_concrete(similarity) and not np.all(np.isfinite(np.asarray(similarity))):
    raise ValueError(f"{name} {_NON_FINITE}")


def least_similar_where_non_finite(similarity: jax.Array) -> jax.Array:
  """`similarity` with every NaN or ±inf entry at the dtype's minimum, the least
  similar value. Written with comparisons only, so that Pallas kernels (Triton, Mosaic
  TPU) apply it to the values they load."""
  finite = (similarity == similarity) & (jnp.abs(similarity) < jnp.inf)
  return jnp.where(finite, similarity, jnp.finfo(similarity.dtype).min)


def similarity_for_routing(similarity, num_experts: int, policy: str, *,
                           sanitize: bool = True) -> tuple[jax.Array, jax.Array]:
  """The similarity a re-routing step uses, and its `invalid_similarity` flag.

  Raises ValueError for a missing or misshaped similarity, or a concrete one with
  non-finite values. A traced one is checked as the module docstring says: returns
  `(similarity with non-finite entries at the dtype's minimum, int32 1 if it had any
  else 0)`; with `sanitize=False` the similarity comes back as it is, for a kernel that
  applies `least_similar_where_non_finite` to what it loads.
  """
  if similarity is None:
    raise ValueError(f"policy {policy!r} needs a similarity matrix [E, E] with "
                     f"E={num_experts}")
  check_similarity(similarity, num_experts)
  similarity = jnp.asarray(similarity)
  if is_concrete(similarity) or not jnp.issubdtype(similarity.dtype, jnp.floating):
    return similarity, jnp.zeros((), jnp.int32)
  ok = jnp.all(jnp.isfinite(similarity))
  checkify.debug_check(ok, f"similarity {_NON_FINITE}")
  if sanitize:
    similarity = least_similar_where_non_finite(similarity)
  return similarity, (~ok).astype(jnp.int32)


def check_ids(ids, valid, num_experts: int) -> None:
  """Checks `ids [T, K]` (integers in [0, E): eagerly where concrete, else with
  `checkify.debug_check`) and `valid [T]`."""
  if ids.ndim != 2:
    raise ValueError(f"ids must be [T, K], got shape {ids.shape}")
  if valid.shape != ids.shape[:1]:
    raise ValueError(f"valid must be [T] = {ids.shape[:1]}, got shape {valid.shape}")
  if not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"ids must be integers, got dtype {ids.dtype}")
  if not ids.size:
    return
  if is_concrete(ids):
    lo, hi = int(np.min(np.asarray(ids))), int(np.max(np.asarray(ids)))
    if lo < 0 or hi >= num_experts:
      raise ValueError(f"ids must lie in [0, {num_experts}), got values in [{lo}, {hi}]")
  else:
    checkify.debug_check(jnp.all((ids >= 0) & (ids < num_experts)),
                         f"ids must lie in [0, {num_experts})")


def check_routing(ids, weights, valid, num_experts: int) -> None:
  """`check_ids`, and `weights` must be `[T, K]` like `ids`."""
  if ids.ndim == 2 and weights.shape != ids.shape:
    raise ValueError(f"weights shape {weights.shape} does not match ids shape "
                     f"{ids.shape}")
  check_ids(ids, valid, num_experts)


def check_expert_weights(x, w_gate_up, w_down) -> None:
  """Raises ValueError unless `x [T, D]`, `w_gate_up [E, D, 2F]`, `w_down [E, F, D]`."""
  if x.ndim != 2:
    raise ValueError(f"x must be [T, D], got shape {x.shape}")
  if w_gate_up.ndim != 3 or w_down.ndim != 3:
    raise ValueError(f"w_gate_up must be [E, D, 2F] and w_down [E, F, D], got shapes "
                     f"{w_gate_up.shape} and {w_down.shape}")
  num_experts, dim, two_f = w_gate_up.shape
  if dim != x.shape[1] or two_f % 2:
    raise ValueError(f"w_gate_up shape {w_gate_up.shape} does not fit x [T, {x.shape[1]}]"
                     f" (expected [E, D, 2F] with hidden size D={x.shape[1]})")
  if w_down.shape != (num_experts, two_f // 2, dim):
    raise ValueError(f"w_down must be [E, F, D] = {(num_experts, two_f // 2, dim)}, "
                     f"got {w_down.shape}")


def check_ffn_inputs(x, ids, weights, valid, w_gate_up, w_down) -> None:
  """Every input check of one MoE FFN call: `x [T, D]`, expert weights, the batch T
  shared by `x`, `ids`, `weights` and `valid`, and the id range."""
  check_expert_weights(x, w_gate_up, w_down)
  if ids.ndim and ids.shape[0] != x.shape[0]:
    raise ValueError(f"ids hold a batch of {ids.shape[0]} tokens but x holds "
                     f"{x.shape[0]} (shape {x.shape})")
  check_routing(ids, weights, valid, w_gate_up.shape[0])


def check_block_input(x, valid, dim: int) -> None:
  """Checks an MoE block's `x [T, D]` or `[B, L, D]` against its hidden size `dim`
  and `valid` against `x`'s batch shape."""
  if x.ndim not in (2, 3):
    raise ValueError(f"x must be [T, D] or [B, L, D], got shape {x.shape}")
  if x.shape[-1] != dim:
    raise ValueError(f"x has hidden size D={x.shape[-1]} but the block has D={dim} "
                     f"(x shape {x.shape})")
  if valid.shape != x.shape[:-1]:
    raise ValueError(f"valid must have shape {x.shape[:-1]} for x of shape {x.shape}, "
                     f"got {valid.shape}")


def check_router_scores(router_scores, policy: str, num_tokens: int,
                        num_experts: int) -> None:
  """Requires `router_scores [T, E]` (policies `oea`, `sere_hybrid`)."""
  if router_scores is None:
    raise ValueError(f"policy {policy!r} needs router_scores [T, E]")
  if router_scores.shape != (num_tokens, num_experts):
    raise ValueError(f"router_scores must be [T, E] = {(num_tokens, num_experts)}, "
                     f"got shape {router_scores.shape}")


def check_shape(value, name: str, shape: tuple[int, ...]) -> None:
  """Requires `value.shape == shape`."""
  if value.shape != shape:
    raise ValueError(f"{name} must have shape {shape}, got {value.shape}")

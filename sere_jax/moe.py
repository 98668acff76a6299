"""A Flax NNX MoE block with SERE re-routing, for any decoder model.

    block = MoeBlock(dim=2048, ffn_dim=768, num_experts=128, top_k=8,
                     reroute=RerouteConfig(policy="sere", select_top_k=2),
                     normalize=True, rngs=nnx.Rngs(0))
    y, stats = block(x, valid, decode=True)          # x [T, D], valid [T]

The block owns the router, the fused expert weights (`w_gate_up [E, D, 2F]`,
`w_down [E, F, D]`) and the layer's expert similarity (an `ExpertSimilarity`
variable, saved and restored with the model; NaN until calibrated). Shared experts
are the model's business and live outside the block.
"""

from __future__ import annotations

from typing import Callable

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from sere_jax import policies
from sere_jax import routing
from sere_jax.config import RerouteConfig
from sere_jax.kernels import moe_ffn as moe_ffn_lib

# A router maps `[T, E]` logits to `(ids [T, K], weights [T, K], scores [T, E])`, where
# `scores` are the per-expert scores on the weights' scale (for the `oea` policy).
Router = Callable[[jax.Array], tuple[jax.Array, jax.Array, jax.Array]]
NO_REROUTE = RerouteConfig(policy="none")
# Names under which a block records its input inside `nnx.capture` (calibration).
CAPTURE_INPUT, CAPTURE_VALID = "moe_input", "moe_valid"


class ExpertSimilarity(nnx.Variable):
  """`[E, E]` similarity between one MoE layer's experts (NaN until calibrated)."""


def softmax_router(top_k: int, normalize: bool) -> Router:
  """Softmax scores, top-K, optionally renormalised (Qwen's `norm_topk_prob`)."""
  def route(logits):
    ids, weights = routing.route(logits, top_k, normalize=normalize)
    return ids, weights, jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  return route


class MoeBlock(nnx.Module):
  """Router + routed experts + re-routing policy of one MoE layer."""

  def __init__(self, dim: int, ffn_dim: int, num_experts: int, top_k: int, *,
               reroute: RerouteConfig = NO_REROUTE, normalize: bool = False,
               router: Router | None = None, impl: str = "auto",
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    if not 0 < top_k <= num_experts:
      raise ValueError(f"top_k must be in [1, {num_experts}], got {top_k}")
    init = nnx.initializers.normal(stddev=dim ** -0.5)
    self.num_experts, self.top_k, self.normalize = num_experts, top_k, normalize
    self.router_kernel = nnx.Param(init(rngs.params(), (dim, num_experts), param_dtype))
    self.w_gate_up = nnx.Param(init(rngs.params(), (num_experts, dim, 2 * ffn_dim),
                                    param_dtype))
    self.w_down = nnx.Param(nnx.initializers.normal(stddev=ffn_dim ** -0.5)(
        rngs.params(), (num_experts, ffn_dim, dim), param_dtype))
    self.similarity = ExpertSimilarity(jnp.full((num_experts, num_experts), jnp.nan,
                                                jnp.float32))
    self.reroute = reroute
    self.route = router or softmax_router(top_k, normalize)
    self.impl = impl

  def active_config(self, decode: bool) -> RerouteConfig:
    """The re-routing config of a decode (or prefill) step."""
    return self.reroute if decode or not self.reroute.decode_only else NO_REROUTE

  def __call__(self, x: jax.Array, valid: jax.Array, *, decode: bool
               ) -> tuple[jax.Array, policies.RerouteStats]:
    """`x [T, D]`, `valid [T]` -> `(y [T, D], stats)`.

    Inside `nnx.capture(..., nnx.Intermediate)` the block records its input as
    `moe_input` and `moe_valid` (for calibration); elsewhere that is a no-op.
    """
    self.sow(nnx.Intermediate, CAPTURE_INPUT, x, capture_noop=True)
    self.sow(nnx.Intermediate, CAPTURE_VALID, valid, capture_noop=True)
    logits = jnp.dot(x.astype(jnp.float32), self.router_kernel[...].astype(jnp.float32))
    ids, weights, scores = self.route(logits)
    config = self.active_config(decode)
    similarity = self.similarity[...] if config.policy == "sere" else None
    out = moe_ffn_lib.moe_ffn(
        x, ids, weights, self.w_gate_up[...], self.w_down[...], valid=valid,
        similarity=similarity, config=config, router_scores=scores,
        renormalize=self.normalize, impl=self.impl)
    return out.y, out.stats


def moe_blocks(model: nnx.Module) -> list[MoeBlock]:
  """The model's MoE blocks in layer order."""
  return [m for _, m in nnx.iter_graph(model) if isinstance(m, MoeBlock)]


def set_reroute(model: nnx.Module, config: RerouteConfig, impl: str | None = None) -> None:
  """Sets every MoE block's re-routing config (and, optionally, implementation)."""
  for block in moe_blocks(model):
    block.reroute = config
    if impl is not None:
      block.impl = impl


def check_calibrated(model: nnx.Module) -> None:
  """Raises ValueError if a block re-routes with `sere` but has no valid similarity."""
  for i, block in enumerate(moe_blocks(model)):
    if block.reroute.policy != "sere":
      continue
    sim = np.asarray(block.similarity[...])
    if sim.shape != (block.num_experts, block.num_experts):
      raise ValueError(f"MoE layer {i}: similarity has shape {sim.shape}, expected "
                       f"{(block.num_experts, block.num_experts)}")
    if not np.all(np.isfinite(sim)):
      raise ValueError(f"MoE layer {i}: policy 'sere' needs a calibrated similarity "
                       "matrix (this one holds NaN or inf); calibrate the model or load "
                       "one with its similarity")

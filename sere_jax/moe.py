"""A Flax NNX MoE block with SERE re-routing, for any decoder model.

    block = MoeBlock(dim=2048, ffn_dim=768, num_experts=128, top_k=8,
                     reroute=RerouteConfig(policy="sere", select_top_k=2),
                     normalize=True, rngs=nnx.Rngs(0))
    y, stats = block(x, valid, decode=True)          # x [T, D], valid [T]

Re-routing acts on the tokens of one decode step. A `[T, D]` input is one step. A
`[B, L, D]` input with `decode=True` is L steps of B tokens (teacher forcing): the
tokens at one position re-route together, exactly as when decoding one token at a
time. `group_size` g splits each step's B tokens into B/g consecutive groups that
re-route independently, so one call evaluates batches of g sequences.

The block owns the router, the fused expert weights (`w_gate_up [E, D, 2F]`,
`w_down [E, F, D]`) and the layer's expert similarity (an `ExpertSimilarity`
variable, saved and restored with the model; NaN until calibrated). The
`expert_pool` policy's calibrated statistics (`ExpertPoolStats` variables
`output_norm [E]` and `pool_scale [E, E]`) exist only once `set_pool_stats` was
called; until then that policy uses ones. Shared experts are the model's business
and live outside the block.

Policies other than `none` and `sere` (the fused schedule kernel's) re-route in the
block before the MoE op runs. With a `mesh` (`set_expert_parallel`), the experts are
sharded over its `expert_axis` (`sere_jax.expert_parallel`): every policy re-routes in
the block, replicated, and each device computes its own experts' slots. The `oracle`
diagnostic computes every expert's output for every token first (`[T, E, D]`, dense:
memory grows with T x E x (2F + D)).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from sere_jax import expert_parallel
from sere_jax import policies
from sere_jax import routing
from sere_jax import validation
from sere_jax.config import SIMILARITY_POLICIES, RerouteConfig
from sere_jax.kernels import moe_ffn as moe_ffn_lib
from sere_jax.kernels.router import api as router_api
from sere_jax.kernels.router import reference as router_reference
from sere_jax.numerics import gemm_dot, mixed_dot_operands, split_k_count, split_k_dot

# A router maps `[T, E]` logits, or float32 split-K partials `[P, T, E]` that sum to them
# (`router_reference.summed_logits`), to `(ids [T, K], weights [T, K], scores [T, E])`,
# where `scores` are the per-expert scores on the weights' scale (for the `oea` policy).
Router = Callable[[jax.Array], tuple[jax.Array, jax.Array, jax.Array]]
NO_REROUTE = RerouteConfig(policy="none")
# Policies that the MoE op re-routes itself (the fused schedule kernel's); the block
# re-routes every other one before calling it.
FUSED_POLICIES = ("none", "sere")
# Names under which a block records values inside `nnx.capture`: its input and valid
# mask (calibration) and its load-balancing loss (training).
CAPTURE_INPUT, CAPTURE_VALID = "moe_input", "moe_valid"
CAPTURE_LOAD_BALANCE = "load_balancing_loss"


class ExpertSimilarity(nnx.Variable):
  """`[E, E]` similarity between one MoE layer's experts (NaN until calibrated)."""


class ExpertPoolStats(nnx.Variable):
  """`expert_pool` statistics of one MoE layer: the experts' mean output norm `[E]` or
  the weight scale `[E, E]` of a route moved from one expert to another."""


def fused_router(impl: str) -> str | None:
  """The `kernels.router` implementation that the MoE op `impl` (`moe_ffn.IMPLS`)
  routes with (the Triton kernel, or its interpret mode), or None for
  `routing.route`."""
  backends = moe_ffn_lib.BACKENDS.get(moe_ffn_lib.resolve_impl(impl))
  return None if backends is None else backends.router


def softmax_router(top_k: int, normalize: bool, impl: str = "auto",
                   scaling_factor: float = 1.0) -> Router:
  """Softmax scores, top-K, optionally renormalised (Qwen's `norm_topk_prob`), the
  weights multiplied by `scaling_factor` (DeepSeek's `routed_scaling_factor`).

  The top-K is the `kernels.router` op where `fused_router(impl)` names one (split-K
  partials are summed as the kernel loads them), otherwise `routing.route`.
  """
  def route(logits):
    kernel = fused_router(impl)
    summed = router_reference.summed_logits(logits)
    if kernel is None:
      ids, weights = routing.route(summed, top_k, normalize=normalize)
    else:
      ids, weights = router_api.route(logits, top_k, normalize=normalize,
                                      implementation=kernel)
    if scaling_factor != 1.0:
      weights = weights * scaling_factor
    return ids, weights, jax.nn.softmax(summed.astype(jnp.float32), axis=-1)
  return route


class MoeBlock(nnx.Module):
  """Router + routed experts + re-routing policy of one MoE layer."""

  def __init__(self, dim: int, ffn_dim: int, num_experts: int, top_k: int, *,
               reroute: RerouteConfig = NO_REROUTE, normalize: bool = False,
               router: Router | None = None, impl: str = "auto", group_size: int = 0,
               param_dtype=jnp.float32, mesh: Mesh | None = None,
               expert_axis: str = "expert", rngs: nnx.Rngs):
    if not 0 < top_k <= num_experts:
      raise ValueError(f"top_k must be in [1, {num_experts}], got {top_k}")
    validation.check_layer_config(reroute, top_k, num_experts)
    if mesh is not None:
      expert_parallel.check_mesh(mesh, expert_axis, num_experts)
    init = nnx.initializers.normal(stddev=dim ** -0.5)
    self.num_experts, self.top_k, self.normalize = num_experts, top_k, normalize
    self.router_kernel = nnx.Param(init(rngs.params(), (dim, num_experts), param_dtype))
    self.w_gate_up = nnx.Param(init(rngs.params(), (num_experts, dim, 2 * ffn_dim),
                                    param_dtype))
    self.w_down = nnx.Param(nnx.initializers.normal(stddev=ffn_dim ** -0.5)(
        rngs.params(), (num_experts, ffn_dim, dim), param_dtype))
    self.similarity = ExpertSimilarity(jnp.full((num_experts, num_experts), jnp.nan,
                                                jnp.float32))
    self.output_norm = nnx.data(None)  # ExpertPoolStats [E] once set_pool_stats ran
    self.pool_scale = nnx.data(None)  # ExpertPoolStats [E, E] likewise
    self.reroute = reroute
    self.route = router or softmax_router(top_k, normalize, impl)
    # With the fused top-K kernel the router dot hands on its split-K partials.
    self.router_sums_partials = fused_router(impl) is not None
    self.impl = impl
    self.group_size = group_size
    self.mesh, self.expert_axis = mesh, expert_axis

  def set_pool_stats(self, output_norm: jax.Array, pool_scale: jax.Array) -> None:
    """Sets the `expert_pool` statistics (`similarity.pool_stats`): mean output norms
    `[E]` and weight scales `[E, E]` (float32)."""
    e = self.num_experts
    if output_norm.shape != (e,) or pool_scale.shape != (e, e):
      raise ValueError(f"pool stats must be [E] and [E, E] with E={e}, got "
                       f"{output_norm.shape} and {pool_scale.shape}")
    output_norm = jnp.asarray(output_norm, jnp.float32)
    pool_scale = jnp.asarray(pool_scale, jnp.float32)
    if self.output_norm is None:
      self.output_norm = ExpertPoolStats(output_norm)
      self.pool_scale = ExpertPoolStats(pool_scale)
    else:
      self.output_norm.set_value(output_norm)
      self.pool_scale.set_value(pool_scale)

  def active_config(self, decode: bool) -> RerouteConfig:
    """The re-routing config of a decode (or prefill) step; with a mesh, its
    `expert_devices` is the expert axis's size."""
    config = self.reroute
    if not decode and config.decode_only:  # prefill keeps top-K, counted on the placement
      config = dataclasses.replace(NO_REROUTE, expert_devices=config.expert_devices)
    if self.mesh is None:
      return config
    devices = self.mesh.shape[self.expert_axis]
    _check_devices(config, devices, self.expert_axis)
    return dataclasses.replace(config, expert_devices=devices)

  def __call__(self, x: jax.Array, valid: jax.Array, *, decode: bool
               ) -> tuple[jax.Array, policies.RerouteStats]:
    """`x [T, D]` or `[B, L, D]`, `valid` `[T]` or `[B, L]` -> `(y like x, stats)`.

    Stats are int32 scalars for one re-routing batch; with `decode=True` and a
    `[B, L, D]` input with L > 1, or with `group_size` set, they are `[L, G]`: one
    value per position and group (see the module docstring).

    Inside `nnx.capture(..., nnx.Intermediate)` the block records its flattened input
    as `moe_input` and `moe_valid` (calibration) and its load-balancing loss
    (training); elsewhere that is a no-op.

    Inputs, the config and the similarity are checked by `sere_jax.validation`
    (`stats.invalid_similarity` flags a traced similarity with NaN or inf).
    """
    validation.check_block_input(x, valid, self.router_kernel.shape[0])
    validation.check_layer_config(self.reroute, self.top_k, self.num_experts)
    config = self.active_config(decode)
    if config.policy in SIMILARITY_POLICIES and config.is_active(self.top_k):
      # Fails before the router runs; the routing path checks the same again.
      validation.check_similarity(self.similarity[...], self.num_experts)
    flat, flat_valid = x.reshape(-1, x.shape[-1]), valid.reshape(-1)
    self._record(CAPTURE_INPUT, flat)
    self._record(CAPTURE_VALID, flat_valid)
    # bf16 x bf16 products are exact in f32: no f32 copy of the router weight.
    operands = mixed_dot_operands(flat, self.router_kernel[...])
    if self.router_sums_partials:  # the top-K kernel sums the dot's split-K partials
      logits = split_k_dot(*operands, split_k_count(*self.router_kernel.shape))
    else:
      logits = gemm_dot(*operands, preferred_element_type=jnp.float32)
    ids, weights, scores = self.route(logits)
    logits = router_reference.summed_logits(logits)
    self._record(CAPTURE_LOAD_BALANCE,
                 routing.load_balancing_loss(logits, ids, flat_valid))
    stepwise = decode and (self.group_size > 0 or (x.ndim == 3 and x.shape[1] > 1))
    if not stepwise and config.policy in FUSED_POLICIES and self.mesh is None:
      similarity = self.similarity[...] if config.policy in SIMILARITY_POLICIES else None
      out = self._ffn(flat, ids, weights, flat_valid, similarity, config, scores)
      return out.y.reshape(x.shape), out.stats
    expert_out = None
    if config.policy == "oracle" and config.is_active(self.top_k):
      expert_out = self.expert_outputs(flat)
    inputs = (ids, weights, flat_valid, scores, expert_out)
    if stepwise:
      steps = x.shape[:2] if x.ndim == 3 else (x.shape[0], 1)
      ids, weights, stats = self._reroute_steps(inputs, steps, config)
    else:
      ids, weights, stats = self._reroute(config)(*inputs)
    out = self._ffn(flat, ids, weights, flat_valid, None, NO_REROUTE, scores)
    return out.y.reshape(x.shape), stats

  def _ffn(self, x, ids, weights, valid, similarity, config, scores):
    if self.mesh is not None:  # re-routed already (the fused path is single-device)
      return moe_ffn_lib.MoeOutput(
          expert_parallel.ffn(x, ids, weights, valid, self.w_gate_up[...],
                              self.w_down[...], mesh=self.mesh, axis=self.expert_axis,
                              impl=self.impl), ids, weights, None)
    return moe_ffn_lib.moe_ffn(
        x, ids, weights, self.w_gate_up[...], self.w_down[...], valid=valid,
        similarity=similarity, config=config, router_scores=scores,
        renormalize=self.normalize, impl=self.impl)

  def expert_outputs(self, x: jax.Array) -> jax.Array:
    """Every expert's output for every token of `x [T, D]`: `[T, E, D]` float32,
    computed densely as the `xla_dense` MoE op does."""
    w_down = self.w_down[...]
    lhs, w_gate_up = mixed_dot_operands(x, self.w_gate_up[...])
    gate_up = jnp.einsum("td,edf->tef", lhs, w_gate_up, preferred_element_type=jnp.float32)
    hidden, w_down = mixed_dot_operands(moe_ffn_lib.swiglu(gate_up).astype(w_down.dtype),
                                        w_down)
    return jnp.einsum("tef,efd->ted", hidden, w_down, preferred_element_type=jnp.float32)

  def _record(self, name: str, value: jax.Array) -> None:
    """`sow`s `value` inside `nnx.capture` only. (Checked by hand: flax 0.12.10, the
    GPU machine's version, has no `capture_noop` and outside a capture would store
    the value on the module.)"""
    if hasattr(self, "__captures__"):
      self.sow(nnx.Intermediate, name, value)

  def _reroute(self, config: RerouteConfig) -> Callable:
    """`(ids, weights, valid, scores, expert_out) -> (ids, weights, stats)` of one
    re-routing batch, with this block's similarity and pool statistics."""
    similarity = self.similarity[...] if config.policy in SIMILARITY_POLICIES else None
    pool = config.policy == "expert_pool" and self.output_norm is not None
    output_norm = self.output_norm[...] if pool else None
    pool_scale = self.pool_scale[...] if pool else None

    def reroute(ids, weights, valid, scores, expert_out):
      return policies.reroute(
          ids, weights, valid, similarity, config, num_experts=self.num_experts,
          router_scores=scores, renormalize=self.normalize, output_norm=output_norm,
          pool_scale=pool_scale, expert_out=expert_out)
    return reroute

  def _reroute_steps(self, inputs, steps, config):
    """Re-routes `[B * L]` tokens per position and per group of `group_size` rows."""
    batch, length = steps
    group = self.group_size or batch
    if batch % group:
      raise ValueError(f"group_size {group} does not divide the batch of {batch} tokens")

    def to_steps(a):  # [B * L, ...] -> [L, G, g, ...]
      a = a.reshape(batch // group, group, length, *a.shape[1:])
      return jnp.moveaxis(a, 2, 0)

    def from_steps(a):
      return jnp.moveaxis(a, 0, 2).reshape(batch * length, *a.shape[3:])

    new_ids, new_w, stats = jax.vmap(jax.vmap(self._reroute(config)))(
        *jax.tree.map(to_steps, inputs))
    return from_steps(new_ids), from_steps(new_w), stats


def moe_blocks(model: nnx.Module) -> list[MoeBlock]:
  """The model's MoE blocks in layer order."""
  return [m for _, m in nnx.iter_graph(model) if isinstance(m, MoeBlock)]


def set_reroute(model: nnx.Module, config: RerouteConfig, impl: str | None = None,
                group_size: int | None = None) -> None:
  """Sets every MoE block's re-routing config (and, optionally, implementation and
  re-routing group size; 0 = the whole batch)."""
  if group_size is not None:
    validation.check_int("group_size", group_size, low=0)
  blocks = moe_blocks(model)
  for block in blocks:  # every block is checked before any changes
    validation.check_layer_config(config, block.top_k, block.num_experts)
  for block in blocks:
    block.reroute = config
    if impl is not None:
      block.impl = impl
    if group_size is not None:
      block.group_size = group_size


def set_expert_parallel(model: nnx.Module, mesh: Mesh, axis: str = "expert") -> None:
  """Shards every MoE block's routed experts over `mesh`'s `axis` and places the rest
  of the model replicated on the mesh (`expert_parallel.shard_state`). The model then
  computes what it computed on one device (see `sere_jax.expert_parallel`)."""
  blocks = moe_blocks(model)
  for block in blocks:  # every block is checked before any changes
    _check_devices(block.reroute, expert_parallel.check_mesh(mesh, axis, block.num_experts),
                   axis)
  for block in blocks:
    block.mesh, block.expert_axis = mesh, axis
  expert_parallel.shard_state(model, mesh, axis)


def _check_devices(config: RerouteConfig, devices: int, axis: str) -> None:
  if config.expert_devices not in (0, devices):
    raise ValueError(f"policy {config.policy!r} places the experts on "
                     f"{config.expert_devices} devices, but the expert axis {axis!r} "
                     f"has {devices}")


def check_calibrated(model: nnx.Module) -> None:
  """Raises ValueError if a block's policy reads the similarity (`sere`,
  `sere_hybrid`, `expert_pool`) but the block has no valid one."""
  for i, block in enumerate(moe_blocks(model)):
    policy = block.reroute.policy
    if policy in SIMILARITY_POLICIES:
      validation.check_similarity(
          block.similarity[...], block.num_experts,
          name=f"MoE layer {i}: policy {policy!r} reads the similarity, which")

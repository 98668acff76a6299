"""DeepSeek-V2 / V2-Lite in Flax NNX, with Hugging Face weight import.

    model = load_hf("/path/to/DeepSeek-V2-Lite")         # safetensors directory
    cache = model.init_cache(batch, length, jnp.float32)
    out = model(tokens, positions, token_valid, cache, cache_valid, cache_index)

Multi-head latent attention (MLA): queries come from `q_proj` (or the low-rank
`q_a_proj -> q_a_layernorm -> q_b_proj`), keys and values from a compressed latent
(`kv_a_proj_with_mqa -> kv_a_layernorm -> kv_b_proj`, whose key and value halves are
kept apart as `k_b_proj` and `v_b_proj`) plus one decoupled RoPE key
shared by all heads; RoPE may be YaRN-scaled. The cache holds what MLA compresses
to, per token: the normalised latent and the rotated shared key (576 values per token
and layer in V2-Lite against 5120 for per-head keys and values). One new token attends
in the latent space (`kv_b_proj` absorbed into the query and the output); longer
chunks expand the cached latents into per-head keys and values. `attention_impl`
chooses the decode step's kernels: `xla` (the model's building blocks) or the Pallas
kernels `sere_jax.kernels.latent_attention` (the attention in the latent space, from
`LATENT_KERNEL_MIN_BATCH` sequences) and `residual_norm`, fed the output projection's
split-K partials (`triton` on GPUs, `interpret` anywhere); `auto` (the default) is
`triton` on GPUs and `xla` elsewhere. MoE layers route with softmax scores, greedy or
group-limited greedy top-K (`DeepseekV2Config.topk_method`), and add
`n_shared_experts` as one dense MLP.

Semantics follow DeepSeek's reference code, which the Hugging Face implementation
matches for every released checkpoint; where they differ (transformers ignores
`norm_topk_prob` and `moe_layer_freq`), the reference code wins.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from sere_jax import policies
from sere_jax.config import RerouteConfig
from sere_jax.kernels.latent_attention import api as latent_attention_api
from sere_jax.kernels.router.reference import summed_logits
from sere_jax.models import base
from sere_jax.models import hf_import
from sere_jax.models import layers
from sere_jax.models.layers import KVCache, Linear, RMSNorm, SwiGLU
from sere_jax.models.layers import apply_rope, attend, attention_mask
from sere_jax.moe import MoeBlock, Router, softmax_router
from sere_jax.numerics import gemm_dot, mixed_dot_operands

NO_REROUTE = RerouteConfig(policy="none")
TOPK_METHODS = ("greedy", "group_limited_greedy")
ROPE_TYPES = ("default", "yarn")
LATENT_NORM_EPS = 1e-6  # q_a_layernorm / kv_a_layernorm use the default eps in HF
# The smallest batch whose decode step runs the latent-attention kernel (with a kernel
# `attention_impl`): on an H100 the kernel, one program per sequence, took 4-5 % more
# GPU time per step than XLA's dots at B = 1, the same at B = 16 with five kernels per
# layer fewer, and 1.2 % less at B = 64
# (docs/benchmarks/experiments/deepseek_latent_attention_ab_h100.json).
LATENT_KERNEL_MIN_BATCH = 16


@dataclasses.dataclass(frozen=True)
class DeepseekV2Config:
  """DeepSeek-V2 hyper-parameters (HF names; YaRN settings flattened into `rope_*`)."""

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  moe_intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  kv_lora_rank: int
  qk_nope_head_dim: int
  qk_rope_head_dim: int
  v_head_dim: int
  n_routed_experts: int
  num_experts_per_tok: int
  q_lora_rank: int | None = None
  n_shared_experts: int = 0
  first_k_dense_replace: int = 0
  moe_layer_freq: int = 1
  routed_scaling_factor: float = 1.0
  norm_topk_prob: bool = False
  topk_method: str = "greedy"
  n_group: int = 1
  topk_group: int = 1
  attention_bias: bool = False
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  max_position_embeddings: int = 2048
  rope_theta: float = 10000.0
  rope_type: str = "default"
  rope_factor: float = 1.0
  rope_original_max_position_embeddings: int = 2048
  rope_beta_fast: float = 32.0
  rope_beta_slow: float = 1.0
  rope_mscale: float | None = None
  rope_mscale_all_dim: float | None = None
  rope_attention_factor: float | None = None
  rope_truncate: bool = True
  architecture: str = "deepseek_v2"

  def __post_init__(self):
    if self.architecture != "deepseek_v2":
      raise ValueError(f"architecture must be 'deepseek_v2', got {self.architecture!r}")
    if self.topk_method not in TOPK_METHODS:
      raise ValueError(f"topk_method must be one of {TOPK_METHODS}, got "
                       f"{self.topk_method!r}")
    if self.rope_type not in ROPE_TYPES:
      raise ValueError(f"rope_scaling type must be one of {ROPE_TYPES}, got "
                       f"{self.rope_type!r}")
    if not 0 < self.num_experts_per_tok <= self.n_routed_experts:
      raise ValueError(f"num_experts_per_tok must be in [1, {self.n_routed_experts}], "
                       f"got {self.num_experts_per_tok}")
    if self.n_routed_experts % self.n_group or not 0 < self.topk_group <= self.n_group:
      raise ValueError(f"n_group {self.n_group} must divide n_routed_experts "
                       f"{self.n_routed_experts} and topk_group {self.topk_group} must "
                       f"be in [1, n_group]")
    if self.qk_rope_head_dim % 2:
      raise ValueError(f"qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")

  @property
  def qk_head_dim(self) -> int:
    return self.qk_nope_head_dim + self.qk_rope_head_dim

  def is_moe_layer(self, layer: int) -> bool:
    return layer >= self.first_k_dense_replace and layer % self.moe_layer_freq == 0

  @classmethod
  def from_hf(cls, config: dict[str, Any]) -> DeepseekV2Config:
    """Maps a Hugging Face `config.json` dict; ValueError on options we do not support."""
    if config.get("n_routed_experts") is None:
      raise ValueError("unsupported DeepSeek-V2 option n_routed_experts=None (no MoE)")
    checks = {
        "model_type": (config.get("model_type", "deepseek_v2"), ("deepseek_v2",)),
        "scoring_func": (config.get("scoring_func", "softmax"), ("softmax",)),
        "hidden_act": (config.get("hidden_act", "silu"), ("silu",)),
        "mlp_bias": (config.get("mlp_bias", False), (False,)),
        "num_key_value_heads": (config.get("num_key_value_heads"),
                                (None, config["num_attention_heads"])),
    }
    for key, (value, allowed) in checks.items():
      if value not in allowed:
        raise ValueError(f"unsupported DeepSeek-V2 option {key}={value!r}")
    topk_method = config.get("topk_method") or "greedy"
    grouped = topk_method == "group_limited_greedy"
    fields = {k: config[k] for k in (
        "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
        "num_hidden_layers", "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim",
        "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "num_experts_per_tok")}
    for key in ("q_lora_rank", "n_shared_experts", "first_k_dense_replace",
                "moe_layer_freq", "routed_scaling_factor", "norm_topk_prob",
                "attention_bias", "rms_norm_eps", "tie_word_embeddings",
                "max_position_embeddings"):
      if config.get(key) is not None:
        fields[key] = config[key]
    return cls(**fields, topk_method=topk_method,
               n_group=config["n_group"] if grouped else 1,
               topk_group=config["topk_group"] if grouped else 1,
               **_rope_fields(config))


def _rope_fields(config: dict[str, Any]) -> dict[str, Any]:
  """The `rope_*` fields from HF's `rope_parameters` (v5) or `rope_theta` + `rope_scaling`."""
  params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
  rope_type = params.get("rope_type", params.get("type", "default"))
  fields = {"rope_type": rope_type,
            "rope_theta": params.get("rope_theta", config.get("rope_theta", 10000.0))}
  if rope_type == "yarn":
    max_pos = config.get("max_position_embeddings", 2048)
    original = config.get("original_max_position_embeddings",
                          params.get("original_max_position_embeddings", max_pos))
    fields.update(
        rope_factor=params.get("factor") or max_pos / original,
        rope_original_max_position_embeddings=original,
        rope_beta_fast=params.get("beta_fast") or 32.0,
        rope_beta_slow=params.get("beta_slow") or 1.0,
        rope_mscale=params.get("mscale"),
        rope_mscale_all_dim=params.get("mscale_all_dim"),
        rope_attention_factor=params.get("attention_factor"),
        rope_truncate=params.get("truncate", True))
  return fields


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
  """YaRN's attention magnitude correction `0.1 * mscale * ln(scale) + 1` (1 if scale <= 1)."""
  return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(config: DeepseekV2Config) -> tuple[np.ndarray, float]:
  """RoPE inverse frequencies `[qk_rope_head_dim // 2]` (f32) and the cos/sin factor."""
  dim, base = config.qk_rope_head_dim, config.rope_theta
  pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
  if config.rope_type == "default":
    return (1.0 / pos_freqs).astype(np.float32), 1.0
  factor = config.rope_factor
  mscale, mscale_all_dim = config.rope_mscale, config.rope_mscale_all_dim
  attention_factor = config.rope_attention_factor
  if attention_factor is None:
    attention_factor = (yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)
                        if mscale and mscale_all_dim else yarn_get_mscale(factor))

  def correction_dim(rotations: float) -> float:
    ratio = config.rope_original_max_position_embeddings / (rotations * 2 * math.pi)
    return dim * math.log(ratio) / (2 * math.log(base))

  low, high = correction_dim(config.rope_beta_fast), correction_dim(config.rope_beta_slow)
  if config.rope_truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001
  ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
  extrapolation = 1 - ramp.astype(np.float32)
  inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
  return inv_freq.astype(np.float32), float(attention_factor)


def softmax_scale(config: DeepseekV2Config) -> float:
  """`qk_head_dim ** -0.5`, times `yarn_get_mscale(factor, mscale_all_dim) ** 2` under YaRN."""
  scale = config.qk_head_dim ** -0.5
  if config.rope_type == "yarn" and config.rope_mscale_all_dim:
    scale *= yarn_get_mscale(config.rope_factor, config.rope_mscale_all_dim) ** 2
  return scale


def deepseek_router(config: DeepseekV2Config, impl: str = "auto") -> Router:
  """Softmax scores -> (group-limited) greedy top-K -> normalised or scaled weights.

  Weights are renormalised when `norm_topk_prob` (and K > 1), else multiplied by
  `routed_scaling_factor`. Greedy top-K is `moe.softmax_router` (the fused top-K
  kernel where the MoE op `impl` has one). Under `group_limited_greedy`, in XLA, each
  token keeps the `topk_group` groups of experts with the highest maximum score;
  experts of other groups score 0 (as in DeepSeek's code), and the scores handed back
  are the masked softmax scores. The logits may be split-K partials (`moe.Router`).
  """
  top_k, num_groups = config.num_experts_per_tok, config.n_group
  normalize = config.norm_topk_prob and top_k > 1
  scaling = 1.0 if normalize else config.routed_scaling_factor
  if config.topk_method == "greedy":
    return softmax_router(top_k, normalize, impl, scaling_factor=scaling)

  def route(logits: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    scores = jax.nn.softmax(summed_logits(logits).astype(jnp.float32), axis=-1)
    tokens, experts = scores.shape
    group_max = jnp.max(scores.reshape(tokens, num_groups, -1), axis=-1)
    _, top_groups = jax.lax.top_k(group_max, config.topk_group)
    keep = jnp.zeros((tokens, num_groups), jnp.bool_).at[
        jnp.arange(tokens)[:, None], top_groups].set(True)
    scores = jnp.where(jnp.repeat(keep, experts // num_groups, axis=1), scores, 0.0)
    weights, ids = jax.lax.top_k(scores, top_k)
    if normalize:
      weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
    return ids.astype(jnp.int32), weights * scaling, scores

  return route


def _deinterleave(x: jax.Array) -> jax.Array:
  """`[..., (r, 2)]` pairs -> `[even | odd]`, so rotate-half RoPE equals HF's complex RoPE."""
  return jnp.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1)


class MlaAttention(nnx.Module):
  """Multi-head latent attention with decoupled RoPE and a compressed (latent) cache.

  The cache's `k [B, S, 1, qk_rope_head_dim]` holds the rotated shared key and its
  `v [B, S, 1, kv_lora_rank]` the normalised latent, which `k_b_proj` and `v_b_proj`
  (HF's `kv_b_proj` split) expand into each head's no-RoPE key and value.
  """

  def __init__(self, config: DeepseekV2Config, *, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    c, dim, heads = config, config.hidden_size, config.num_attention_heads
    kw = dict(param_dtype=param_dtype, rngs=rngs)
    self.config = config
    if c.q_lora_rank is None:
      self.q_proj = Linear(dim, heads * c.qk_head_dim, **kw)
    else:
      self.q_a_proj = Linear(dim, c.q_lora_rank, bias=c.attention_bias, **kw)
      self.q_a_layernorm = RMSNorm(c.q_lora_rank, LATENT_NORM_EPS, param_dtype)
      self.q_b_proj = Linear(c.q_lora_rank, heads * c.qk_head_dim, **kw)
    self.kv_a_proj_with_mqa = Linear(dim, c.kv_lora_rank + c.qk_rope_head_dim,
                                     bias=c.attention_bias, **kw)
    self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, LATENT_NORM_EPS, param_dtype)
    # HF's `kv_b_proj`, kept as its key and value halves: decode's absorbed dots read
    # each half in place, with no per-step copy of a strided slice of one weight.
    self.k_b_proj = Linear(c.kv_lora_rank, heads * c.qk_nope_head_dim, **kw)
    self.v_b_proj = Linear(c.kv_lora_rank, heads * c.v_head_dim, **kw)
    self.o_proj = Linear(heads * c.v_head_dim, dim, bias=c.attention_bias, **kw)

  def __call__(self, x: jax.Array, positions: jax.Array, cache: KVCache,
               mask: jax.Array, cache_index: jax.Array, *, impl: str = "xla"
               ) -> tuple[jax.Array, KVCache]:
    """`x [B, L, D]` -> `(out [B, L, D], cache)`. One new token attends with the
    `latent_attention` op's `impl` (a resolved `layers.ATTENTION_IMPLS` name) from
    `LATENT_KERNEL_MIN_BATCH` sequences, else with its XLA reference; with a kernel
    `impl` (not `xla`) and no output bias, `out` is the output projection's split-K
    partials `[P, B, 1, D]` (`layers.add_and_norm`)."""
    c = self.config
    b, l, _ = x.shape
    heads = c.num_attention_heads
    q = (self.q_proj(x) if c.q_lora_rank is None
         else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))))
    q_nope, q_pe = jnp.split(q.reshape(b, l, heads, c.qk_head_dim), [c.qk_nope_head_dim], -1)
    latent, k_pe = jnp.split(self.kv_a_proj_with_mqa(x), [c.kv_lora_rank], -1)
    inv_freq, rope_scale = rope_frequencies(c)
    q_pe = apply_rope(_deinterleave(q_pe), positions, inv_freq, rope_scale)
    k_pe = apply_rope(_deinterleave(k_pe[:, :, None, :]), positions, inv_freq, rope_scale)
    cache = cache.update(k_pe, self.kv_a_layernorm(latent)[:, :, None, :], cache_index)
    if l == 1:  # one new token: attend in the latent space
      w_k = self.k_b_proj.kernel[...].astype(q.dtype).reshape(c.kv_lora_rank, heads, -1)
      w_v = self.v_b_proj.kernel[...].astype(q.dtype).reshape(c.kv_lora_rank, heads, -1)
      q_latent = jnp.einsum("blhn,rhn->blhr", *mixed_dot_operands(q_nope, w_k),
                            preferred_element_type=jnp.float32).astype(q.dtype)
      out = latent_attention_api.latent_attention(
          q_latent[:, 0], q_pe[:, 0], cache.v[:, :, 0], cache.k[:, :, 0], mask[:, 0],
          cache_index, scale=softmax_scale(c),
          implementation=impl if b >= LATENT_KERNEL_MIN_BATCH else "xla")[:, None]
      out = jnp.einsum("blhr,rhv->blhv", *mixed_dot_operands(out, w_v),
                       preferred_element_type=jnp.float32).astype(q.dtype)
      if impl != "xla" and self.o_proj.bias is None:
        return layers.projection_partials(out.reshape(b, -1), self.o_proj), cache
    else:  # a chunk of tokens: expand every cached latent into per-head keys and values
      slots = cache.v.shape[1]
      latents = cache.v[:, :, 0].astype(q.dtype)
      k_nope = self.k_b_proj(latents).reshape(b, slots, heads, c.qk_nope_head_dim)
      v = self.v_b_proj(latents).reshape(b, slots, heads, c.v_head_dim)
      k = jnp.concatenate([k_nope, jnp.broadcast_to(cache.k.astype(k_nope.dtype),
                                                    (b, slots, heads, c.qk_rope_head_dim))],
                          axis=-1)
      out = attend(jnp.concatenate([q_nope, q_pe], -1), k, v, mask, softmax_scale(c))
    return self.o_proj(out.reshape(b, l, heads * c.v_head_dim)), cache


class DecoderLayer(nnx.Module):
  """Pre-norm MLA + (dense SwiGLU | routed MoE + shared experts)."""

  def __init__(self, config: DeepseekV2Config, layer: int, *, reroute: RerouteConfig,
               impl: str, param_dtype, rngs: nnx.Rngs, attention_impl: str = "auto"):
    dim, kw = config.hidden_size, dict(param_dtype=param_dtype, rngs=rngs)
    self.attention_impl = attention_impl
    self.input_layernorm = RMSNorm(dim, config.rms_norm_eps, param_dtype)
    self.self_attn = MlaAttention(config, **kw)
    self.post_attention_layernorm = RMSNorm(dim, config.rms_norm_eps, param_dtype)
    if config.is_moe_layer(layer):
      self.mlp = MoeBlock(
          dim, config.moe_intermediate_size, config.n_routed_experts,
          config.num_experts_per_tok, reroute=reroute,
          normalize=config.norm_topk_prob and config.num_experts_per_tok > 1,
          router=deepseek_router(config, impl), impl=impl, **kw)
    else:
      self.mlp = SwiGLU(dim, config.intermediate_size, **kw)
    shared = config.moe_intermediate_size * config.n_shared_experts
    self.shared_experts = (SwiGLU(dim, shared, **kw)
                           if config.is_moe_layer(layer) and shared else None)

  def __call__(self, x: jax.Array, positions: jax.Array, token_valid: jax.Array,
               cache: KVCache, mask: jax.Array, cache_index: jax.Array, decode: bool
               ) -> tuple[jax.Array, KVCache, policies.RerouteStats | None]:
    attention_impl = layers.resolve_attention_impl(self.attention_impl)
    h, cache = self.self_attn(self.input_layernorm(x), positions, cache, mask, cache_index,
                              impl=attention_impl)
    x, h = layers.add_and_norm(x, h, self.post_attention_layernorm,
                               implementation=attention_impl)
    stats = None
    if isinstance(self.mlp, MoeBlock):
      y, stats = self.mlp(h, token_valid, decode=decode)
      if self.shared_experts is not None:
        y = y + self.shared_experts(h)
    else:
      y = self.mlp(h)
    return x + y, cache, stats


class DeepseekV2ForCausalLM(nnx.Module):
  """DeepSeek-V2 decoder with LM head; see `sere_jax.models.base` for the interface."""

  def __init__(self, config: DeepseekV2Config, *, reroute: RerouteConfig = NO_REROUTE,
               impl: str = "auto", attention_impl: str = "auto", param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    layers.resolve_attention_impl(attention_impl)  # rejects unknown values
    self.config = config
    self.embed_tokens = nnx.Param(nnx.initializers.normal(stddev=0.02)(
        rngs.params(), (config.vocab_size, config.hidden_size), param_dtype))
    self.layers = nnx.List([
        DecoderLayer(config, i, reroute=reroute, impl=impl, attention_impl=attention_impl,
                     param_dtype=param_dtype, rngs=rngs)
        for i in range(config.num_hidden_layers)])
    self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype)
    self.lm_head = (None if config.tie_word_embeddings else
                    Linear(config.hidden_size, config.vocab_size, param_dtype=param_dtype,
                           rngs=rngs))

  def init_cache(self, batch: int, length: int, dtype=jnp.float32) -> list[KVCache]:
    c = self.config
    return [KVCache.zeros(batch, length, 1, c.qk_rope_head_dim, c.kv_lora_rank, dtype)
            for _ in range(c.num_hidden_layers)]

  def __call__(self, tokens: jax.Array, positions: jax.Array, token_valid: jax.Array,
               cache: list[KVCache], cache_valid: jax.Array, cache_index: jax.Array, *,
               decode: bool = False, last_only: bool = False) -> base.ForwardOutput:
    x = self.embed_tokens[...][tokens]
    mask = attention_mask(cache_valid, cache_index, tokens.shape[1])
    new_cache, stats = [], []
    for layer, layer_cache in zip(self.layers, cache):
      x, layer_cache, layer_stats = layer(x, positions, token_valid, layer_cache, mask,
                                          cache_index, decode)
      new_cache.append(layer_cache)
      if layer_stats is not None:
        stats.append(layer_stats)
    if last_only:  # the LM head on the last position only: [B, 1, V] logits
      x = x[:, -1:]
    x = self.norm(x)
    logits = (self.lm_head(x) if self.lm_head is not None
              else gemm_dot(x, self.embed_tokens[...].T.astype(x.dtype)))
    return base.ForwardOutput(logits.astype(jnp.float32), new_cache, tuple(stats))


def _load_kv_b_halves(load: hf_import.WeightLoader, attn: MlaAttention, name: str,
                      config: DeepseekV2Config) -> None:
  """HF's `kv_b_proj.weight [H·(nope + v), rank]` (per head: key rows, then value
  rows) -> `attn.k_b_proj` and `attn.v_b_proj`."""
  c, heads = config, config.num_attention_heads
  per_head = c.qk_nope_head_dim + c.v_head_dim
  w = load.reader.get(f"{name}.weight", (heads * per_head, c.kv_lora_rank))
  w = w.reshape(heads, per_head, c.kv_lora_rank)
  load.put(attn.k_b_proj.kernel, w[:, :c.qk_nope_head_dim].reshape(-1, c.kv_lora_rank).T)
  load.put(attn.v_b_proj.kernel, w[:, c.qk_nope_head_dim:].reshape(-1, c.kv_lora_rank).T)


def load_hf(directory: str, *, param_dtype=jnp.float32, reroute: RerouteConfig = NO_REROUTE,
            impl: str = "auto") -> DeepseekV2ForCausalLM:
  """Builds the model of a HF DeepSeek-V2 checkpoint directory and fills every weight.

  Raises KeyError / ValueError naming a missing, mis-shaped or unexpected tensor.
  """
  config = DeepseekV2Config.from_hf(hf_import.read_config(directory))
  model = nnx.eval_shape(lambda: DeepseekV2ForCausalLM(
      config, reroute=reroute, impl=impl, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
  reader = hf_import.CheckpointReader(directory)
  load = hf_import.WeightLoader(reader, param_dtype)
  load.tensor(model.embed_tokens, "model.embed_tokens.weight")
  load.norm(model.norm, "model.norm")
  if model.lm_head is not None:
    load.linear(model.lm_head, "lm_head")
  for i, layer in enumerate(model.layers):
    name, attn = f"model.layers.{i}", layer.self_attn
    load.norm(layer.input_layernorm, f"{name}.input_layernorm")
    load.norm(layer.post_attention_layernorm, f"{name}.post_attention_layernorm")
    if config.q_lora_rank is None:
      load.linear(attn.q_proj, f"{name}.self_attn.q_proj")
    else:
      load.linear(attn.q_a_proj, f"{name}.self_attn.q_a_proj")
      load.norm(attn.q_a_layernorm, f"{name}.self_attn.q_a_layernorm")
      load.linear(attn.q_b_proj, f"{name}.self_attn.q_b_proj")
    for part in ("kv_a_proj_with_mqa", "o_proj"):
      load.linear(getattr(attn, part), f"{name}.self_attn.{part}")
    _load_kv_b_halves(load, attn, f"{name}.self_attn.kv_b_proj", config)
    load.norm(attn.kv_a_layernorm, f"{name}.self_attn.kv_a_layernorm")
    if isinstance(layer.mlp, MoeBlock):
      load.moe(layer.mlp, f"{name}.mlp")
      if layer.shared_experts is not None:
        load.swiglu(layer.shared_experts, f"{name}.mlp.shared_experts")
    else:
      load.swiglu(layer.mlp, f"{name}.mlp")
  tied = ("lm_head.weight",) if config.tie_word_embeddings else ()
  reader.check_all_taken(ignore=("rotary_emb.inv_freq",) + tied)
  return model

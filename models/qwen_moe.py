"""Qwen2-MoE (Qwen1.5-MoE-A2.7B) and Qwen3-MoE (Qwen3-30B-A3B) in Flax NNX.

    model = load_hf("/ckpt/Qwen3-30B-A3B", param_dtype=jnp.bfloat16)
    cache = model.init_cache(batch, length, jnp.bfloat16)
    out = model(tokens, positions, token_valid, cache, cache_valid, cache_index,
                decode=False)

Both are pre-norm decoders with grouped-query attention, RoPE and softmax top-K MoE
layers. Qwen2-MoE adds q/k/v biases and a sigmoid-gated shared expert; Qwen3-MoE adds
per-head RMSNorm on queries and keys (before RoPE) and renormalises the top-K weights.
Layers listed in `mlp_only_layers`, or off the `decoder_sparse_step` grid, are dense.

`attention_impl` chooses how a decode step (one new token) attends: `xla` (the model's
building blocks, also used for prefill) or the fused Pallas kernel
`sere_jax.kernels.decode_attention` (`triton` on GPUs, `interpret` anywhere); `auto`
(the default) is `triton` on GPUs and `xla` elsewhere (`layers.ATTENTION_IMPLS`,
`layers.resolve_attention_impl`). With the kernel, the q/k/v and output projections
hand their split-K partials to the attention and `residual_norm` kernels, which sum
them as they load them, and the layer's input RMSNorm is folded past the q/k/v dot
(its scale into the dot's operand, its `1 / rms` and the q/k/v biases into the
attention kernel), so it runs no kernel of its own.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from sere_jax.config import RerouteConfig
from sere_jax.kernels.decode_attention import api as attention_api
from sere_jax.kernels.decode_attention.reference import folded_norm_weight
from sere_jax.models import base
from sere_jax.models import hf_import
from sere_jax.models import layers
from sere_jax.moe import MoeBlock
from sere_jax.numerics import gemm_dot, mixed_dot_operands, split_k_count, split_k_dot
from sere_jax.policies import RerouteStats

ARCHITECTURES = ("qwen2_moe", "qwen3_moe")
NO_REROUTE = RerouteConfig(policy="none")


@dataclasses.dataclass(frozen=True)
class QwenMoeConfig:
  """Shapes and options of a Qwen MoE model (`dataclasses.asdict` round-trips it).

  `shared_expert_size` 0 means no shared expert; `qk_norm` is Qwen3's per-head norm;
  `max_position_embeddings` bounds prompt + generated tokens (None: unlimited).
  """

  architecture: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  num_experts: int
  top_k: int
  moe_intermediate_size: int
  shared_expert_size: int = 0
  norm_topk_prob: bool = False
  qkv_bias: bool = False
  o_bias: bool = False
  qk_norm: bool = False
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  tie_word_embeddings: bool = False
  decoder_sparse_step: int = 1
  mlp_only_layers: tuple[int, ...] = ()
  max_position_embeddings: int | None = None

  def __post_init__(self):
    if self.architecture not in ARCHITECTURES:
      raise ValueError(f"architecture must be one of {ARCHITECTURES}, got "
                       f"{self.architecture!r}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads "
                       f"{self.num_kv_heads}")
    if self.decoder_sparse_step < 1:
      raise ValueError(f"decoder_sparse_step must be >= 1, got {self.decoder_sparse_step}")
    if self.max_position_embeddings is not None and (
        isinstance(self.max_position_embeddings, bool)
        or not isinstance(self.max_position_embeddings, int)
        or self.max_position_embeddings < 1):
      raise ValueError("max_position_embeddings must be None or an integer >= 1, got "
                       f"{self.max_position_embeddings!r}")
    object.__setattr__(self, "mlp_only_layers", tuple(self.mlp_only_layers))

  def is_moe_layer(self, layer: int) -> bool:
    """Whether decoder layer `layer` has an MoE block (else a dense SwiGLU)."""
    return (self.num_experts > 0 and layer not in self.mlp_only_layers
            and (layer + 1) % self.decoder_sparse_step == 0)

  @classmethod
  def from_hf(cls, hf: dict[str, Any]) -> QwenMoeConfig:
    """Maps a Hugging Face `config.json`; raises ValueError on unsupported options."""
    arch = hf.get("model_type")
    if arch not in ARCHITECTURES:
      raise ValueError(f"unsupported model_type {arch!r}; expected one of {ARCHITECTURES}")
    if hf.get("hidden_act", "silu") != "silu":
      raise ValueError(f"unsupported hidden_act {hf['hidden_act']!r} (only 'silu')")
    if hf.get("use_sliding_window"):
      raise ValueError("unsupported option use_sliding_window=True")
    if hf.get("rope_scaling") is not None:
      raise ValueError(f"unsupported rope_scaling {hf['rope_scaling']!r}")
    rope = hf.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
      raise ValueError(f"unsupported rope_parameters {rope!r} (only rope_type 'default')")
    if any(t != "full_attention" for t in hf.get("layer_types") or ()):
      raise ValueError(f"unsupported layer_types {hf['layer_types']!r} (only full_attention)")

    def need(key, alias=None):
      if key not in hf and alias not in hf:
        raise ValueError(f"{arch} config is missing {key!r}")
      return hf[key] if key in hf else hf[alias]

    hidden, heads = need("hidden_size"), need("num_attention_heads")
    qwen2 = arch == "qwen2_moe"
    bias = hf.get("attention_bias", False)
    return cls(
        architecture=arch,
        vocab_size=need("vocab_size"),
        hidden_size=hidden,
        intermediate_size=need("intermediate_size"),
        num_layers=need("num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hidden // heads,
        num_experts=need("num_experts", "num_local_experts"),
        top_k=need("num_experts_per_tok"),
        moe_intermediate_size=need("moe_intermediate_size"),
        shared_expert_size=need("shared_expert_intermediate_size") if qwen2 else 0,
        norm_topk_prob=hf.get("norm_topk_prob", False),
        qkv_bias=hf.get("qkv_bias", True) if qwen2 else bias,
        o_bias=False if qwen2 else bias,
        qk_norm=not qwen2,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(hf.get("rope_theta", rope.get("rope_theta", 10000.0))),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        decoder_sparse_step=hf.get("decoder_sparse_step", 1),
        mlp_only_layers=tuple(hf.get("mlp_only_layers") or ()),
        max_position_embeddings=hf.get("max_position_embeddings"))


class Attention(nnx.Module):
  """Grouped-query self-attention with RoPE and (Qwen3) per-head q/k RMSNorm."""

  def __init__(self, c: QwenMoeConfig, *, param_dtype, rngs: nnx.Rngs,
               attention_impl: str = "auto"):
    layers.resolve_attention_impl(attention_impl)  # rejects unknown values
    kw = dict(param_dtype=param_dtype, rngs=rngs)
    self.attention_impl = attention_impl
    self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
    self.rope_theta = c.rope_theta
    self.q_proj = layers.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=c.qkv_bias, **kw)
    self.k_proj = layers.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias,
                                **kw)
    self.v_proj = layers.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias,
                                **kw)
    self.o_proj = layers.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=c.o_bias, **kw)
    norm = lambda: layers.RMSNorm(c.head_dim, c.rms_norm_eps, param_dtype)
    self.q_norm = norm() if c.qk_norm else None
    self.k_norm = norm() if c.qk_norm else None

  def __call__(self, x: jax.Array, positions: jax.Array, cache: layers.KVCache,
               mask: jax.Array, cache_index: jax.Array, input_norm: layers.RMSNorm
               ) -> tuple[jax.Array, layers.KVCache]:
    """`x [B, L, D]` (the residual stream, normalised here by the layer's `input_norm`)
    -> `(out, cache)`: `out [B, L, D]`, or, for one new token through the
    decode-attention kernel without an output bias, the output projection's float32
    split-K partials `[P, B, 1, D]` (for `residual_norm`)."""
    b, l, _ = x.shape
    inv_freq = layers.rope_inv_freq(self.head_dim, self.rope_theta)
    if self.q_norm is None:
      norms, eps = (None, None), 0.0  # eps unused without q/k norm
    else:
      norms, eps = (self.q_norm.weight[...], self.k_norm.weight[...]), self.q_norm.eps
    scale = self.head_dim ** -0.5
    impl = layers.resolve_attention_impl(self.attention_impl)
    if impl != "xla" and l == 1:  # one new token: the fused kernel
      qkv, projection = self._decode_qkv(x[:, 0], input_norm)
      out, k_cache, v_cache = attention_api.decode_attention(
          qkv, cache.k, cache.v, mask[:, 0], cache_index, positions[:, 0], inv_freq,
          *norms, eps=eps, scale=scale, implementation=impl, **projection)
      cache = layers.KVCache(k_cache, v_cache)
      if self.o_proj.bias is None:  # the residual_norm kernel sums the partials
        return layers.projection_partials(out.reshape(b, -1), self.o_proj), cache
      out = out[:, None]
    else:
      x = input_norm(x)
      q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
      heads = lambda t: t.reshape(b, l, -1, self.head_dim)
      out, cache = layers.cached_attention(heads(q), heads(k), heads(v), cache, mask,
                                           cache_index, positions, inv_freq, *norms,
                                           eps=eps, scale=scale)
    return self.o_proj(out.reshape(b, l, -1)), cache

  def _decode_qkv(self, x: jax.Array, input_norm: layers.RMSNorm
                  ) -> tuple[jax.Array, dict[str, Any]]:
    """The decode-attention kernel's `qkv` for one new token per sequence, the
    residual stream `x [B, dim]`, and the op's arguments that say what it holds.

    XLA merges the three projection dots into one; the kernel takes that dot's float32
    split-K partials `[P, B, H + 2 * Hkv, D]` and sums them as it loads them (no
    reduction kernel in between). The input RMSNorm is folded past the dot: the dot
    reads `x * weight` and the kernel divides by `rms(x)`, then adds the biases
    (Qwen2).
    """
    projections = (self.q_proj, self.k_proj, self.v_proj)
    heads = (x.shape[0], self.num_heads + 2 * self.num_kv_heads, self.head_dim)
    scaled = folded_norm_weight(x, input_norm.weight[...])
    weights = [p.kernel[...].astype(x.dtype) for p in projections]
    splits = split_k_count(x.shape[-1], sum(w.shape[1] for w in weights))
    qkv = jnp.concatenate([split_k_dot(*mixed_dot_operands(scaled, w), splits)
                           for w in weights], axis=-1)
    bias = None
    if self.q_proj.bias is not None:  # three arrays: no concatenation in every step
      bias = tuple(p.bias[...].reshape(-1, self.head_dim) for p in projections)
    return qkv.reshape(-1, *heads), dict(activation_dtype=x.dtype, folded_norm_x=x,
                                         folded_norm_eps=input_norm.eps, qkv_bias=bias)


class DecoderLayer(nnx.Module):
  """Pre-norm attention and MLP (MoE block plus optional gated shared expert, or dense)."""

  def __init__(self, c: QwenMoeConfig, layer: int, *, reroute: RerouteConfig, impl: str,
               param_dtype, rngs: nnx.Rngs, attention_impl: str = "auto"):
    kw = dict(param_dtype=param_dtype, rngs=rngs)
    self.input_norm = layers.RMSNorm(c.hidden_size, c.rms_norm_eps, param_dtype)
    self.attn = Attention(c, attention_impl=attention_impl, **kw)
    self.post_attn_norm = layers.RMSNorm(c.hidden_size, c.rms_norm_eps, param_dtype)
    moe = c.is_moe_layer(layer)
    self.mlp = (MoeBlock(c.hidden_size, c.moe_intermediate_size, c.num_experts, c.top_k,
                         reroute=reroute, normalize=c.norm_topk_prob, impl=impl, **kw)
                if moe else layers.SwiGLU(c.hidden_size, c.intermediate_size, **kw))
    shared = moe and c.shared_expert_size > 0
    self.shared_expert = (layers.SwiGLU(c.hidden_size, c.shared_expert_size, **kw)
                          if shared else None)
    self.shared_expert_gate = layers.Linear(c.hidden_size, 1, **kw) if shared else None

  def __call__(self, x: jax.Array, positions: jax.Array, token_valid: jax.Array,
               cache: layers.KVCache, mask: jax.Array, cache_index: jax.Array, *,
               decode: bool) -> tuple[jax.Array, layers.KVCache, RerouteStats | None]:
    """`x [B, L, D]` -> `(x, cache, stats)`; `stats` is None on dense layers."""
    h, cache = self.attn(x, positions, cache, mask, cache_index, self.input_norm)
    x, h = layers.add_and_norm(
        x, h, self.post_attn_norm,
        implementation=layers.resolve_attention_impl(self.attn.attention_impl))
    if not isinstance(self.mlp, MoeBlock):
      return x + self.mlp(h), cache, None
    y, stats = self.mlp(h, token_valid, decode=decode)
    if self.shared_expert is not None:
      y = y + jax.nn.sigmoid(self.shared_expert_gate(h)) * self.shared_expert(h)
    return x + y, cache, stats


class QwenMoeForCausalLM(nnx.Module):
  """Qwen2-MoE / Qwen3-MoE causal LM with the `models/base.py` interface."""

  def __init__(self, config: QwenMoeConfig, *, reroute: RerouteConfig = NO_REROUTE,
               impl: str = "auto", attention_impl: str = "auto", param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    c = self.config = config
    self.embed = nnx.Param(nnx.initializers.normal(stddev=1.0)(
        rngs.params(), (c.vocab_size, c.hidden_size), param_dtype))
    self.layers = nnx.List([
        DecoderLayer(c, i, reroute=reroute, impl=impl, attention_impl=attention_impl,
                     param_dtype=param_dtype, rngs=rngs)
        for i in range(c.num_layers)])
    self.norm = layers.RMSNorm(c.hidden_size, c.rms_norm_eps, param_dtype)
    self.lm_head = (None if c.tie_word_embeddings else
                    layers.Linear(c.hidden_size, c.vocab_size, param_dtype=param_dtype,
                                  rngs=rngs))

  def init_cache(self, batch: int, length: int, dtype=jnp.float32) -> list[layers.KVCache]:
    c = self.config
    return [layers.KVCache.zeros(batch, length, c.num_kv_heads, c.head_dim, c.head_dim, dtype)
            for _ in range(c.num_layers)]

  def __call__(self, tokens: jax.Array, positions: jax.Array, token_valid: jax.Array,
               cache: list[layers.KVCache], cache_valid: jax.Array, cache_index: jax.Array,
               *, decode: bool = False, last_only: bool = False) -> base.ForwardOutput:
    x = jnp.take(self.embed[...], tokens, axis=0)
    mask = layers.attention_mask(cache_valid, cache_index, tokens.shape[1])
    new_cache, stats = [], []
    for layer, layer_cache in zip(self.layers, cache):
      x, layer_cache, layer_stats = layer(x, positions, token_valid, layer_cache, mask,
                                          cache_index, decode=decode)
      new_cache.append(layer_cache)
      if layer_stats is not None:
        stats.append(layer_stats)
    if last_only:  # the LM head on the last position only: [B, 1, V] logits
      x = x[:, -1:]
    head = self.embed[...].T if self.lm_head is None else self.lm_head.kernel[...]
    x, head = mixed_dot_operands(self.norm(x).astype(head.dtype), head)
    logits = gemm_dot(x, head, preferred_element_type=jnp.float32)
    return base.ForwardOutput(logits, new_cache, tuple(stats))


def load_hf(directory: str, *, param_dtype=jnp.float32, reroute: RerouteConfig = NO_REROUTE,
            impl: str = "auto") -> QwenMoeForCausalLM:
  """Builds a model from a Hugging Face checkpoint directory (safetensors).

  Raises KeyError / ValueError naming any missing, mis-shaped or unexpected tensor.
  """
  config = QwenMoeConfig.from_hf(hf_import.read_config(directory))
  model = nnx.eval_shape(lambda: QwenMoeForCausalLM(
      config, reroute=reroute, impl=impl, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
  reader = hf_import.CheckpointReader(directory)
  load = hf_import.WeightLoader(reader, param_dtype)
  load.tensor(model.embed, "model.embed_tokens.weight")
  for i, layer in enumerate(model.layers):
    name = f"model.layers.{i}"
    load.norm(layer.input_norm, f"{name}.input_layernorm")
    load.norm(layer.post_attn_norm, f"{name}.post_attention_layernorm")
    attn = layer.attn
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
      load.linear(getattr(attn, proj), f"{name}.self_attn.{proj}")
    if attn.q_norm is not None:
      load.norm(attn.q_norm, f"{name}.self_attn.q_norm")
      load.norm(attn.k_norm, f"{name}.self_attn.k_norm")
    if isinstance(layer.mlp, MoeBlock):
      load.moe(layer.mlp, f"{name}.mlp")
    else:
      load.swiglu(layer.mlp, f"{name}.mlp")
    if layer.shared_expert is not None:
      load.swiglu(layer.shared_expert, f"{name}.mlp.shared_expert")
      load.linear(layer.shared_expert_gate, f"{name}.mlp.shared_expert_gate")
  load.norm(model.norm, "model.norm")
  if model.lm_head is not None:
    load.linear(model.lm_head, "lm_head")
  ignore = ("rotary_emb.inv_freq",) + (("lm_head.weight",) if config.tie_word_embeddings
                                        else ())
  reader.check_all_taken(ignore=ignore)
  return model

"""The models of the decode benchmark: real configurations (`HF_CONFIGS`, written in
Hugging Face's names and mapped to ours by `from_hf`, so the transformers peer builds
the same network), the same architectures shrunk for CPU runs (`TINY`), each built with
random bf16 weights made on the device one parameter at a time and a synthetic
symmetric similarity per MoE layer (uniform in [0, 1), diagonal 1) (`build_model`; its
shapes alone, allocating nothing: `abstract_model`), and the bytes of its parameters by
role (`byte_budget`), from which a decode step's roofline is computed.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from sere_jax import moe
from sere_jax.models import deepseek_v2
from sere_jax.models import qwen_moe

HF_CONFIGS: dict[str, dict[str, Any]] = {
    # Qwen/Qwen3-30B-A3B config.json
    "qwen3_30b_a3b": dict(
        model_type="qwen3_moe", vocab_size=151936, hidden_size=2048,
        intermediate_size=6144, num_hidden_layers=48, num_attention_heads=32,
        num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
        moe_intermediate_size=768, norm_topk_prob=True, rms_norm_eps=1e-6,
        rope_theta=1000000.0, rope_scaling=None, max_position_embeddings=40960,
        tie_word_embeddings=False, attention_bias=False, decoder_sparse_step=1,
        mlp_only_layers=[], hidden_act="silu", use_sliding_window=False),
    # Qwen/Qwen1.5-MoE-A2.7B config.json (q/k/v biases, sigmoid-gated shared expert)
    "qwen15_moe_a27b": dict(
        model_type="qwen2_moe", vocab_size=151936, hidden_size=2048,
        intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
        num_key_value_heads=16, num_experts=60, num_experts_per_tok=4,
        moe_intermediate_size=1408, shared_expert_intermediate_size=5632,
        norm_topk_prob=False, rms_norm_eps=1e-6, rope_theta=1000000.0, rope_scaling=None,
        max_position_embeddings=8192, tie_word_embeddings=False, decoder_sparse_step=1,
        mlp_only_layers=[], hidden_act="silu", use_sliding_window=False),
    # deepseek-ai/DeepSeek-V2-Lite config.json (MLA without q LoRA, YaRN x40)
    "deepseek_v2_lite": dict(
        model_type="deepseek_v2", vocab_size=102400, hidden_size=2048,
        intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=27,
        num_attention_heads=16, num_key_value_heads=16, kv_lora_rank=512,
        q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=2,
        first_k_dense_replace=1, moe_layer_freq=1, routed_scaling_factor=1.0,
        norm_topk_prob=False, topk_method="greedy", n_group=1, topk_group=1,
        scoring_func="softmax", rms_norm_eps=1e-6, max_position_embeddings=163840,
        rope_theta=10000.0,
        rope_scaling=dict(type="yarn", factor=40, original_max_position_embeddings=4096,
                          beta_fast=32, beta_slow=1, mscale=0.707, mscale_all_dim=0.707),
        tie_word_embeddings=False, attention_bias=False, hidden_act="silu"),
}

# The same architectures shrunk so that one CPU case takes about a second.
TINY: dict[str, dict[str, Any]] = {
    "qwen3_30b_a3b": dict(vocab_size=512, hidden_size=64, intermediate_size=128,
                          num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, num_experts=32,
                          moe_intermediate_size=32),
    "qwen15_moe_a27b": dict(vocab_size=512, hidden_size=64, intermediate_size=128,
                            num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=4, num_experts=16,
                            moe_intermediate_size=32, shared_expert_intermediate_size=64),
    "deepseek_v2_lite": dict(vocab_size=512, hidden_size=64, intermediate_size=128,
                             moe_intermediate_size=32, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=4,
                             kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                             v_head_dim=16, n_routed_experts=24),
}
MODELS = tuple(HF_CONFIGS)


def hf_config(model: str, scale: str) -> dict[str, Any]:
  """The Hugging Face config dict of `model` at `scale` ("full" or "tiny")."""
  if model not in HF_CONFIGS:
    raise ValueError(f"unknown model {model!r}; expected one of {MODELS}")
  config = copy.deepcopy(HF_CONFIGS[model])
  if scale == "tiny":
    config.update(TINY[model])
  elif scale not in ("full", "qwen3_30b"):
    raise ValueError(f"unknown scale {scale!r}")
  return config


def abstract_model(model: str, scale: str, impl: str = "auto", attention_impl: str = "auto"
                   ) -> tuple[nnx.Module, Any, dict[str, Any]]:
  """`build_model`'s model with shapes and dtypes only (`nnx.eval_shape`: nothing is
  allocated); `(model, our config, Hugging Face config dict)`."""
  hf = hf_config(model, scale)
  options = dict(impl=impl, attention_impl=attention_impl, param_dtype=jnp.bfloat16)
  if hf["model_type"] == "deepseek_v2":
    config, cls = deepseek_v2.DeepseekV2Config.from_hf(hf), deepseek_v2.DeepseekV2ForCausalLM
  else:
    config, cls = qwen_moe.QwenMoeConfig.from_hf(hf), qwen_moe.QwenMoeForCausalLM
  return nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0), **options)), config, hf


def build_model(model: str, scale: str, impl: str, seed: int = 0,
                attention_impl: str = "auto") -> tuple[nnx.Module, Any, dict[str, Any]]:
  """The model with random bf16 weights and synthetic similarities, made on the device.

  `attention_impl` (`layers.ATTENTION_IMPLS`): the backend of a decode step's
  attention and residual-norm kernels (the Qwen models' decode attention, DeepSeek-V2's
  latent attention), or `xla` for the unfused path. Returns
  `(model, our config, Hugging Face config dict)`.
  """
  net, config, hf = abstract_model(model, scale, impl, attention_impl)

  @functools.partial(jax.jit, static_argnums=(2, 3))
  def _normal(key, std, shape, dtype):  # one parameter at a time, straight in its dtype
    return jax.random.normal(key, shape, dtype) * std.astype(dtype)

  def normal(key, std, like):
    return _normal(key, std, tuple(like.shape), jnp.dtype(like.dtype))

  def similarity(key, experts):
    sim = jax.random.uniform(key, (experts, experts), jnp.float32)
    sim = (sim + sim.T) / 2
    return jnp.where(jnp.eye(experts, dtype=bool), 1.0, sim)

  key = jax.random.PRNGKey(seed)
  for i, (path, var) in enumerate(
      [(p, v) for p, v in nnx.iter_graph(net) if isinstance(v, nnx.Variable)]):
    like = var.get_value()
    k = jax.random.fold_in(key, i)
    name = path[-1]
    if isinstance(var, moe.ExpertSimilarity):
      value = similarity(k, like.shape[0])
    elif name == "weight" and len(like.shape) == 1:  # RMSNorm scales
      value = jnp.ones(like.shape, like.dtype)
    elif name == "bias":
      value = normal(k, jnp.float32(0.02), jax.ShapeDtypeStruct(like.shape, like.dtype))
    elif name in ("embed", "embed_tokens"):
      value = normal(k, jnp.float32(0.02), jax.ShapeDtypeStruct(like.shape, like.dtype))
    else:  # kernels [.., in, out]: std 1/sqrt(in), as layers.linear_param
      value = normal(k, jnp.float32(like.shape[-2] ** -0.5),
                     jax.ShapeDtypeStruct(like.shape, like.dtype))
    var.set_value(value)
  jax.block_until_ready(jax.tree.leaves(nnx.state(net)))
  return net, config, hf


def byte_budget(net: nnx.Module) -> dict[str, Any]:
  """Bytes of the model's parameters by role (experts per layer kept apart)."""
  blocks = moe.moe_blocks(net)
  expert_bytes = [int(b.w_gate_up.get_value().nbytes + b.w_down.get_value().nbytes)
                  // b.num_experts for b in blocks]
  total = sum(int(v.get_value().nbytes) for _, v in nnx.iter_graph(net)
              if isinstance(v, nnx.Param))
  experts_total = sum(e * b.num_experts for e, b in zip(expert_bytes, blocks))
  embed = net.embed if hasattr(net, "embed") else net.embed_tokens
  embed_bytes = int(embed.get_value().nbytes)
  tied = getattr(net, "lm_head", None) is None
  # Every non-expert parameter is read once per step; the embedding table only for
  # the B rows looked up (unless it is also the LM head).
  dense = total - experts_total - (0 if tied else embed_bytes)
  similarity = sum(int(b.similarity.get_value().nbytes) for b in blocks)
  count = sum(int(v.get_value().size) for _, v in nnx.iter_graph(net)
              if isinstance(v, nnx.Param))
  return dict(param_bytes=total, param_count=count, expert_bytes_per_layer=expert_bytes,
              dense_bytes=dense, embed_row_bytes=embed_bytes // embed.get_value().shape[0],
              similarity_bytes=similarity, routed_expert_bytes=experts_total)


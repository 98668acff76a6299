"""Models with NumPy-random weights for the tests (jax.random init compiles per shape,
which is slow on CPU)."""

from __future__ import annotations

from flax import nnx
import jax.numpy as jnp
import numpy as np

from sere_jax.models import qwen_moe


def random_qwen(hf: dict, seed: int = 0, **options) -> qwen_moe.QwenMoeForCausalLM:
  """A Qwen MoE model of HF config `hf` (MoE impl `xla_dense` unless `options` say
  otherwise); the same `seed` gives the same weights whatever the options."""
  config = qwen_moe.QwenMoeConfig.from_hf(hf)
  options = {"impl": "xla_dense", **options}
  model = nnx.eval_shape(lambda: qwen_moe.QwenMoeForCausalLM(
      config, rngs=nnx.Rngs(0), **options))
  rng = np.random.default_rng(seed)
  for _, var in nnx.iter_graph(model):
    if isinstance(var, nnx.Variable):
      var.set_value(jnp.asarray(rng.normal(0.0, 0.3, var.shape), var.dtype))
  return model


# Tiny Hugging Face configs of the two Qwen architectures.
HF_QWEN2 = dict(
    model_type="qwen2_moe", vocab_size=40, hidden_size=16, intermediate_size=24,
    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, num_experts=6,
    num_experts_per_tok=2, moe_intermediate_size=8, shared_expert_intermediate_size=12,
    hidden_act="silu", rms_norm_eps=1e-6, rope_theta=10000.0, mlp_only_layers=[1],
    decoder_sparse_step=1, use_sliding_window=False, tie_word_embeddings=False)
HF_QWEN3 = dict(
    model_type="qwen3_moe", vocab_size=40, hidden_size=16, intermediate_size=24,
    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=6,
    num_local_experts=6, num_experts_per_tok=3, moe_intermediate_size=8, hidden_act="silu",
    rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
    norm_topk_prob=True, decoder_sparse_step=2, mlp_only_layers=[], tie_word_embeddings=True,
    attention_bias=False)

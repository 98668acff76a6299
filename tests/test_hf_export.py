"""Export to the Hugging Face layout and import back: the same model."""

import json

from flax import nnx
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from sere_jax.models import hf_export
from sere_jax.models.qwen_moe import QwenMoeConfig, QwenMoeForCausalLM, load_hf

CONFIG = QwenMoeConfig(
    architecture="qwen3_moe", vocab_size=48, hidden_size=16, intermediate_size=32,
    num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8, num_experts=4, top_k=2,
    moe_intermediate_size=8, norm_topk_prob=True, qk_norm=True, tie_word_embeddings=True,
    mlp_only_layers=(0,), max_position_embeddings=64)


def _logits(model, tokens):
  length = tokens.shape[1]
  positions = jnp.broadcast_to(jnp.arange(length), tokens.shape)
  valid = jnp.ones(tokens.shape, bool)
  cache = model.init_cache(tokens.shape[0], length)
  return model(tokens, positions, valid, cache, valid, jnp.int32(0)).logits


@pytest.mark.parametrize("dtype, max_shard", [(np.float32, 1 << 30), (ml_dtypes.bfloat16, 4096)])
def test_round_trip(tmp_path, dtype, max_shard):
  model = QwenMoeForCausalLM(CONFIG, impl="xla_dense", attention_impl="xla",
                             rngs=nnx.Rngs(3))
  out = tmp_path / "m"
  hf_export.save_qwen(model, str(out), dtype=dtype, max_shard_bytes=max_shard)
  files = sorted(p.name for p in out.iterdir())
  if max_shard < 1 << 20:
    assert "model.safetensors.index.json" in files
    assert all(p.stat().st_size <= max_shard + 2048 for p in out.glob("*.safetensors"))
  assert json.loads((out / "config.json").read_text())["model_type"] == "qwen3_moe"
  back = load_hf(str(out), impl="xla_dense")
  assert back.config == model.config
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 48, (2, 5)), jnp.int32)
  tol = 1e-6 if dtype == np.float32 else 0.1
  np.testing.assert_allclose(np.asarray(_logits(back, tokens)),
                             np.asarray(_logits(model, tokens)), atol=tol, rtol=tol)


def test_refuses_existing_directory(tmp_path):
  model = QwenMoeForCausalLM(CONFIG, impl="xla_dense", rngs=nnx.Rngs(0))
  with pytest.raises(FileExistsError, match="exists"):
    hf_export.save_qwen(model, str(tmp_path))

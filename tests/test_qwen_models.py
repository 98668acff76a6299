"""Qwen2-MoE / Qwen3-MoE: config mapping, shapes, HF import errors, parity with HF."""

from __future__ import annotations

import dataclasses
import json
import os

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from sere_jax.models import hf_import
from sere_jax.models import qwen_moe
from sere_jax.moe import MoeBlock, moe_blocks
from tests.random_models import HF_QWEN2, HF_QWEN3, random_qwen

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "parity")
_forward = nnx.jit(lambda model, *args, decode: model(*args, decode=decode),
                   static_argnames="decode")


def _hf_tensors(model: qwen_moe.QwenMoeForCausalLM) -> dict[str, np.ndarray]:
  """The model's weights under Hugging Face names and layouts (the inverse of load_hf)."""
  out = {}

  def put(name, array):
    out[name] = np.ascontiguousarray(np.asarray(array))

  def linear(m, name):
    put(f"{name}.weight", m.kernel[...].T)
    if m.bias is not None:
      put(f"{name}.bias", m.bias[...])

  def swiglu(m, name):
    for part, hf_part in ((m.gate, "gate_proj"), (m.up, "up_proj"), (m.down, "down_proj")):
      linear(part, f"{name}.{hf_part}")

  put("model.embed_tokens.weight", model.embed[...])
  put("model.norm.weight", model.norm.weight[...])
  if model.lm_head is not None:
    linear(model.lm_head, "lm_head")
  for i, layer in enumerate(model.layers):
    name = f"model.layers.{i}"
    put(f"{name}.input_layernorm.weight", layer.input_norm.weight[...])
    put(f"{name}.post_attention_layernorm.weight", layer.post_attn_norm.weight[...])
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
      linear(getattr(layer.attn, proj), f"{name}.self_attn.{proj}")
    if layer.attn.q_norm is not None:
      put(f"{name}.self_attn.q_norm.weight", layer.attn.q_norm.weight[...])
      put(f"{name}.self_attn.k_norm.weight", layer.attn.k_norm.weight[...])
    if not isinstance(layer.mlp, MoeBlock):
      swiglu(layer.mlp, f"{name}.mlp")
      continue
    block = layer.mlp
    f = block.w_down.shape[1]
    put(f"{name}.mlp.gate.weight", block.router_kernel[...].T)
    for j in range(block.num_experts):
      w = np.asarray(block.w_gate_up[j])
      put(f"{name}.mlp.experts.{j}.gate_proj.weight", w[:, :f].T)
      put(f"{name}.mlp.experts.{j}.up_proj.weight", w[:, f:].T)
      put(f"{name}.mlp.experts.{j}.down_proj.weight", np.asarray(block.w_down[j]).T)
    if layer.shared_expert is not None:
      swiglu(layer.shared_expert, f"{name}.mlp.shared_expert")
      linear(layer.shared_expert_gate, f"{name}.mlp.shared_expert_gate")
  return out


def _write_checkpoint(directory, hf: dict, tensors: dict[str, np.ndarray]) -> str:
  with open(os.path.join(directory, "config.json"), "w") as fh:
    json.dump(hf, fh)
  save_file(tensors, os.path.join(directory, "model.safetensors"))
  return str(directory)


def _prefill(model, ids, mask, positions, extra: int):
  """One masked forward over left-padded `ids`, with a cache `extra` slots longer."""
  b, l = ids.shape
  cache_valid = np.zeros((b, l + extra), bool)
  cache_valid[:, :l] = mask
  out = _forward(model, jnp.asarray(ids), jnp.asarray(positions), jnp.asarray(mask),
                 model.init_cache(b, l + extra), jnp.asarray(cache_valid), jnp.int32(0),
                 decode=False)
  return out, cache_valid


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("hf", [HF_QWEN2, HF_QWEN3], ids=["qwen2", "qwen3"])
def test_config_round_trips_through_json(hf):
  config = qwen_moe.QwenMoeConfig.from_hf(hf)
  assert qwen_moe.QwenMoeConfig(**json.loads(json.dumps(dataclasses.asdict(config)))) == config


def test_config_maps_architecture_options():
  q2 = qwen_moe.QwenMoeConfig.from_hf(HF_QWEN2)
  assert (q2.architecture, q2.qkv_bias, q2.qk_norm, q2.norm_topk_prob) == (
      "qwen2_moe", True, False, False)
  assert (q2.shared_expert_size, q2.head_dim, q2.rope_theta) == (12, 4, 10000.0)
  assert [q2.is_moe_layer(i) for i in range(3)] == [True, False, True]
  q3 = qwen_moe.QwenMoeConfig.from_hf(HF_QWEN3)
  assert (q3.architecture, q3.qkv_bias, q3.qk_norm, q3.norm_topk_prob) == (
      "qwen3_moe", False, True, True)
  assert (q3.shared_expert_size, q3.num_experts, q3.head_dim, q3.rope_theta) == (
      0, 6, 6, 1e6)
  assert q3.tie_word_embeddings
  assert [q3.is_moe_layer(i) for i in range(4)] == [False, True, False, True]


@pytest.mark.parametrize("change, message", [
    (dict(model_type="llama"), "model_type"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(rope_scaling={"type": "yarn", "factor": 4.0}), "rope_scaling"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0}), "rope_parameters"),
    (dict(use_sliding_window=True), "use_sliding_window"),
    (dict(layer_types=["full_attention", "sliding_attention", "full_attention"]),
     "layer_types"),
])
def test_config_rejects_unsupported(change, message):
  with pytest.raises(ValueError, match=message):
    qwen_moe.QwenMoeConfig.from_hf({**HF_QWEN2, **change})


def test_config_names_missing_key():
  hf = {k: v for k, v in HF_QWEN2.items() if k != "shared_expert_intermediate_size"}
  with pytest.raises(ValueError, match="shared_expert_intermediate_size"):
    qwen_moe.QwenMoeConfig.from_hf(hf)


# ---------------------------------------------------------------- model


@pytest.mark.parametrize("hf, moe_layers", [(HF_QWEN2, 2), (HF_QWEN3, 2)],
                         ids=["qwen2", "qwen3"])
def test_forward_shapes(hf, moe_layers):
  model = random_qwen(hf)
  c = model.config
  ids = np.array([[0, 3, 4, 5], [6, 7, 8, 9]])
  mask = np.array([[0, 1, 1, 1], [1, 1, 1, 1]], bool)
  out, _ = _prefill(model, ids, mask, np.maximum(mask.cumsum(-1) - 1, 0), extra=2)
  assert out.logits.shape == (2, 4, c.vocab_size) and out.logits.dtype == jnp.float32
  assert len(out.cache) == c.num_layers
  assert out.cache[0].k.shape == (2, 6, c.num_kv_heads, c.head_dim)
  assert len(out.stats) == moe_layers
  assert np.all(np.isfinite(np.asarray(out.logits)[mask]))
  assert (model.lm_head is None) == c.tie_word_embeddings


# ---------------------------------------------------------------- HF import


@pytest.mark.parametrize("hf", [HF_QWEN2, HF_QWEN3], ids=["qwen2", "qwen3"])
def test_load_hf_round_trip(tmp_path, hf):
  model = random_qwen(hf, seed=3)
  tensors = _hf_tensors(model)
  tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(2, np.float32)
  loaded = qwen_moe.load_hf(_write_checkpoint(tmp_path, hf, tensors), impl="xla_dense")
  assert loaded.config == model.config
  jax.tree.map(np.testing.assert_array_equal, nnx.state(loaded, nnx.Param),
               nnx.state(model, nnx.Param))
  assert np.all(np.isnan(np.asarray(moe_blocks(loaded)[0].similarity[...])))


def test_load_hf_names_missing_tensor(tmp_path):
  tensors = _hf_tensors(random_qwen(HF_QWEN2))
  del tensors["model.layers.2.mlp.experts.4.up_proj.weight"]
  with pytest.raises(KeyError, match=r"model\.layers\.2\.mlp\.experts\.4\.up_proj\.weight"):
    qwen_moe.load_hf(_write_checkpoint(tmp_path, HF_QWEN2, tensors))


def test_load_hf_names_misshaped_tensor(tmp_path):
  tensors = _hf_tensors(random_qwen(HF_QWEN2))
  tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((16, 16), np.float32)
  with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight"):
    qwen_moe.load_hf(_write_checkpoint(tmp_path, HF_QWEN2, tensors))


def test_load_hf_rejects_unexpected_tensor(tmp_path):
  tensors = _hf_tensors(random_qwen(HF_QWEN2))
  tensors["model.layers.1.mlp.shared_expert_gate.weight"] = np.zeros((1, 16), np.float32)
  with pytest.raises(ValueError, match=r"unexpected tensors.*layers\.1\.mlp\.shared_expert"):
    qwen_moe.load_hf(_write_checkpoint(tmp_path, HF_QWEN2, tensors))


def test_load_tokenizer(tmp_path):
  assert hf_import.load_tokenizer(str(tmp_path)) is None
  tokenizers = pytest.importorskip("tokenizers")
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "[UNK]": 1}, "[UNK]"))
  tok.save(os.path.join(tmp_path, "tokenizer.json"))
  assert hf_import.load_tokenizer(str(tmp_path)).token_to_id("a") == 0


# ---------------------------------------------------------------- parity with HF


@pytest.mark.parametrize("name", ["qwen2_moe", "qwen3_moe"])
def test_parity_with_hugging_face(name):
  directory = os.path.join(FIXTURES, name)
  if not os.path.isfile(os.path.join(directory, "reference.safetensors")):
    pytest.skip(f"no parity fixture {directory}")
  ref = load_file(os.path.join(directory, "reference.safetensors"))
  with open(os.path.join(directory, "reference.json")) as fh:
    steps = json.load(fh)["new_tokens"]
  model = qwen_moe.load_hf(directory, impl="xla_dense")
  ids, mask = ref["input_ids"], ref["attention_mask"].astype(bool)
  want_ids, want_logits = ref["generated_ids"], ref["decode_logits"]
  tol = 1e-4 * np.abs(ref["prefill_logits"]).max()

  out, cache_valid = _prefill(model, ids, mask, ref["position_ids"], extra=steps)
  logits = np.asarray(out.logits)
  assert np.abs(logits - ref["prefill_logits"])[mask].max() <= tol

  b, l = ids.shape
  positions = mask.sum(-1)
  cache = out.cache
  for t in range(steps):
    token = logits[:, -1].argmax(-1)
    np.testing.assert_array_equal(token, want_ids[:, t])
    assert np.abs(logits[:, -1] - want_logits[:, t]).max() <= tol
    if t == steps - 1:
      break
    cache_valid[:, l + t] = True
    out = _forward(model, jnp.asarray(token[:, None]), jnp.asarray(positions[:, None] + t),
                   jnp.ones((b, 1), bool), cache, jnp.asarray(cache_valid), jnp.int32(l + t),
                   decode=True)
    logits, cache = np.asarray(out.logits), out.cache


def test_bfloat16_load_runs_close_to_reference():
  directory = os.path.join(FIXTURES, "qwen3_moe")
  if not os.path.isfile(os.path.join(directory, "reference.safetensors")):
    pytest.skip(f"no parity fixture {directory}")
  ref = load_file(os.path.join(directory, "reference.safetensors"))
  model = qwen_moe.load_hf(directory, param_dtype=jnp.bfloat16, impl="xla_dense")
  assert model.embed[...].dtype == jnp.bfloat16
  mask = ref["attention_mask"].astype(bool)
  out, _ = _prefill(model, ref["input_ids"], mask, ref["position_ids"], extra=0)
  assert out.logits.dtype == jnp.float32
  err = np.abs(np.asarray(out.logits) - ref["prefill_logits"])[mask].max()
  assert err <= 0.05 * np.abs(ref["prefill_logits"]).max()

"""DeepSeek-V2: config mapping, router rules, HF import errors, parity with HF."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from sere_jax.models import deepseek_v2 as ds
from sere_jax.models import hf_import
from tests import kernel_backends

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "parity")
PARITY_MODELS = ("deepseek_v2", "deepseek_v2_lite")
SMALL = dict(vocab_size=32, hidden_size=16, intermediate_size=24, moe_intermediate_size=8,
             num_hidden_layers=2, num_attention_heads=2, kv_lora_rank=8,
             qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4, n_routed_experts=16,
             num_experts_per_tok=4)


def _fixture(name: str) -> str:
  path = os.path.join(FIXTURES, name)
  if not os.path.isfile(os.path.join(path, "reference.safetensors")):
    pytest.skip(f"parity fixture {name} not generated")
  return path


# --- config -------------------------------------------------------------------------

@pytest.mark.parametrize("name", PARITY_MODELS)
def test_config_from_hf_round_trips_through_json(name):
  config = ds.DeepseekV2Config.from_hf(hf_import.read_config(_fixture(name)))
  assert config.rope_type == "yarn"
  rebuilt = ds.DeepseekV2Config(**json.loads(json.dumps(dataclasses.asdict(config))))
  assert rebuilt == config and hash(rebuilt) == hash(config)


def test_legacy_rope_scaling_maps_like_rope_parameters():
  yarn = dict(factor=40.0, beta_fast=32, beta_slow=1, mscale=0.707, mscale_all_dim=0.707,
              original_max_position_embeddings=4096)
  new = ds.DeepseekV2Config.from_hf(
      dict(SMALL, rope_parameters=dict(yarn, rope_type="yarn", rope_theta=1e4)))
  old = ds.DeepseekV2Config.from_hf(
      dict(SMALL, rope_theta=1e4, rope_scaling=dict(yarn, type="yarn")))
  assert new == old and new.rope_factor == 40.0


@pytest.mark.parametrize("key, value", [
    ("topk_method", "noaux_tc"), ("scoring_func", "sigmoid"), ("hidden_act", "gelu"),
    ("mlp_bias", True), ("num_key_value_heads", 1), ("n_routed_experts", None),
    ("rope_scaling", {"type": "dynamic", "factor": 2.0})])
def test_from_hf_rejects_unsupported_options(key, value):
  with pytest.raises(ValueError, match=key.split("_scaling")[0]):
    ds.DeepseekV2Config.from_hf(dict(SMALL, **{key: value}))


def test_config_validates_groups():
  with pytest.raises(ValueError, match="n_group"):
    ds.DeepseekV2Config(**SMALL, topk_method="group_limited_greedy", n_group=3, topk_group=1)


def test_yarn_frequencies_interpolate_low_frequencies():
  config = ds.DeepseekV2Config(**dict(SMALL, qk_rope_head_dim=16), rope_type="yarn",
                               rope_factor=8.0, rope_original_max_position_embeddings=64)
  inv_freq, _ = ds.rope_frequencies(config)
  plain, _ = ds.rope_frequencies(dataclasses.replace(config, rope_type="default"))
  np.testing.assert_allclose(inv_freq[0], plain[0])  # fast dims extrapolate
  np.testing.assert_allclose(inv_freq[-1], plain[-1] / 8.0, rtol=1e-6)  # slow interpolate


# --- router -------------------------------------------------------------------------

def _route(logits, **fields):
  config = ds.DeepseekV2Config(**SMALL, **fields)
  return [np.asarray(a) for a in ds.deepseek_router(config)(jnp.asarray(logits))]


def test_group_limited_greedy_picks_only_from_top_groups():
  logits = np.random.default_rng(0).normal(size=(64, 16)).astype(np.float32) * 3
  ids, weights, _ = _route(logits, topk_method="group_limited_greedy", n_group=4,
                           topk_group=2, routed_scaling_factor=2.5)
  probs = np.asarray(jax.nn.softmax(logits, axis=-1))
  top_groups = np.argsort(-probs.reshape(64, 4, 4).max(-1), axis=-1)[:, :2]
  for t in range(64):
    assert set(ids[t] // 4) <= set(top_groups[t])
    allowed = np.isin(np.arange(16) // 4, top_groups[t])
    best = np.sort(np.where(allowed, probs[t], -1.0))[::-1][:4]
    np.testing.assert_allclose(weights[t], 2.5 * best, rtol=1e-6)
  assert np.all(np.diff(weights, axis=1) <= 0)  # sorted by score


def test_greedy_router_matches_plain_top_k_and_normalises():
  logits = np.random.default_rng(1).normal(size=(32, 16)).astype(np.float32)
  probs = np.asarray(jax.nn.softmax(logits, axis=-1))
  ids, weights, scores = _route(logits, norm_topk_prob=True, routed_scaling_factor=3.0)
  np.testing.assert_array_equal(ids, np.argsort(-probs, axis=-1)[:, :4])
  np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(scores, probs, rtol=1e-6)


@pytest.mark.parametrize("method", ["greedy", "group_limited_greedy"])
def test_router_takes_split_k_partials_and_greedy_runs_the_top_k_kernel(method):
  """With the interpret MoE op, both routers take the router dot's split-K partials;
  greedy runs the fused top-K kernel (scaled weights as the XLA router's), and a MoE
  layer hands its router the partials."""
  fields = dict(topk_method=method, n_group=4, topk_group=2, routed_scaling_factor=2.5)
  config = ds.DeepseekV2Config(**SMALL, **fields)
  partials = jnp.asarray(np.random.default_rng(2).normal(size=(4, 32, 16)), jnp.float32)
  want = ds.deepseek_router(config, "xla_dense")(partials.sum(0))
  got = ds.deepseek_router(config, "interpret")(partials)
  np.testing.assert_array_equal(got[0], want[0])
  for g, w in zip(got[1:], want[1:]):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
  layer = ds.DecoderLayer(config, 1, reroute=ds.NO_REROUTE, impl="interpret",
                          param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  assert layer.mlp.router_sums_partials


# --- import errors ------------------------------------------------------------------

@pytest.fixture
def checkpoint_copy(tmp_path):
  """A writable copy of the small q-LoRA fixture: `(directory, tensors)`."""
  src = _fixture("deepseek_v2")
  shutil.copy(os.path.join(src, "config.json"), tmp_path)
  return str(tmp_path), load_file(os.path.join(src, "model.safetensors"))


def test_load_hf_fills_every_parameter(checkpoint_copy):
  directory, tensors = checkpoint_copy
  save_file(tensors, os.path.join(directory, "model.safetensors"))
  model = ds.load_hf(directory, impl="xla_dense")
  leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert all(isinstance(x, jax.Array) for x in leaves)
  attn, c = model.layers[1].self_attn, model.config
  kv_b = tensors["model.layers.1.self_attn.kv_b_proj.weight"].reshape(
      c.num_attention_heads, c.qk_nope_head_dim + c.v_head_dim, c.kv_lora_rank)
  k_half, v_half = np.split(kv_b, [c.qk_nope_head_dim], axis=1)
  np.testing.assert_array_equal(attn.k_b_proj.kernel[...],
                                k_half.reshape(-1, c.kv_lora_rank).T)
  np.testing.assert_array_equal(attn.v_b_proj.kernel[...],
                                v_half.reshape(-1, c.kv_lora_rank).T)
  np.testing.assert_array_equal(model.layers[2].mlp.w_down[...][3],
                                tensors["model.layers.2.mlp.experts.3.down_proj.weight"].T)


@pytest.mark.parametrize("edit, error, match", [
    ("missing", KeyError, "model.layers.2.mlp.experts.5.up_proj.weight"),
    ("misshaped", ValueError, "model.layers.1.self_attn.q_b_proj.weight"),
    ("unexpected", ValueError, "model.layers.0.mlp.extra.weight"),
])
def test_load_hf_names_bad_tensors(checkpoint_copy, edit, error, match):
  directory, tensors = checkpoint_copy
  if edit == "missing":
    del tensors[match]
  elif edit == "misshaped":
    tensors[match] = tensors[match][:-1]
  else:
    tensors[match] = np.zeros((2,), np.float32)
  save_file(tensors, os.path.join(directory, "model.safetensors"))
  with pytest.raises(error, match=match.replace(".", r"\.")):
    ds.load_hf(directory, impl="xla_dense")


# --- the latent cache ---------------------------------------------------------------

def test_unknown_attention_impl_is_named():
  with pytest.raises(ValueError, match="attention_impl must be one of"):
    ds.DeepseekV2ForCausalLM(ds.DeepseekV2Config(**SMALL), attention_impl="cuda",
                             rngs=nnx.Rngs(0))


def test_cache_holds_the_latent_and_the_shared_rotated_key():
  config = ds.DeepseekV2Config(**SMALL)
  model = ds.DeepseekV2ForCausalLM(config, rngs=nnx.Rngs(0))
  cache = model.init_cache(3, 7)
  assert len(cache) == config.num_hidden_layers
  assert cache[0].k.shape == (3, 7, 1, config.qk_rope_head_dim)
  assert cache[0].v.shape == (3, 7, 1, config.kv_lora_rank)


@pytest.mark.parametrize("attention_impl,kernel_batch", [
    ("xla", 1), ("interpret", 1), ("interpret", ds.LATENT_KERNEL_MIN_BATCH)])
def test_decode_steps_match_one_pass_over_the_sequence(attention_impl, kernel_batch,
                                                        monkeypatch):
  """A token decoded over the latent cache scores as it does in a full-length pass,
  with XLA's attention and residual add + norm, or with the residual_norm kernel fed
  the output projection's split-K partials and the latent-attention kernel (batch 2
  runs it when it is the smallest batch that does, XLA's dots when it is not)."""
  monkeypatch.setattr(ds, "LATENT_KERNEL_MIN_BATCH", kernel_batch)
  config = ds.DeepseekV2Config(**SMALL)
  model = ds.DeepseekV2ForCausalLM(config, impl="xla_dense", attention_impl=attention_impl,
                                   rngs=nnx.Rngs(1))
  batch, length, prompt = 2, 6, 4
  tokens = jax.random.randint(jax.random.key(2), (batch, length), 0, config.vocab_size)
  positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
  valid = jnp.ones((batch, length), bool)
  whole = _forward(model, tokens, positions, valid, model.init_cache(batch, length), valid,
                   jnp.int32(0), decode=False).logits
  cache_valid = valid.at[:, prompt:].set(False)
  out = _forward(model, tokens[:, :prompt], positions[:, :prompt], valid[:, :prompt],
                 model.init_cache(batch, length), cache_valid, jnp.int32(0), decode=False)
  cache = out.cache
  for t in range(prompt, length):
    cache_valid = cache_valid.at[:, t].set(True)
    out = _forward(model, tokens[:, t:t + 1], positions[:, t:t + 1], valid[:, t:t + 1],
                   cache, cache_valid, jnp.int32(t), decode=True)
    cache = out.cache
    np.testing.assert_allclose(out.logits[:, 0], whole[:, t],
                               **kernel_backends.f32_tolerance(rtol=1e-4, atol=1e-5))


# --- parity with Hugging Face -------------------------------------------------------

@nnx.jit(static_argnames="decode")
def _forward(model, tokens, positions, token_valid, cache, cache_valid, cache_index, *,
             decode):
  return model(tokens, positions, token_valid, cache, cache_valid, cache_index,
               decode=decode)


def _assert_close(logits, ref, what):
  diff = float(np.max(np.abs(np.asarray(logits) - ref)))
  assert diff <= 1e-4 * float(np.max(np.abs(ref))), f"{what}: max abs diff {diff}"


@pytest.mark.parametrize("name", PARITY_MODELS)
def test_parity_with_hugging_face(name):
  directory = _fixture(name)
  ref = load_file(os.path.join(directory, "reference.safetensors"))
  model = ds.load_hf(directory, impl="xla_dense")
  mask = ref["attention_mask"].astype(bool)
  batch, prompt_len = mask.shape
  steps = ref["generated_ids"].shape[1]
  cache_valid = np.zeros((batch, prompt_len + steps - 1), bool)
  cache_valid[:, :prompt_len] = mask
  out = _forward(model, jnp.asarray(ref["input_ids"]), jnp.asarray(ref["position_ids"]),
                 jnp.asarray(mask), model.init_cache(batch, cache_valid.shape[1]),
                 jnp.asarray(cache_valid), jnp.int32(0), decode=False)
  _assert_close(np.asarray(out.logits)[mask], ref["prefill_logits"][mask], "prefill")

  logits, cache = np.asarray(out.logits)[:, -1], out.cache
  positions = ref["position_ids"][:, -1]
  for t in range(steps):
    _assert_close(logits, ref["decode_logits"][:, t], f"decode step {t}")
    token = logits.argmax(-1)
    np.testing.assert_array_equal(token, ref["generated_ids"][:, t])
    if t == steps - 1:
      break
    slot = prompt_len + t
    cache_valid[:, slot] = True
    positions = positions + 1
    out = _forward(model, jnp.asarray(token[:, None]), jnp.asarray(positions[:, None]),
                   jnp.ones((batch, 1), bool), cache, jnp.asarray(cache_valid),
                   jnp.int32(slot), decode=True)
    logits, cache = np.asarray(out.logits)[:, 0], out.cache

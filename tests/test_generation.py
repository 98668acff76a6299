"""Tests of batched generation (sere_jax.generation) and checkpoints (sere_jax.checkpoint).

They run on a tiny MoE language model defined here, which follows models/base.py.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sere_jax.models import base
from sere_jax.models import layers
from sere_jax import checkpoint
from sere_jax import generation
from sere_jax import moe
from sere_jax.config import RerouteConfig
from sere_jax.generation import SamplingConfig

# --------------------------------------------------------------------------- tiny model


@dataclasses.dataclass(frozen=True)
class TinyConfig:
  architecture: str = "tiny_test_lm"
  vocab_size: int = 61
  dim: int = 32
  heads: int = 4
  kv_heads: int = 2
  head_dim: int = 8
  ffn_dim: int = 24
  num_layers: int = 2
  num_experts: int = 16
  top_k: int = 4
  max_position_embeddings: int = 64
  rope_theta: float = 10000.0
  layer_kinds: tuple[str, ...] = ("moe", "moe")


class TinyLayer(nnx.Module):

  def __init__(self, c: TinyConfig, *, reroute, impl, param_dtype, rngs):
    self.c = c
    self.attn_norm = layers.RMSNorm(c.dim, param_dtype=param_dtype)
    self.q = layers.Linear(c.dim, c.heads * c.head_dim, param_dtype=param_dtype, rngs=rngs)
    self.k = layers.Linear(c.dim, c.kv_heads * c.head_dim, param_dtype=param_dtype, rngs=rngs)
    self.v = layers.Linear(c.dim, c.kv_heads * c.head_dim, param_dtype=param_dtype, rngs=rngs)
    self.o = layers.Linear(c.heads * c.head_dim, c.dim, param_dtype=param_dtype, rngs=rngs)
    self.mlp_norm = layers.RMSNorm(c.dim, param_dtype=param_dtype)
    self.moe = moe.MoeBlock(c.dim, c.ffn_dim, c.num_experts, c.top_k, reroute=reroute,
                            normalize=True, impl=impl, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x, positions, token_valid, cache, cache_valid, cache_index, decode):
    c = self.c
    b, l, _ = x.shape
    h = self.attn_norm(x)
    inv_freq = layers.rope_inv_freq(c.head_dim, c.rope_theta)
    q = layers.apply_rope(self.q(h).reshape(b, l, c.heads, c.head_dim), positions, inv_freq)
    k = layers.apply_rope(self.k(h).reshape(b, l, c.kv_heads, c.head_dim), positions,
                          inv_freq)
    v = self.v(h).reshape(b, l, c.kv_heads, c.head_dim)
    cache = cache.update(k, v, cache_index)
    mask = layers.attention_mask(cache_valid, cache_index, l)
    att = layers.attend(q, cache.k, cache.v, mask, c.head_dim ** -0.5)
    x = x + self.o(att.reshape(b, l, -1))
    y, stats = self.moe(self.mlp_norm(x).reshape(b * l, -1), token_valid.reshape(-1),
                        decode=decode)
    return x + y.reshape(b, l, -1), cache, stats


class TinyLM(nnx.Module):

  def __init__(self, config: TinyConfig, *, reroute=moe.NO_REROUTE, impl="xla_dense",
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.config = config
    self.embed = nnx.Param(jax.random.normal(rngs.params(), (config.vocab_size, config.dim),
                                             param_dtype))
    self.layers = nnx.List([TinyLayer(config, reroute=reroute, impl=impl,
                                      param_dtype=param_dtype, rngs=rngs)
                            for _ in range(config.num_layers)])
    self.norm = layers.RMSNorm(config.dim, param_dtype=param_dtype)
    self.lm_head = layers.Linear(config.dim, config.vocab_size, param_dtype=param_dtype,
                                 rngs=rngs)

  def init_cache(self, batch, length, dtype=jnp.float32):
    c = self.config
    return [layers.KVCache.zeros(batch, length, c.kv_heads, c.head_dim, c.head_dim, dtype)
            for _ in range(c.num_layers)]

  def __call__(self, tokens, positions, token_valid, cache, cache_valid, cache_index, *,
               decode=False, last_only=False):
    x = self.embed[...][tokens]
    new_cache, stats = [], []
    for layer, layer_cache in zip(self.layers, cache):
      x, layer_cache, s = layer(x, positions, token_valid, layer_cache, cache_valid,
                                cache_index, decode)
      new_cache.append(layer_cache)
      stats.append(s)
    x = x[:, -1:] if last_only else x
    logits = self.lm_head(self.norm(x)).astype(jnp.float32)
    return base.ForwardOutput(logits, new_cache, tuple(stats))


checkpoint.register_architecture("tiny_test_lm", TinyConfig, TinyLM)


def make_model(seed=0, reroute=moe.NO_REROUTE, calibrate=False):
  model = TinyLM(TinyConfig(), reroute=reroute, rngs=nnx.Rngs(seed))
  if calibrate:
    rng = np.random.default_rng(seed)
    for block in moe.moe_blocks(model):
      e = block.num_experts
      sim = rng.uniform(0, 1, (e, e))
      sim = (sim + sim.T) / 2
      np.fill_diagonal(sim, 1.0)
      block.similarity[...] = jnp.asarray(sim, jnp.float32)
  return model


@pytest.fixture(scope="module")
def model():
  return make_model()


REF_LEN = 24


@nnx.jit
def _full_forward(model, tokens, valid):
  out = model(tokens, jnp.arange(REF_LEN)[None], valid, model.init_cache(1, REF_LEN),
              valid, jnp.asarray(0), decode=False)
  return out.logits


def full_forward_logits(model, seq):
  """Logits of the last token, recomputed over the whole sequence with a fresh cache.

  The sequence is right-padded to REF_LEN (one compilation); causality keeps the
  padding out of the real tokens' logits.
  """
  n = len(seq)
  tokens = np.zeros((1, REF_LEN), np.int32)
  tokens[0, :n] = seq
  valid = np.arange(REF_LEN)[None] < n
  return np.asarray(_full_forward(model, jnp.asarray(tokens), jnp.asarray(valid))[0, n - 1])


def reference_greedy(model, prompt, n):
  seq = list(prompt)
  for _ in range(n):
    seq.append(int(np.argmax(full_forward_logits(model, seq))))
  return seq[len(prompt):]


CACHE = 20  # one cache length for all tests: compiled steps are shared
PROMPTS = [[5, 9, 2, 33, 7, 1, 12], [40, 3], [17, 17, 8, 50]]

# --------------------------------------------------------------------------- generation


@pytest.mark.parametrize("new_tokens", [6, 1])  # 1: the decode loop runs no step
def test_greedy_matches_uncached_reference(model, new_tokens):
  result = generation.generate(model, PROMPTS, max_new_tokens=new_tokens,
                               cache_length=CACHE)
  for prompt, got in zip(PROMPTS, result.tokens):
    assert got == reference_greedy(model, prompt, new_tokens)
  assert result.finish_reason == ["length"] * 3
  assert result.decode_stats.shape == (new_tokens - 1, 2, len(generation.STAT_FIELDS))
  assert result.prefill_stats.shape == (2, len(generation.STAT_FIELDS))


def test_every_sequence_ends_at_its_first_token(model):
  free = generation.generate(model, PROMPTS, max_new_tokens=6, cache_length=CACHE)
  first_tokens = tuple({t[0] for t in free.tokens})
  result = generation.generate(model, PROMPTS, max_new_tokens=6, eos_ids=first_tokens,
                               cache_length=CACHE)
  assert result.tokens == [[], [], []]
  assert result.finish_reason == ["eos"] * 3
  assert result.decode_stats.shape == (0, 2, len(generation.STAT_FIELDS))  # no step ran


def test_left_padding_batch_equals_single(model):
  batched = generation.generate(model, PROMPTS, max_new_tokens=8, cache_length=CACHE)
  for i, prompt in enumerate(PROMPTS):
    alone = generation.generate(model, [prompt], max_new_tokens=8, cache_length=CACHE)
    assert alone.tokens[0] == batched.tokens[i], i
  # Padding must not change the prefill's routing statistics either: prefill
  # distinct experts of the batch = those of the union of real tokens only.
  assert np.all(batched.prefill_stats[:, 0] <= model.config.num_experts)


def test_prompt_length_multiple_changes_no_output(model):
  plain = generation.generate(model, PROMPTS, max_new_tokens=6, cache_length=CACHE)
  padded = generation.generate(model, PROMPTS, max_new_tokens=6, cache_length=CACHE,
                               length_multiple=5)
  assert generation.padded_prompt_length(PROMPTS, 5) == 10  # longest prompt: 7 tokens
  assert padded.tokens == plain.tokens
  np.testing.assert_array_equal(padded.decode_stats, plain.decode_stats)
  np.testing.assert_array_equal(padded.prefill_stats, plain.prefill_stats)
  with pytest.raises(ValueError, match="padded to 14"):
    generation.generate(model, PROMPTS, max_new_tokens=8, cache_length=CACHE,
                        length_multiple=14)
  with pytest.raises(ValueError, match="length_multiple"):
    generation.generate(model, PROMPTS, max_new_tokens=2, length_multiple=0)


@pytest.mark.parametrize("reroute", [moe.NO_REROUTE,
                                     RerouteConfig(policy="sere", select_top_k=1)],
                         ids=["none", "sere"])
def test_chunked_prefill_changes_no_output(reroute):
  """Prompts of up to 7 tokens prefilled 3 positions at a time (padded to 9, three
  chunks, one of them padding only for the shorter prompts) give the tokens and decode
  statistics of the one-call prefill; a chunk as long as the prompt is one call."""
  model = make_model(reroute=reroute, calibrate=reroute.policy != "none")
  whole = generation.generate(model, PROMPTS, max_new_tokens=6, cache_length=CACHE,
                              prefill_chunk=0)
  assert generation.padded_prompt_length(PROMPTS, 1, 3) == 9
  chunked = generation.generate(model, PROMPTS, max_new_tokens=6, cache_length=CACHE,
                                prefill_chunk=3)
  assert chunked.tokens == whole.tokens
  np.testing.assert_array_equal(chunked.decode_stats, whole.decode_stats)
  assert chunked.prefill_stats.shape == whole.prefill_stats.shape
  one_chunk = generation.generate(model, PROMPTS, max_new_tokens=6, cache_length=CACHE,
                                  prefill_chunk=7)
  assert generation.padded_prompt_length(PROMPTS, 1, 7) == 7
  np.testing.assert_array_equal(one_chunk.prefill_stats, whole.prefill_stats)
  assert one_chunk.tokens == whole.tokens


def test_chunked_prefill_rejects_bad_chunks_and_short_caches(model):
  for chunk in (-1, 1.5, True):
    with pytest.raises(ValueError, match="prefill_chunk must be an integer >= 0"):
      generation.generate(model, PROMPTS, max_new_tokens=2, prefill_chunk=chunk)
  # Padded to 10 for 5-position chunks: 10 + 8 - 1 slots, more than 16 (7 + 8 - 1 fit).
  with pytest.raises(ValueError, match="padded to 10"):
    generation.generate(model, PROMPTS, max_new_tokens=8, cache_length=16,
                        prefill_chunk=5)


def test_eos_stops_and_finished_sequence_adds_no_experts(model):
  free = generation.generate(model, PROMPTS, max_new_tokens=6, cache_length=CACHE)
  # A prompt whose first new token appears nowhere in the others' continuations
  # finishes at once when that token is the EOS.
  k = next(i for i in range(3)
           if all(free.tokens[i][0] not in free.tokens[j] for j in range(3) if j != i))
  rest = [j for j in range(3) if j != k]
  eos = free.tokens[k][0]
  result = generation.generate(model, PROMPTS, max_new_tokens=6, eos_ids=(eos,),
                                  cache_length=CACHE)
  assert result.tokens[k] == [] and result.finish_reason[k] == "eos"
  for j in rest:
    assert result.tokens[j] == free.tokens[j] and result.finish_reason[j] == "length"
  # The decode stats equal those of the other two prompts decoded without prompt k.
  others = generation.generate(model, [PROMPTS[j] for j in rest], max_new_tokens=6, cache_length=CACHE)
  np.testing.assert_array_equal(result.decode_stats, others.decode_stats)
  assert not np.array_equal(free.decode_stats[:, :, 0], others.decode_stats[:, :, 0]), (
      "the test cannot tell whether a finished sequence adds experts")
  assert others.tokens == [free.tokens[j] for j in rest]


def test_eos_mid_sequence_and_early_exit(model):
  free = generation.generate(model, [PROMPTS[0]], max_new_tokens=6, cache_length=CACHE)
  eos = free.tokens[0][3]
  first = free.tokens[0].index(eos)
  result = generation.generate(model, [PROMPTS[0]], max_new_tokens=6, eos_ids=(eos,),
                                  cache_length=CACHE)
  assert result.tokens[0] == free.tokens[0][:first]
  assert result.finish_reason == ["eos"]
  assert result.decode_stats.shape[0] == first  # no steps after the batch finished


def test_stop_sequence(model):
  free = generation.generate(model, [PROMPTS[2]], max_new_tokens=6, cache_length=CACHE)
  stop = free.tokens[0][2:4]
  result = generation.generate(model, [PROMPTS[2]], max_new_tokens=6,
                               stop_sequences=[stop], cache_length=CACHE)
  # Stops at the first occurrence of the stop sequence, which is not returned.
  toks = free.tokens[0]
  end = next(i for i in range(len(toks) - 1) if toks[i:i + 2] == stop)
  assert result.tokens[0] == toks[:end]
  assert result.finish_reason == ["stop"]


def test_steps_per_check_changes_no_output(model):
  """Three decode steps per check of the loop's condition: the same tokens, finish
  reasons and decode stats (so the same number of steps) when the batch runs to the
  length limit in the middle of a group of steps (5 steps; in a cache of exactly the
  slots needed, the padding step's slot is past the end and clamped to the last one)
  and when its sequences end by EOS and stop sequence earlier."""
  for cache_length in (None, CACHE):
    want = generation.generate(model, PROMPTS, max_new_tokens=6, cache_length=cache_length)
    got = generation.generate(model, PROMPTS, max_new_tokens=6, cache_length=cache_length,
                              steps_per_check=3)
    assert got.tokens == want.tokens and got.finish_reason == want.finish_reason
    np.testing.assert_array_equal(got.decode_stats, want.decode_stats)
  # Every sequence ends by its third token: at an EOS or, earlier, a stop sequence.
  ends = dict(eos_ids=tuple(sorted({t[2] for t in want.tokens})),
              stop_sequences=[want.tokens[1][:2]])
  want = generation.generate(model, PROMPTS, max_new_tokens=6, cache_length=CACHE, **ends)
  got = generation.generate(model, PROMPTS, max_new_tokens=6, cache_length=CACHE,
                            steps_per_check=3, **ends)
  assert got.tokens == want.tokens and got.finish_reason == want.finish_reason
  np.testing.assert_array_equal(got.decode_stats, want.decode_stats)
  assert want.decode_stats.shape[0] < 4, "the batch does not end before the length limit"
  with pytest.raises(ValueError, match="steps_per_check"):
    generation.generate(model, PROMPTS, max_new_tokens=6, steps_per_check=0)


def _decode_one_prompt(model, prompt, *, min_rows, steps_per_check=1):
  """The prefill of one prompt, then 5 steps of `decode_loop` with `min_rows` rows at
  least."""
  graphdef, state = nnx.split(model)
  cache = model.init_cache(1, CACHE, jnp.float32)
  cache_valid = jnp.zeros((1, CACHE), jnp.bool_)
  tokens = jnp.asarray([prompt], jnp.int32)
  positions = jnp.arange(len(prompt), dtype=jnp.int32)[None, :]
  key = jax.random.PRNGKey(7)
  sampling = SamplingConfig(temperature=1.0, top_k=20)
  first, cache, cache_valid, _ = generation.model_step(
      graphdef, state, tokens, positions, jnp.ones_like(tokens, jnp.bool_), cache,
      cache_valid, jnp.asarray(0, jnp.int32), key, sampling=sampling, decode=False)
  return generation.decode_loop(
      graphdef, state, first, jnp.asarray([len(prompt)], jnp.int32), cache, cache_valid,
      jnp.asarray(len(prompt), jnp.int32), key, sampling=sampling, max_new_tokens=6,
      eos_ids=(), stop_sequences=(), pad_id=0, steps_per_check=steps_per_check,
      min_rows=min_rows)


@pytest.mark.parametrize("reroute", [moe.NO_REROUTE,
                                     RerouteConfig(policy="sere", select_top_k=1)])
def test_single_sequence_decodes_beside_a_padding_row(reroute):
  """One sequence decodes beside a padding row (`MIN_DECODE_ROWS`): the same sampled
  tokens, finish reasons, decode stats (the padding adds no experts) and cache as
  decoding it alone, with one step per check and with several."""
  assert generation.MIN_DECODE_ROWS == 2
  model = make_model(reroute=reroute, calibrate=True)
  for steps_per_check in (1, 4):
    want_acc, want_steps, want_stats, want_cache, want_valid = _decode_one_prompt(
        model, PROMPTS[0], min_rows=1, steps_per_check=steps_per_check)
    got_acc, got_steps, got_stats, got_cache, got_valid = _decode_one_prompt(
        model, PROMPTS[0], min_rows=2, steps_per_check=steps_per_check)
    for w, g in zip(want_acc, got_acc):
      np.testing.assert_array_equal(g, w)
    assert got_acc.tokens.shape == (1, 6) and int(got_steps) == int(want_steps) == 5
    np.testing.assert_array_equal(got_stats, want_stats)
    np.testing.assert_array_equal(got_valid, want_valid)
    for w, g in zip(jax.tree.leaves(want_cache), jax.tree.leaves(got_cache)):
      assert g.shape == w.shape
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="min_rows"):
    _decode_one_prompt(model, PROMPTS[0], min_rows=0)


def _host_accept(streams, eos_ids, stop_sequences, max_new_tokens):
  """Plain-Python reference of the decode loop's stopping rules, per sequence."""
  tokens, reasons = [], []
  for stream in streams:
    out, reason = [], None
    for tok in stream:
      if tok in eos_ids:
        reason = "eos"
        break
      out.append(tok)
      stop = next((s for s in stop_sequences
                   if len(out) >= len(s) and out[len(out) - len(s):] == list(s)), None)
      if stop is not None:
        del out[len(out) - len(stop):]
        reason = "stop"
        break
      if len(out) >= max_new_tokens:
        reason = "length"
        break
    tokens.append(out)
    reasons.append(reason)
  return tokens, reasons


@pytest.mark.parametrize("seed", range(6))
def test_device_stopping_rules_match_host_reference(seed):
  # Streams over a 5-token vocabulary hit EOS ids and (overlapping, nested) stop
  # sequences often; a sequence that has finished must not change afterwards.
  rng = np.random.default_rng(seed)
  batch, max_new = 16, 7
  streams = rng.integers(0, 5, (batch, max_new))
  eos_ids = tuple(sorted(set(rng.integers(0, 5, rng.integers(0, 2)).tolist())))
  stops = tuple(tuple(rng.integers(0, 5, n).tolist()) for n in rng.integers(1, 4, 3))
  stops += ((9,) * (max_new + 1),)  # longer than any output: never matches
  accept = jax.jit(functools.partial(generation._accept, eos_ids=eos_ids,
                                     stop_sequences=stops, max_new_tokens=max_new))
  acc = generation.Accepted(jnp.zeros((batch, max_new), jnp.int32),
                            jnp.zeros((batch,), jnp.int32),
                            jnp.full((batch,), generation.RUNNING, jnp.int32))
  for step in range(max_new):
    acc = accept(acc, jnp.asarray(streams[:, step], jnp.int32))
  want_tokens, want_reasons = _host_accept(streams.tolist(), eos_ids, stops, max_new)
  out, count, reason = (np.asarray(a) for a in acc)
  assert [out[i, :count[i]].tolist() for i in range(batch)] == want_tokens
  assert [generation.FINISH_REASONS[r] for r in reason] == want_reasons
  assert len(set(want_reasons)) > 1, (
      "the random streams do not exercise more than one stopping rule")


def test_sere_decode_reroutes_and_reports(model):
  sere = make_model(reroute=RerouteConfig(policy="sere", select_top_k=1), calibrate=True)
  prompts = [[i, (3 * i) % 61, (7 * i) % 61] for i in range(1, 9)]
  result = generation.generate(sere, prompts, max_new_tokens=4, cache_length=CACHE)
  stats = result.decode_stats
  assert np.all(stats[:, :, 1] <= stats[:, :, 0])
  assert np.any(stats[:, :, 1] < stats[:, :, 0])
  assert np.any(stats[:, :, 3] > 0)
  # Decode-only by default: prefill is not re-routed.
  assert np.all(result.prefill_stats[:, 0] == result.prefill_stats[:, 1])
  assert np.all(result.prefill_stats[:, 3] == 0)


def test_uncalibrated_sere_is_rejected():
  sere = make_model(reroute=RerouteConfig(policy="sere", select_top_k=1))
  with pytest.raises(ValueError, match="calibrated"):
    generation.generate(sere, [[1, 2]], max_new_tokens=2)


# --------------------------------------------------------------------------- sampling


def test_sampling_reproducible_with_seed(model):
  cfg = SamplingConfig(temperature=1.0, top_k=20, top_p=0.95, seed=3)
  a = generation.generate(model, PROMPTS, max_new_tokens=6, sampling=cfg, cache_length=CACHE)
  b = generation.generate(model, PROMPTS, max_new_tokens=6, sampling=cfg, cache_length=CACHE)
  c = generation.generate(model, PROMPTS, max_new_tokens=6,
                          sampling=dataclasses.replace(cfg, seed=4), cache_length=CACHE)
  assert a.tokens == b.tokens
  assert a.tokens != c.tokens


def _draws(logits, cfg, n=4000):
  """`n` draws for one row of logits (as a batch of n identical rows)."""
  batch = jnp.broadcast_to(logits, (n, logits.shape[-1]))
  return np.asarray(jax.jit(generation.sample, static_argnums=2)(
      batch, jax.random.PRNGKey(0), cfg))


def test_sampling_definitions():
  logits = jnp.log(jnp.asarray([0.05, 0.4, 0.1, 0.3, 0.15]))
  # Greedy.
  greedy = generation.sample(jnp.stack([logits, -logits]), jax.random.PRNGKey(0),
                             SamplingConfig())
  np.testing.assert_array_equal(greedy, [1, 0])
  # top_k = 2 draws only the two most likely tokens, in ratio 0.4 : 0.3.
  d = _draws(logits, SamplingConfig(temperature=1.0, top_k=2))
  assert set(np.unique(d)) == {1, 3}
  assert abs(np.mean(d == 1) - 4 / 7) < 0.03
  # top_p = 0.75: the smallest prefix with mass >= 0.75 is {0.4, 0.3, 0.15}.
  d = _draws(logits, SamplingConfig(temperature=1.0, top_p=0.75))
  assert set(np.unique(d)) == {1, 3, 4}
  assert abs(np.mean(d == 4) - 0.15 / 0.85) < 0.03
  # top_p = 0.65: {0.4, 0.3} (0.4 alone is short of it, 0.7 reaches it).
  d = _draws(logits, SamplingConfig(temperature=1.0, top_p=0.65))
  assert set(np.unique(d)) == {1, 3}
  # Temperature 1 reproduces the distribution; temperature 0.5 squares it.
  d = _draws(logits, SamplingConfig(temperature=1.0), n=8000)
  assert abs(np.mean(d == 0) - 0.05) < 0.015
  d = _draws(logits, SamplingConfig(temperature=0.5), n=8000)
  p = np.array([0.05, 0.4, 0.1, 0.3, 0.15]) ** 2
  p /= p.sum()
  assert abs(np.mean(d == 1) - p[1]) < 0.03


@pytest.mark.parametrize("kwargs", [dict(temperature=-0.1), dict(top_k=-1),
                                    dict(top_p=0.0), dict(top_p=1.5),
                                    dict(temperature=float("nan")), dict(seed=-1)])
def test_sampling_config_validation(kwargs):
  with pytest.raises(ValueError):
    SamplingConfig(**kwargs)


@pytest.mark.parametrize("prompts,kwargs,match", [
    ([], {}, "empty"),
    ([[1, 2], []], {}, "prompt 1 is empty"),
    ([[1, 61]], {}, "outside"),
    ([[1, -1]], {}, "outside"),
    ([[1, 2]], dict(max_new_tokens=0), "max_new_tokens"),
    ([[1] * 60], dict(max_new_tokens=5), "max positions"),
    ([[1] * 10], dict(max_new_tokens=5, cache_length=12), "cache"),
])
def test_bad_inputs(model, prompts, kwargs, match):
  kwargs = {"max_new_tokens": 3, **kwargs}
  with pytest.raises(ValueError, match=match):
    generation.generate(model, prompts, **kwargs)


def test_explicit_cache_length_fits(model):
  r = generation.generate(model, [[1] * 16], max_new_tokens=5, cache_length=CACHE)
  assert len(r.tokens[0]) == 5


# --------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip(tmp_path):
  model = make_model(seed=1, reroute=RerouteConfig(policy="sere", select_top_k=2),
                     calibrate=True)
  path = str(tmp_path / "ckpt")
  checkpoint.save(model, path)
  with open(os.path.join(path, "config.json")) as fh:
    meta = json.load(fh)
  assert meta["sere_jax_architecture"] == "tiny_test_lm"
  assert meta["config"]["layer_kinds"] == ["moe", "moe"]
  assert not [f for f in os.listdir(path) if ".tmp" in f]

  restored = checkpoint.restore(path)
  assert isinstance(restored, TinyLM) and restored.config == model.config
  for a, b in zip(moe.moe_blocks(model), moe.moe_blocks(restored)):
    np.testing.assert_array_equal(a.similarity[...], b.similarity[...])
    assert b.reroute == a.reroute
  toks = np.zeros((1, REF_LEN), np.int32)
  toks[0, :6] = [3, 4, 5, 6, 60, 0]
  valid = jnp.asarray(np.arange(REF_LEN)[None] < 6)
  la = _full_forward(model, jnp.asarray(toks), valid)
  lb = _full_forward(restored, jnp.asarray(toks), valid)
  np.testing.assert_array_equal(la, lb)

  # load_model dispatches to restore; overriding the re-routing works.
  loaded = checkpoint.load_model(path, param_dtype=jnp.float32,
                                 reroute=RerouteConfig(policy="none"), impl="xla_dense")
  assert moe.moe_blocks(loaded)[0].reroute.policy == "none"
  np.testing.assert_array_equal(moe.moe_blocks(loaded)[1].similarity[...],
                                moe.moe_blocks(model)[1].similarity[...])
  with pytest.raises(ValueError, match="already"):
    checkpoint.save(model, path)
  half = checkpoint.restore(path, param_dtype=jnp.bfloat16)
  assert half.lm_head.kernel[...].dtype == jnp.bfloat16
  np.testing.assert_array_equal(moe.moe_blocks(half)[0].similarity[...],
                                moe.moe_blocks(model)[0].similarity[...])


FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "parity")


@pytest.mark.parametrize("name", ["qwen3_moe", "deepseek_v2"])
def test_hf_fixture_greedy_matches_transformers(name):
  """load_model on a Hugging Face directory + generate = transformers' greedy decode."""
  directory = os.path.join(FIXTURES, name)
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  with open(os.path.join(directory, "reference.json")) as fh:
    ref = json.load(fh)
  expected = load_file(os.path.join(directory, "reference.safetensors"))["generated_ids"]
  hf_model = checkpoint.load_model(directory, param_dtype=jnp.float32, impl="xla_dense")
  result = generation.generate(hf_model, ref["prompts"], max_new_tokens=ref["new_tokens"])
  assert result.tokens == expected.tolist()


def test_load_model_rejects_unknown_model_type(tmp_path):
  with open(tmp_path / "config.json", "w") as fh:
    json.dump({"model_type": "mixtral"}, fh)
  with pytest.raises(ValueError, match="mixtral"):
    checkpoint.load_model(str(tmp_path))


def test_restore_rejects_unknown_architecture(tmp_path):
  with open(tmp_path / "config.json", "w") as fh:
    json.dump({"sere_jax_architecture": "nope", "config": {}}, fh)
  with pytest.raises(ValueError, match="nope"):
    checkpoint.restore(str(tmp_path))


# --------------------------------------------------------------------------- script helpers


def test_generate_script_prompt_reading(tmp_path):
  from sere_jax import textio  # pylint: disable=g-import-not-at-top
  from sere_jax.models import hf_import  # pylint: disable=g-import-not-at-top
  text = tmp_path / "p.txt"
  text.write_text("hello world\n\nsecond prompt\n")
  rows = textio.read_records(str(text), "prompt")
  assert rows == [{"prompt": "hello world"}, {"prompt": "second prompt"}]
  with pytest.raises(ValueError, match="tokenizer"):
    textio.tokenize_records(rows, "prompt", None)
  jsonl = tmp_path / "p.jsonl"
  jsonl.write_text('{"tokens": [1, 2]}\n{"tokens": [3]}\n')
  assert textio.tokenize_records(textio.read_records(str(jsonl), "prompt"), "prompt",
                                 None) == [[1, 2], [3]]
  jsonl.write_text('{"tokens": [1, 2]}\n{"text": "x"}\n')
  with pytest.raises(ValueError, match="line 2"):
    textio.read_records(str(jsonl), "prompt")
  (tmp_path / "config.json").write_text('{"eos_token_id": [5, 6]}')
  assert hf_import.eos_token_ids(str(tmp_path)) == (5, 6)

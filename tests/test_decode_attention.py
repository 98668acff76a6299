"""The decode-attention op (`sere_jax.kernels.decode_attention`): every kernel backend
that runs here (interpret mode on a CPU) against the models' XLA attention (its
reference), inside the Qwen models, and the Triton kernel's lowering for an H200."""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sere_jax import generation
from sere_jax.kernels import decode_attention as attention_op
from sere_jax.kernels.decode_attention.reference import (decode_attention_reference,
                                                         folded_norm_weight, rms_norm)
from sere_jax.kernels.decode_attention import triton as attention_triton
from sere_jax.kernels.decode_attention.triton import decode_attention_triton
from sere_jax.kernels.lowering_check import export_for
from sere_jax.models import layers
from sere_jax.numerics import mixed_dot_operands, split_k_dot
from tests import kernel_backends
from tests.random_models import random_qwen

EPS, SCALE = 1e-6, 0.25
F32_TOLERANCE = kernel_backends.f32_tolerance(rtol=1e-5, atol=1e-5,
                                              tf32=kernel_backends.TF32_UNIT_TOLERANCE)


def _case(rng, *, batch, heads, kv_heads, head_dim, cache_len, index, dtype, qk_norm,
          cache_dtype=None):
  normal = lambda *shape, dtype=dtype: jnp.asarray(rng.normal(size=shape), dtype)
  qkv = normal(batch, heads + 2 * kv_heads, head_dim)  # q heads, then k, then v
  k_cache = normal(batch, cache_len, kv_heads, head_dim, dtype=cache_dtype or dtype)
  v_cache = normal(batch, cache_len, kv_heads, head_dim, dtype=cache_dtype or dtype)
  # Left padding: sequence i starts at slot 3 * i; slots after `index` are not visible.
  slots = np.arange(cache_len)
  start = 3 * np.arange(batch)
  visible = (slots[None, :] >= start[:, None]) & (slots[None, :] <= index)
  positions = jnp.asarray(index - start, jnp.int32)
  inv_freq = layers.rope_inv_freq(head_dim, 10000.0)
  # Norm weights in the activation dtype, as the models store them.
  norms = ((jnp.asarray(1 + 0.1 * rng.normal(size=head_dim), dtype),
            jnp.asarray(1 + 0.1 * rng.normal(size=head_dim), dtype))
           if qk_norm else (None, None))
  return (qkv, k_cache, v_cache, jnp.asarray(visible), jnp.int32(index), positions,
          inv_freq, *norms)


# (heads, kv_heads, head_dim, cache_len, block_s, index, dtype, qk_norm, cache dtype)
CASES = {
    "gqa_bf16_qk_norm": (8, 2, 32, 40, 16, 17, jnp.bfloat16, True, None),
    "gqa_f32_last_slot": (8, 2, 32, 40, 16, 39, jnp.float32, True, None),
    "mha_f32_no_norm_first_slot": (2, 2, 16, 24, 16, 0, jnp.float32, False, None),
    "one_block_bf16": (4, 1, 16, 16, 16, 9, jnp.bfloat16, False, None),
    "f32_activations_bf16_cache": (8, 2, 32, 40, 16, 21, jnp.float32, True, jnp.bfloat16),
}


@kernel_backends.over_implementations(attention_op.REGISTRY)
@pytest.mark.parametrize("case", CASES)
def test_matches_model_attention(case, implementation):
  heads, kv_heads, head_dim, cache_len, block_s, index, dtype, qk_norm, cache_dtype = (
      CASES[case])
  rng = np.random.default_rng(sum(map(ord, case)))
  args = _case(rng, batch=3, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
               cache_len=cache_len, index=index, dtype=dtype, qk_norm=qk_norm,
               cache_dtype=cache_dtype)
  got = attention_op.decode_attention(*args, eps=EPS, scale=SCALE, block_s=block_s,
                                      implementation=implementation)
  want = decode_attention_reference(*args, eps=EPS, scale=SCALE)
  exact = dtype == jnp.float32 and cache_dtype is None
  tol = F32_TOLERANCE if exact else dict(rtol=2e-2, atol=2e-2)
  for name, g, w in zip(("out", "k_cache", "v_cache"), got, want):
    assert g.shape == w.shape and g.dtype == w.dtype, name
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                               err_msg=name, **tol)
  # Only slot `index` of the caches changes.
  for new, old in zip(got[1:], args[1:3]):
    keep = np.arange(cache_len) != index
    np.testing.assert_array_equal(np.asarray(new)[:, keep], np.asarray(old)[:, keep])


@kernel_backends.over_implementations(attention_op.REGISTRY)
def test_row_with_nothing_visible_is_zero(implementation):
  rng = np.random.default_rng(0)
  args = list(_case(rng, batch=2, heads=4, kv_heads=2, head_dim=16, cache_len=16, index=5,
                    dtype=jnp.float32, qk_norm=False))
  args[3] = args[3].at[1].set(False)  # sequence 1 sees no slot (not even itself)
  out, _, _ = attention_op.decode_attention(*args, eps=EPS, scale=SCALE, block_s=16,
                                            implementation=implementation)
  np.testing.assert_array_equal(np.asarray(out[1]), 0.0)
  want, _, _ = decode_attention_reference(*args, eps=EPS, scale=SCALE)
  np.testing.assert_allclose(np.asarray(out), np.asarray(want), **F32_TOLERANCE)


@kernel_backends.over_implementations(attention_op.REGISTRY)
@pytest.mark.parametrize("index", [0, 20, 39])
def test_cache_split_among_programs_matches_reference(index, implementation):
  """Flash-decoding: 3 blocks of 16 slots (up to slot 39) shared by 2, 3 and 5
  programs per sequence and KV head (uneven shares, splits with no slot), merged;
  sequence 2 sees no slot."""
  rng = np.random.default_rng(index)
  args = list(_case(rng, batch=3, heads=8, kv_heads=2, head_dim=32, cache_len=40,
                    index=index, dtype=jnp.float32, qk_norm=True))
  args[3] = args[3].at[2].set(False)
  want = decode_attention_reference(*args, eps=EPS, scale=SCALE)
  for splits in (2, 3, 5):
    got = attention_op.decode_attention(*args, eps=EPS, scale=SCALE, block_s=16,
                                        splits=splits, implementation=implementation)
    for name, g, w in zip(("out", "k_cache", "v_cache"), got, want):
      assert g.shape == w.shape and g.dtype == w.dtype, name
      np.testing.assert_allclose(np.asarray(g), np.asarray(w), err_msg=f"{name} {splits}",
                                 **F32_TOLERANCE)
    np.testing.assert_array_equal(np.asarray(got[0][2]), 0.0)


def _partials(rng, qkv, parts):
  """Float32 split-K partials `[parts, ...]` of `qkv`'s shape in multiples of 1/8, so that
  their sum is exact in any order, and that sum rounded to qkv's dtype."""
  values = jnp.asarray(rng.integers(-8, 9, (parts, *qkv.shape)) / 8, jnp.float32)
  return values, values.sum(0).astype(qkv.dtype)


@kernel_backends.over_implementations(attention_op.REGISTRY)
@pytest.mark.parametrize("dtype,parts,splits", [
    (jnp.bfloat16, 4, 1), (jnp.float32, 3, 1), (jnp.bfloat16, 1, 1), (jnp.bfloat16, 2, 3)])
def test_sums_split_k_partials_of_qkv(dtype, parts, splits, implementation):
  """Partials of the q/k/v projection give what their sum in the activation dtype
  gives, one array or several splits of the cache; the reference takes them too."""
  rng = np.random.default_rng(parts * 10 + splits)
  args = list(_case(rng, batch=3, heads=8, kv_heads=2, head_dim=32, cache_len=40,
                    index=21, dtype=dtype, qk_norm=True))
  partials, args[0] = _partials(rng, args[0], parts)
  kw = dict(eps=EPS, scale=SCALE, block_s=16, splits=splits, implementation=implementation)
  got = attention_op.decode_attention(partials, *args[1:], activation_dtype=dtype, **kw)
  want = attention_op.decode_attention(*args, **kw)
  reference = decode_attention_reference(partials, *args[1:], eps=EPS, scale=SCALE,
                                         activation_dtype=dtype)
  for name, g, w, r in zip(("out", "k_cache", "v_cache"), got, want, reference):
    assert g.shape == w.shape == r.shape and g.dtype == w.dtype == r.dtype == dtype, name
    np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32),
                                  err_msg=name)
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32),
                               err_msg=name, rtol=2e-2, atol=2e-2)


@kernel_backends.over_implementations(attention_op.REGISTRY)
@pytest.mark.parametrize("dtype,parts,splits,biased", [
    (jnp.float32, 4, 1, False), (jnp.bfloat16, 4, 1, True), (jnp.float32, 1, 3, True),
    (jnp.bfloat16, 0, 1, False)])
def test_input_norm_folded_past_the_projection(dtype, parts, splits, biased,
                                               implementation):
  """`qkv` of `x * g` with `folded_norm_x = x` (and `qkv_bias`) gives the attention of
  `rms_norm(x, g)`'s projections plus the bias: as partials, as one array (parts 0),
  and over a split cache; the kernel as the reference, and both as normalising first."""
  rng = np.random.default_rng(parts * 10 + splits)
  batch, d_model, heads, kv_heads, head_dim = 3, 48, 8, 2, 32
  args = list(_case(rng, batch=batch, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                    cache_len=40, index=21, dtype=dtype, qk_norm=True))
  x = jnp.asarray(3 * rng.normal(size=(batch, d_model)), dtype)
  weight = jnp.asarray(1 + 0.1 * rng.normal(size=d_model), dtype)
  w = jnp.asarray(rng.normal(size=(d_model, (heads + 2 * kv_heads) * head_dim)) / 7, dtype)
  project = lambda rows: (split_k_dot(*mixed_dot_operands(rows, w), max(parts, 1))
                          .reshape(max(parts, 1), batch, -1, head_dim))
  bias = (tuple(jnp.asarray(rng.normal(size=(rows, head_dim)), dtype)
                for rows in (heads, kv_heads, kv_heads)) if biased else None)
  folded = project(folded_norm_weight(x, weight))
  unfolded = project(rms_norm(x, weight, EPS))
  if parts == 0:  # one array in the activation dtype
    folded, unfolded, activation_dtype = folded[0].astype(dtype), unfolded[0].astype(dtype), None
  else:
    activation_dtype = dtype
  kw = dict(eps=EPS, scale=SCALE, activation_dtype=activation_dtype, qkv_bias=bias)
  got = attention_op.decode_attention(folded, *args[1:], folded_norm_x=x, folded_norm_eps=EPS,
                                      block_s=16, splits=splits,
                                      implementation=implementation, **kw)
  reference = decode_attention_reference(folded, *args[1:], folded_norm_x=x,
                                         folded_norm_eps=EPS, **kw)
  normalised_first = decode_attention_reference(unfolded, *args[1:], **kw)
  tol = F32_TOLERANCE if dtype == jnp.float32 else dict(rtol=2e-2, atol=2e-2)
  loose = (kernel_backends.f32_tolerance(rtol=1e-4, atol=1e-4) if dtype == jnp.float32
           else dict(rtol=5e-2, atol=5e-2))  # the projections' inputs round differently
  for name, g, r, n in zip(("out", "k_cache", "v_cache"), got, reference, normalised_first):
    assert g.shape == r.shape == n.shape and g.dtype == r.dtype == n.dtype == dtype, name
    g, r, n = (np.asarray(a, np.float32) for a in (g, r, n))
    np.testing.assert_allclose(g, r, err_msg=name, **tol)
    np.testing.assert_allclose(r, n, err_msg=name, **loose)


def test_rejects_bad_projection_arguments():
  rng = np.random.default_rng(5)
  args = list(_case(rng, batch=2, heads=4, kv_heads=2, head_dim=16, cache_len=16, index=5,
                    dtype=jnp.float32, qk_norm=False))
  x = jnp.ones((2, 24), jnp.float32)
  for fn in (decode_attention_triton, decode_attention_reference):
    call = functools.partial(fn, *args, eps=EPS, scale=SCALE)
    with pytest.raises(ValueError, match="folded_norm_x must be"):
      call(folded_norm_x=x[:1], folded_norm_eps=EPS)
    with pytest.raises(ValueError, match="folded_norm_x must be"):
      call(folded_norm_x=x[:, :, None], folded_norm_eps=EPS)
    with pytest.raises(ValueError, match="needs its RMSNorm's folded_norm_eps"):
      call(folded_norm_x=x)
    with pytest.raises(ValueError, match="without folded_norm_x"):
      call(folded_norm_eps=EPS)
    bias = lambda *rows: tuple(jnp.zeros((r, 16), jnp.float32) for r in rows)
    # qkv has H + 2 * Hkv = 4 + 2 * 2 heads of D = 16.
    for wrong in (jnp.zeros((8, 16), jnp.float32), bias(4, 2), bias(4, 2, 2, 0),
                  bias(4, 1, 3), tuple(jnp.zeros((r, 8), jnp.float32) for r in (4, 2, 2)),
                  bias(6, 1, 1), bias(2, 3, 3)):  # the last two: Hkv not the caches' 2
      with pytest.raises(ValueError, match="qkv_bias must be the query, key and value"):
        call(qkv_bias=wrong)


def test_rejects_bad_qkv_partials():
  rng = np.random.default_rng(4)
  args = list(_case(rng, batch=2, heads=4, kv_heads=2, head_dim=16, cache_len=16, index=5,
                    dtype=jnp.bfloat16, qk_norm=False))
  partials = jnp.zeros((2, *args[0].shape), jnp.float32)
  for fn in (decode_attention_triton, decode_attention_reference):
    call = functools.partial(fn, eps=EPS, scale=SCALE)
    with pytest.raises(ValueError, match="must be float32 and come with an activation"):
      call(partials, *args[1:])  # no activation_dtype
    with pytest.raises(ValueError, match="must be float32"):
      call(partials.astype(jnp.bfloat16), *args[1:], activation_dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="is for qkv partials"):
      call(*args, activation_dtype=jnp.float32)
  assert "activations, not int8" in attention_triton.unsupported(
      partials, args[1], args[2], args[6], jnp.int8)


def test_combine_splits_is_softmax_over_all_slots():
  """Two splits' partial sums, against one softmax over their slots together; a head
  whose splits saw nothing is zero."""
  rng = np.random.default_rng(5)
  logits = rng.normal(size=(2, 6)).astype(np.float32)  # [splits, slots] of one head
  values = rng.normal(size=(2, 6, 4)).astype(np.float32)
  m = logits.max(axis=1)
  p = np.exp(logits - m[:, None])
  acc = np.einsum("ps,psd->pd", p, values)
  probs = np.exp(logits.reshape(-1) - logits.max())
  want = probs @ values.reshape(12, 4) / probs.sum()
  got = attention_triton.combine_splits(
      jnp.asarray(np.stack([acc, np.zeros_like(acc)]))[:, :, None],  # [B=2, P, H=1, D]
      jnp.asarray(np.stack([m, np.full(2, -np.inf, np.float32)]))[:, :, None],
      jnp.asarray(np.stack([p.sum(axis=1), np.zeros(2, np.float32)]))[:, :, None],
      jnp.float32)
  np.testing.assert_allclose(np.asarray(got[0, 0]), want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(got[1]), 0.0)


def test_default_splits():
  """One split for short caches and full grids; long caches split until the grid is
  full, each split over `min_slots` slots or more."""
  min_slots, programs = (attention_triton.SPLITS[k] for k in ("min_slots", "programs"))
  assert attention_triton.default_splits(batch=1, kv_heads=4, cache_len=min_slots) == 1
  assert attention_triton.default_splits(batch=1, kv_heads=4,
                                         cache_len=2 * min_slots - 1) == 1
  long = 1024 * min_slots
  assert attention_triton.default_splits(batch=1, kv_heads=4, cache_len=long) == (
      -(-programs // 4))
  assert attention_triton.default_splits(batch=1, kv_heads=4,
                                         cache_len=3 * min_slots) == 3
  assert attention_triton.default_splits(batch=programs, kv_heads=4, cache_len=long) == 1


def test_default_splits_wide_grid():
  """Once the unsplit grid has `wide_grid` programs a split needs twice `min_slots`
  slots: the benchmarks' 160-slot caches stay unsplit at B = 16 but split at B = 1."""
  min_slots, wide = (attention_triton.SPLITS[k] for k in ("min_slots", "wide_grid"))
  batch = wide // 4
  assert attention_triton.default_splits(batch=1, kv_heads=4, cache_len=160) == 2
  assert attention_triton.default_splits(batch=batch, kv_heads=4, cache_len=160) == 1
  assert attention_triton.default_splits(batch=batch - 1, kv_heads=4,
                                         cache_len=2 * min_slots) == 2
  assert attention_triton.default_splits(batch=batch, kv_heads=4,
                                         cache_len=4 * min_slots - 1) == 1
  assert attention_triton.default_splits(batch=batch, kv_heads=4,
                                         cache_len=4 * min_slots) == 2


@kernel_backends.over_implementations(attention_op.REGISTRY)
def test_head_dim_the_kernel_cannot_take_runs_xla_with_one_log_line(implementation,
                                                                    caplog):
  """D = 24 is no power of two: the kernels run the reference and say why, once."""
  rng = np.random.default_rng(4)
  args = _case(rng, batch=2, heads=4, kv_heads=2, head_dim=24, cache_len=16, index=5,
               dtype=jnp.float32, qk_norm=True)
  with caplog.at_level(logging.WARNING):
    got = [attention_op.decode_attention(*args, eps=EPS, scale=SCALE,
                                         implementation=implementation)
           for _ in range(2)]
  want = decode_attention_reference(*args, eps=EPS, scale=SCALE)
  for g in got:
    for g_part, w_part in zip(g, want):
      np.testing.assert_array_equal(np.asarray(g_part), np.asarray(w_part))
  lines = [r.getMessage() for r in caplog.records if "decode_attention" in r.getMessage()]
  assert lines == [f"decode_attention ({implementation}): the Triton kernel takes head "
                   "dims that are powers of two >= 16, not 24; running the XLA attention"]


def test_unsupported_names_each_reason():
  qkv = jnp.zeros((2, 8, 32), jnp.bfloat16)
  cache = jnp.zeros((2, 16, 2, 32), jnp.bfloat16)
  freq = jnp.zeros((16,), jnp.float32)
  assert attention_triton.unsupported(qkv, cache, cache, freq) is None
  assert "not 8" in attention_triton.unsupported(qkv[..., :8], cache[..., :8],
                                                 cache[..., :8], freq[:4])
  assert "whole head" in attention_triton.unsupported(qkv, cache, cache, freq[:8])
  assert "v_cache in int8" in attention_triton.unsupported(qkv, cache, cache.astype(
      jnp.int8), freq)
  rows = jnp.zeros((2, 24), jnp.int32)
  assert "folded_norm_x in int32" in attention_triton.unsupported(
      qkv, cache, cache, freq, folded_norm_x=rows)
  f32, i32 = jnp.zeros((4, 32), jnp.float32), jnp.zeros((2, 32), jnp.int32)
  assert "qkv_bias in int32" in attention_triton.unsupported(
      qkv, cache, cache, freq, qkv_bias=(f32, f32[:2], i32))


def test_rejects_bad_shapes():
  rng = np.random.default_rng(1)
  args = list(_case(rng, batch=2, heads=4, kv_heads=2, head_dim=16, cache_len=16, index=5,
                    dtype=jnp.float32, qk_norm=True))
  call = functools.partial(decode_attention_triton, eps=EPS, scale=SCALE, interpret=True)
  with pytest.raises(ValueError, match="visible must be"):
    call(*args[:3], args[3][:, :8], *args[4:])
  with pytest.raises(ValueError, match="powers of two"):
    call(*args, block_s=24)
  with pytest.raises(ValueError, match="both be given"):
    call(*args[:8], None)
  for splits in (0, -2, 1.5):
    with pytest.raises(ValueError, match="splits must be a positive integer"):
      call(*args, splits=splits)
  bad_cache = jnp.zeros((2, 16, 3, 16), jnp.float32)
  with pytest.raises(ValueError, match="cache shapes"):
    call(args[0], bad_cache, *args[2:])
  with pytest.raises(ValueError, match="cache shapes"):  # qkv's D is not the caches'
    call(jnp.zeros((2, 8, 32), jnp.float32), *args[1:])


@pytest.mark.parametrize("qkv_heads", [4, 5, 7, 9])
def test_rejects_qkv_not_h_plus_2hkv(qkv_heads):
  """With Hkv = 2 KV heads (from the caches), qkv's heads are not H + 2 * Hkv with H a
  positive multiple of 2."""
  rng = np.random.default_rng(2)
  args = list(_case(rng, batch=2, heads=4, kv_heads=2, head_dim=16, cache_len=16, index=5,
                    dtype=jnp.float32, qk_norm=False))
  qkv = jnp.zeros((2, qkv_heads, 16), jnp.float32)
  for fn in (decode_attention_triton, decode_attention_reference):
    with pytest.raises(ValueError, match=rf"qkv has {qkv_heads} heads, not H \+ 2 \* Hkv"):
      fn(qkv, *args[1:], eps=EPS, scale=SCALE)


def test_rejects_different_key_and_value_dims():
  """One qkv array cannot hold keys of 16 and values of 32 (Dk != Dv)."""
  rng = np.random.default_rng(3)
  args = list(_case(rng, batch=2, heads=4, kv_heads=2, head_dim=16, cache_len=16, index=5,
                    dtype=jnp.float32, qk_norm=False))
  v_cache = jnp.zeros((2, 16, 2, 32), jnp.float32)
  for fn in (decode_attention_triton, decode_attention_reference):
    with pytest.raises(ValueError, match="key and value head dims differ"):
      fn(args[0], args[1], v_cache, *args[3:], eps=EPS, scale=SCALE)


def test_lowers_for_cuda():
  """Qwen3-30B-A3B at B = 16: 32 query heads over 4 KV heads of 128, 160 cache slots."""
  spec = jax.ShapeDtypeStruct
  bf16, i32 = jnp.bfloat16, jnp.int32
  fn = functools.partial(decode_attention_triton, eps=EPS, scale=SCALE)
  exported = export_for(
      "cuda", fn, spec((16, 32 + 2 * 4, 128), bf16), spec((16, 160, 4, 128), bf16),
      spec((16, 160, 4, 128), bf16),
      spec((16, 160), jnp.bool_), spec((), i32), spec((16,), i32),
      spec((64,), jnp.float32), spec((128,), bf16), spec((128,), bf16))
  module = exported.mlir_module()
  assert "__gpu$xla.gpu.triton" in module
  # bf16 norm weights go in as stored: no f32 copies made outside the kernel.
  assert "tensor<128xf32>" not in module


def test_qkv_partials_lower_for_cuda():
  """Qwen3-30B-A3B at B = 16 with its q/k/v dot's four split-K partials: bf16 out."""
  spec = jax.ShapeDtypeStruct
  bf16, i32 = jnp.bfloat16, jnp.int32
  fn = functools.partial(decode_attention_triton, eps=EPS, scale=SCALE,
                         activation_dtype=bf16)
  exported = export_for(
      "cuda", fn, spec((4, 16, 32 + 2 * 4, 128), jnp.float32),
      spec((16, 160, 4, 128), bf16), spec((16, 160, 4, 128), bf16),
      spec((16, 160), jnp.bool_), spec((), i32), spec((16,), i32),
      spec((64,), jnp.float32), spec((128,), bf16), spec((128,), bf16))
  assert "__gpu$xla.gpu.triton" in exported.mlir_module()
  assert exported.out_avals[0].shape == (16, 32, 128)
  assert exported.out_avals[0].dtype == bf16


@pytest.mark.parametrize("biased", [False, True])
def test_folded_norm_lowers_for_cuda(biased):
  """Qwen3-30B-A3B at B = 16 with its input RMSNorm folded: the residual rows [16, 2048]
  go into the kernel (and, as for Qwen1.5, the q, k and v biases [32 | 4 | 4, 128])."""
  spec = jax.ShapeDtypeStruct
  bf16, i32 = jnp.bfloat16, jnp.int32
  fn = functools.partial(decode_attention_triton, eps=EPS, scale=SCALE,
                         activation_dtype=bf16, folded_norm_eps=EPS)
  biases = [spec((32, 128), bf16), spec((4, 128), bf16), spec((4, 128), bf16)]
  extra = [spec((16, 2048), bf16)] + (biases if biased else [])
  exported = export_for(
      "cuda", lambda *a: fn(*a[:9], folded_norm_x=a[9],
                            qkv_bias=tuple(a[10:13]) if biased else None),
      spec((4, 16, 32 + 2 * 4, 128), jnp.float32),
      spec((16, 160, 4, 128), bf16), spec((16, 160, 4, 128), bf16),
      spec((16, 160), jnp.bool_), spec((), i32), spec((16,), i32),
      spec((64,), jnp.float32), spec((128,), bf16), spec((128,), bf16), *extra)
  module = exported.mlir_module()
  assert "__gpu$xla.gpu.triton" in module
  assert "tensor<16x2048xbf16>" in module
  assert ("tensor<32x128xbf16>" in module) == biased
  assert ("tensor<4x128xbf16>" in module) == biased


def test_split_cache_lowers_for_cuda():
  """B = 1 over a 4096-slot cache: the default splits the cache, and the kernel writes
  float32 partial sums for the merge."""
  spec = jax.ShapeDtypeStruct
  bf16, i32 = jnp.bfloat16, jnp.int32
  splits = attention_triton.default_splits(batch=1, kv_heads=4, cache_len=4096)
  assert splits > 1
  fn = functools.partial(decode_attention_triton, eps=EPS, scale=SCALE)
  module = export_for(
      "cuda", fn, spec((1, 32 + 2 * 4, 128), bf16), spec((1, 4096, 4, 128), bf16),
      spec((1, 4096, 4, 128), bf16), spec((1, 4096), jnp.bool_), spec((), i32),
      spec((1,), i32), spec((64,), jnp.float32), spec((128,), bf16),
      spec((128,), bf16)).mlir_module()
  assert "__gpu$xla.gpu.triton" in module
  assert f"tensor<1x{splits}x32x128xf32>" in module


# ---------------------------------------------------------------- in the Qwen models


# Head dims of 16 (the kernel's smallest tile): Qwen3 with q/k norm and grouped
# queries, Qwen2 with q/k/v biases and one KV head per query head.
_QWEN3 = dict(model_type="qwen3_moe", vocab_size=40, hidden_size=32, intermediate_size=24,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              num_local_experts=6, num_experts_per_tok=2, moe_intermediate_size=8,
              hidden_act="silu", rms_norm_eps=1e-6,
              rope_parameters={"rope_type": "default", "rope_theta": 1e6},
              norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
              tie_word_embeddings=True, attention_bias=False)
_QWEN2 = dict(model_type="qwen2_moe", vocab_size=40, hidden_size=32, intermediate_size=24,
              num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
              num_experts=6, num_experts_per_tok=2, moe_intermediate_size=8,
              shared_expert_intermediate_size=12, hidden_act="silu", rms_norm_eps=1e-6,
              rope_theta=10000.0, mlp_only_layers=[], decoder_sparse_step=1,
              use_sliding_window=False, tie_word_embeddings=False)


@pytest.mark.parametrize("hf", [_QWEN3, _QWEN2], ids=["qwen3", "qwen2"])
def test_model_generates_the_same_tokens(hf):
  """Greedy generation (left-padded prompts of different lengths) with the kernel in
  every decode step gives the XLA attention's tokens and decode statistics."""
  prompts = [[1, 2, 3, 4, 5, 6], [7, 8], [9, 10, 11]]
  want = generation.generate(random_qwen(hf, attention_impl="xla"), prompts,
                             max_new_tokens=5)
  got = generation.generate(random_qwen(hf, attention_impl="interpret"), prompts,
                            max_new_tokens=5)
  assert got.tokens == want.tokens
  np.testing.assert_allclose(got.decode_stats, want.decode_stats)


def test_model_hands_the_kernel_qkv_partials_and_its_input_norm(monkeypatch):
  """The Qwen models give the kernel their projection dot's split-K partials, with the
  input RMSNorm folded past the dot (the residual rows go in) and, for Qwen2, the
  q/k/v biases. One sequence decodes beside a padding row
  (`generation.MIN_DECODE_ROWS`) and generates the XLA attention's tokens."""
  seen = []
  kernel = attention_triton.decode_attention_triton

  def spy(qkv, *args, **kw):
    bias = kw["qkv_bias"]
    seen.append((qkv.ndim, kw["folded_norm_x"].shape,
                 None if bias is None else tuple(b.shape for b in bias)))
    return kernel(qkv, *args, **kw)

  monkeypatch.setattr(attention_triton, "decode_attention_triton", spy)
  for hf in (_QWEN3, _QWEN2):
    head_dim = hf.get("head_dim", hf["hidden_size"] // hf["num_attention_heads"])
    bias = tuple((heads, head_dim) for heads in (
        hf["num_attention_heads"], hf["num_key_value_heads"], hf["num_key_value_heads"]))
    for prompts in ([[1, 2, 3], [4]], [[5, 6, 7, 8]]):
      seen.clear()
      got = generation.generate(random_qwen(hf, attention_impl="interpret"), prompts,
                                max_new_tokens=4)
      rows = max(len(prompts), generation.MIN_DECODE_ROWS)
      want_seen = (4, (rows, hf["hidden_size"]), bias if hf is _QWEN2 else None)
      assert seen and set(seen) == {want_seen}, hf["model_type"]
      if len(prompts) == 1:
        want = generation.generate(random_qwen(hf, attention_impl="xla"), prompts,
                                   max_new_tokens=4)
        assert got.tokens == want.tokens, hf["model_type"]


def test_model_with_split_caches_generates_the_same_tokens(monkeypatch):
  """As above with every cache shared among several programs per sequence: with 4-slot
  splits `default_splits` splits the caches of 10 or more slots (a batch of four, so
  no compiled step of another test is reused), and the merge is traced."""
  monkeypatch.setitem(attention_triton.SPLITS, "min_slots", 4)
  merged = []
  combine = attention_triton.combine_splits
  monkeypatch.setattr(attention_triton, "combine_splits",
                      lambda acc, *args: merged.append(acc.shape[1]) or combine(acc, *args))
  prompts = [[1, 2, 3, 4, 5, 6], [7, 8], [9, 10, 11], [12]]
  want = generation.generate(random_qwen(_QWEN3, attention_impl="xla"), prompts,
                             max_new_tokens=5)
  got = generation.generate(random_qwen(_QWEN3, attention_impl="interpret"), prompts,
                            max_new_tokens=5)
  assert merged and min(merged) >= 2  # every traced decode attention was split
  assert got.tokens == want.tokens
  np.testing.assert_allclose(got.decode_stats, want.decode_stats)


def test_model_rejects_unknown_attention_impl():
  with pytest.raises(ValueError, match="attention_impl must be one of"):
    random_qwen(_QWEN3, attention_impl="flash")


def test_auto_attention_is_the_kernel_on_gpu_only(monkeypatch):
  here = "triton" if jax.default_backend() == "gpu" else "xla"
  assert layers.resolve_attention_impl("auto") == here  # this machine
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  assert layers.resolve_attention_impl("auto") == "xla"
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert layers.resolve_attention_impl("auto") == "triton"
  assert layers.resolve_attention_impl("xla") == "xla"

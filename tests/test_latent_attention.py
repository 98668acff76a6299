"""The latent-attention op (`sere_jax.kernels.latent_attention`): every kernel backend
that runs here (interpret mode on a CPU, Triton on a GPU) against its reference, the
reference against attention over the expanded per-head keys and values, bad input,
and the Triton kernel's CUDA lowering."""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sere_jax.kernels import latent_attention as latent_op
from sere_jax.kernels import registry
from sere_jax.kernels.latent_attention import triton as latent_triton
from sere_jax.kernels.latent_attention.triton import latent_attention_triton
from sere_jax.kernels.lowering_check import export_for
from sere_jax.models.layers import attend
from tests import kernel_backends

SCALE = 0.3
F32_TOLERANCE = kernel_backends.f32_tolerance(rtol=1e-5, atol=1e-5,
                                              tf32=kernel_backends.TF32_UNIT_TOLERANCE)


def _case(rng, *, batch, heads, rank, rope, cache_len, index, dtype, cache_dtype=None):
  """Queries, a latent cache and a mask that sees a random ~70 % of the slots up to
  `index` (the new token's slot always)."""
  cache_dtype = cache_dtype or dtype
  normal = lambda shape, dt: jnp.asarray(rng.normal(size=shape), dt)
  slots = np.arange(cache_len)
  visible = (rng.random((batch, cache_len)) < 0.7) & (slots <= index) | (slots == index)
  return (normal((batch, heads, rank), dtype), normal((batch, heads, rope), dtype),
          normal((batch, cache_len, rank), cache_dtype),
          normal((batch, cache_len, rope), cache_dtype), jnp.asarray(visible),
          jnp.int32(index))


# heads, rank, rope, cache_len, block_s, splits, index, dtype, cache dtype
CASES = {
    "v2_lite_like_bf16": (16, 64, 16, 50, 16, 1, 37, jnp.bfloat16, None),
    "odd_widths_f32": (3, 24, 4, 21, 16, 1, 20, jnp.float32, None),     # padded tiles
    "many_heads_f32": (20, 16, 16, 40, 32, 1, 39, jnp.float32, None),   # two head blocks
    "first_slot_f32": (2, 32, 8, 24, 16, 1, 0, jnp.float32, None),
    "f32_queries_bf16_cache": (4, 32, 16, 33, 16, 1, 32, jnp.float32, jnp.bfloat16),
    "three_splits_f32": (20, 24, 8, 70, 16, 3, 66, jnp.float32, None),
    "splits_past_the_end_bf16": (4, 32, 16, 64, 16, 4, 17, jnp.bfloat16, None),
}


@kernel_backends.over_implementations(latent_op.REGISTRY)
@pytest.mark.parametrize("case", CASES)
def test_matches_reference(case, implementation):
  heads, rank, rope, cache_len, block_s, splits, index, dtype, cache_dtype = CASES[case]
  rng = np.random.default_rng(sum(map(ord, case)))
  args = _case(rng, batch=3, heads=heads, rank=rank, rope=rope, cache_len=cache_len,
               index=index, dtype=dtype, cache_dtype=cache_dtype)
  got = latent_op.latent_attention(*args, scale=SCALE, block_s=block_s, splits=splits,
                                   implementation=implementation)
  want = latent_op.latent_attention_reference(*args, scale=SCALE)
  assert got.shape == want.shape == (3, heads, rank) and got.dtype == want.dtype == dtype
  exact = dtype == jnp.float32 and cache_dtype is None
  tol = F32_TOLERANCE if exact else dict(rtol=2e-2, atol=2e-2)
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             **tol)


@kernel_backends.over_implementations(latent_op.REGISTRY)
@pytest.mark.parametrize("splits", [1, 2])
def test_sequence_with_nothing_visible_is_zero(splits, implementation):
  rng = np.random.default_rng(0)
  args = list(_case(rng, batch=2, heads=4, rank=16, rope=16, cache_len=40, index=35,
                    dtype=jnp.float32))
  args[4] = args[4].at[1].set(False)  # sequence 1 sees no slot (not even its own)
  got = latent_op.latent_attention(*args, scale=SCALE, block_s=16, splits=splits,
                                   implementation=implementation)
  np.testing.assert_array_equal(np.asarray(got[1]), 0.0)
  want = latent_op.latent_attention_reference(*args, scale=SCALE)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), **F32_TOLERANCE)


@kernel_backends.over_implementations(latent_op.REGISTRY)
def test_slots_after_the_new_token_are_not_read(implementation):
  """The kernel reads the blocks up to `cache_index` only: NaNs after it change
  nothing (the mask never shows those slots)."""
  rng = np.random.default_rng(1)
  args = list(_case(rng, batch=2, heads=4, rank=16, rope=16, cache_len=64, index=9,
                    dtype=jnp.float32))
  want = latent_op.latent_attention_reference(*args, scale=SCALE)
  args[2] = args[2].at[:, 32:].set(jnp.nan)
  args[3] = args[3].at[:, 32:].set(jnp.nan)
  got = latent_op.latent_attention(*args, scale=SCALE, block_s=16,
                                   implementation=implementation)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), **F32_TOLERANCE)


def test_reference_is_attention_over_expanded_keys_and_values():
  """Absorbing `kv_b_proj` into the query and the output gives per-head attention over
  the keys and values the latents expand to."""
  b, s, h, rank, nope, rope, dv = 2, 6, 3, 8, 4, 2, 5
  keys = jax.random.split(jax.random.key(0), 6)
  q_nope = jax.random.normal(keys[0], (b, h, nope))
  q_pe = jax.random.normal(keys[1], (b, h, rope))
  latent = jax.random.normal(keys[2], (b, s, rank))
  k_pe = jax.random.normal(keys[3], (b, s, rope))
  w_k = jax.random.normal(keys[4], (rank, h, nope))
  w_v = jax.random.normal(keys[5], (rank, h, dv))
  visible = jnp.asarray(np.random.default_rng(0).random((b, s)) < 0.7).at[1].set(False)
  k = jnp.concatenate([jnp.einsum("bsr,rhn->bshn", latent, w_k),
                       jnp.broadcast_to(k_pe[:, :, None], (b, s, h, rope))], axis=-1)
  v = jnp.einsum("bsr,rhv->bshv", latent, w_v)
  want = attend(jnp.concatenate([q_nope, q_pe], -1)[:, None], k, v, visible[:, None],
                SCALE)[:, 0]
  q_latent = jnp.einsum("bhn,rhn->bhr", q_nope, w_k)
  out = latent_op.latent_attention_reference(q_latent, q_pe, latent, k_pe, visible,
                                             jnp.int32(s - 1), scale=SCALE)
  got = jnp.einsum("bhr,rhv->bhv", out, w_v)
  np.testing.assert_allclose(got, want, **kernel_backends.f32_tolerance(rtol=1e-5, atol=1e-5))
  np.testing.assert_array_equal(got[1], 0.0)  # no visible slot: zeros, not NaN


@pytest.mark.parametrize("edit,match", [
    (dict(q_pe=(2, 3, 8)), r"q_pe must be \[2, 4, 16\]"),
    (dict(latent=(2, 11, 16)), r"k_pe must be \[2, 11, 16\]"),
    (dict(visible=(2, 11)), r"visible must be \[2, 10\]"),
    (dict(block_s=24), "block_s must be a power of two >= 16, got 24"),
    (dict(block_h=8), "block_h must be a power of two >= 16, got 8"),
    (dict(splits=0), "splits must be a positive integer, got 0"),
    (dict(q_latent=(2, 16)), r"q_latent must be \[B, H, R\] and latent \[B, S, R\]"),
])
def test_rejects_bad_input(edit, match):
  shapes = dict(q_latent=(2, 4, 16), q_pe=(2, 4, 16), latent=(2, 10, 16),
                k_pe=(2, 10, 16), visible=(2, 10))
  shapes.update({k: v for k, v in edit.items() if k in shapes})
  arrays = {k: jnp.zeros(v, bool if k == "visible" else jnp.float32)
            for k, v in shapes.items()}
  options = {k: v for k, v in edit.items() if k not in shapes}
  with pytest.raises(ValueError, match=match):
    latent_attention_triton(*arrays.values(), jnp.int32(3), scale=SCALE, interpret=True,
                            **options)


def test_unsupported_names_the_array():
  q, cache = jnp.zeros((2, 4, 16), jnp.bfloat16), jnp.zeros((2, 8, 16), jnp.float32)
  assert latent_triton.unsupported(q, q, cache, cache) is None
  assert "not latent in int8" in latent_triton.unsupported(q, q, cache.astype(jnp.int8),
                                                          cache)


@kernel_backends.over_implementations(latent_op.REGISTRY)
def test_inputs_the_kernel_cannot_take_run_xla_with_one_log_line(implementation, caplog,
                                                                 monkeypatch):
  """Whatever `unsupported` names (here every input), the op runs the reference and
  says why, once."""
  monkeypatch.setattr(latent_triton, "unsupported", lambda *arrays: "takes none of these")
  args = _case(np.random.default_rng(2), batch=2, heads=4, rank=16, rope=16, cache_len=16,
               index=7, dtype=jnp.float32)
  registry._LOGGED.clear()
  with caplog.at_level(logging.WARNING, logger="sere_jax.kernels"):
    got = [latent_op.latent_attention(*args, scale=SCALE, implementation=implementation)
           for _ in range(2)]
  want = latent_op.latent_attention_reference(*args, scale=SCALE)
  for g in got:
    np.testing.assert_array_equal(np.asarray(g), np.asarray(want))
  logged = [r.getMessage() for r in caplog.records if "latent_attention" in r.getMessage()]
  assert logged == [f"latent_attention ({implementation}): the Triton kernel takes none "
                    "of these; running the XLA reference"]


def test_unknown_implementation_is_named():
  with pytest.raises(ValueError, match="implementation must be one of"):
    latent_op.latent_attention(*_case(np.random.default_rng(3), batch=1, heads=2, rank=16,
                                      rope=16, cache_len=4, index=1, dtype=jnp.float32),
                               scale=SCALE, implementation="cuda")


def test_default_config_fills_small_grids_with_splits():
  """`(block_s, splits)`: 32-slot blocks split up to 64 programs, at most one split
  per block of the cache; 64 programs or more run unsplit over 64-slot blocks."""
  assert latent_triton.default_config(1, 1, 160) == (32, 5)
  assert latent_triton.default_config(16, 1, 160) == (32, 4)
  assert latent_triton.default_config(8, 2, 160) == (32, 4)
  assert latent_triton.default_config(64, 1, 160) == (64, 1)
  assert latent_triton.default_config(2, 1, 16) == (32, 1)
  assert latent_triton.default_config(1, 1, 4096) == (32, 64)


@pytest.mark.parametrize("splits", [None, 1, 5])
def test_lowers_for_cuda(splits):
  """DeepSeek-V2-Lite at B = 16 over 160 slots: 16 heads, latent 512, rotary 64 (None:
  the default, 4 splits)."""
  spec = jax.ShapeDtypeStruct
  fn = functools.partial(latent_attention_triton, scale=0.1, splits=splits)
  exported = export_for("cuda", fn, spec((16, 16, 512), jnp.bfloat16),
                        spec((16, 16, 64), jnp.bfloat16), spec((16, 160, 512), jnp.bfloat16),
                        spec((16, 160, 64), jnp.bfloat16), spec((16, 160), jnp.bool_),
                        spec((), jnp.int32))
  assert "__gpu$xla.gpu.triton" in exported.mlir_module()
  assert [a.shape for a in exported.out_avals] == [(16, 16, 512)]

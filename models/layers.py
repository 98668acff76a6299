"""Building blocks shared by the decoder models: norms, RoPE, MLP, cached attention.

The RMSNorm, RoPE, cache-write and attention math are the decode-attention kernel's
reference (`sere_jax.kernels.decode_attention.reference`, a lower floor), so the
models and the kernel's tests share one definition.

Conventions (every model follows them, so one generation loop serves all):
  * Prompts are LEFT-padded to a common length, so a step writes the same cache slot
    `cache_index` for every sequence; `positions [B, L]` count from 0 at each
    sequence's first real token.
  * `KVCache` holds keys and values `[B, S, H_kv, D_head]`; `cache_valid [B, S]` marks
    slots holding real tokens (the attention mask is that and causality).
  * `token_valid [B, L]` marks tokens that count for routing (padding and finished
    sequences do not add experts to SERE's primary set).
"""

from __future__ import annotations

from typing import NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp

from sere_jax.kernels.decode_attention.reference import (apply_rope, attend,
                                                         attend_with_cache,
                                                         masked_softmax, rms_norm,
                                                         update_cache)
from sere_jax.kernels.residual_norm import api as residual_norm_api
from sere_jax.numerics import gemm_dot, mixed_dot_operands, split_k_count, split_k_dot

__all__ = ["KVCache", "Linear", "RMSNorm", "SwiGLU", "add_and_norm", "apply_rope",
           "ATTENTION_IMPLS", "attend", "attention_mask", "cached_attention",
           "linear_param", "masked_softmax", "projection_partials",
           "resolve_attention_impl", "rms_norm", "rope_inv_freq"]

# A model's `attention_impl`: the backend of its fused decode-step kernels (attention,
# residual add + norm); `xla` is the unfused path of jnp building blocks.
ATTENTION_IMPLS = ("auto", "xla", "triton", "interpret")


class KVCache(NamedTuple):
  """One layer's keys and values, `[B, S, H_kv, D]` each."""

  k: jax.Array
  v: jax.Array

  @classmethod
  def zeros(cls, batch: int, length: int, kv_heads: int, k_dim: int, v_dim: int,
            dtype) -> KVCache:
    return cls(jnp.zeros((batch, length, kv_heads, k_dim), dtype),
               jnp.zeros((batch, length, kv_heads, v_dim), dtype))

  def update(self, k: jax.Array, v: jax.Array, index: jax.Array) -> KVCache:
    """Writes `k, v [B, L, H_kv, D]` at slots `[index, index + L)`."""
    return KVCache(*update_cache(self.k, self.v, k, v, index))


class RMSNorm(nnx.Module):
  """RMS normalisation in float32 with a learned scale (HF `*RMSNorm`)."""

  def __init__(self, dim: int, eps: float = 1e-6, param_dtype=jnp.float32):
    self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    return rms_norm(x, self.weight[...], self.eps)


def linear_param(rngs: nnx.Rngs, shape: tuple[int, ...], param_dtype) -> nnx.Param:
  """A weight `[in, out]` (or `[..., in, out]`) initialised with std 1/sqrt(in)."""
  return nnx.Param(nnx.initializers.normal(stddev=shape[-2] ** -0.5)(
      rngs.params(), shape, param_dtype))


class Linear(nnx.Module):
  """`x @ kernel (+ bias)`; kernel stored `[in, out]` (HF's transposed)."""

  def __init__(self, d_in: int, d_out: int, *, bias: bool = False, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.kernel = linear_param(rngs, (d_in, d_out), param_dtype)
    self.bias = nnx.Param(jnp.zeros((d_out,), param_dtype)) if bias else None

  def __call__(self, x: jax.Array) -> jax.Array:
    y = gemm_dot(x, self.kernel[...].astype(x.dtype))
    return y if self.bias is None else y + self.bias[...].astype(x.dtype)


def resolve_attention_impl(attention_impl: str) -> str:
  """Validates a model's `attention_impl` (one of `ATTENTION_IMPLS`) and maps `auto` to
  `triton` on GPUs and `xla` (the jnp references, with the unfused model path) on
  other backends."""
  if attention_impl not in ATTENTION_IMPLS:
    raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, "
                     f"got {attention_impl!r}")
  if attention_impl != "auto":
    return attention_impl
  return "triton" if jax.default_backend() == "gpu" else "xla"


def projection_partials(x: jax.Array, proj: Linear) -> jax.Array:
  """`proj(x)` of one token per sequence, `x [B, K]`, as float32 split-K partials
  `[P, B, 1, N]` for `add_and_norm` to sum (`proj` has no bias)."""
  if proj.bias is not None:
    raise ValueError("projection_partials takes a projection without a bias")
  weight = proj.kernel[...].astype(x.dtype)
  parts = split_k_dot(*mixed_dot_operands(x, weight), split_k_count(*weight.shape))
  return parts.reshape(-1, x.shape[0], 1, weight.shape[1])


def add_and_norm(x: jax.Array, update: jax.Array, norm: RMSNorm, *,
                 implementation: str) -> tuple[jax.Array, jax.Array]:
  """The residual add and the pre-norm after it: `(x + update, norm(x + update))`.

  `update` is `[B, L, D]` like `x`, or `projection_partials`' `[P, B, 1, D]`, which the
  `residual_norm` kernel (`implementation`) sums, adds and normalises in one pass.
  """
  if update.ndim > x.ndim:
    return residual_norm_api.residual_norm(x, update, norm.weight[...], eps=norm.eps,
                                           implementation=implementation)
  x = x + update
  return x, norm(x)


class SwiGLU(nnx.Module):
  """Dense gated MLP: `down(silu(gate(x)) * up(x))`."""

  def __init__(self, dim: int, hidden: int, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.gate = Linear(dim, hidden, param_dtype=param_dtype, rngs=rngs)
    self.up = Linear(dim, hidden, param_dtype=param_dtype, rngs=rngs)
    self.down = Linear(hidden, dim, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


def rope_inv_freq(rotary_dim: int, theta: float) -> jax.Array:
  """Standard RoPE inverse frequencies `[rotary_dim // 2]`."""
  return 1.0 / theta ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim)


def attention_mask(cache_valid: jax.Array, cache_index: jax.Array, length: int) -> jax.Array:
  """`[B, L, S]` bool: query `l` (at slot `cache_index + l`) sees valid slots `<=` it."""
  slots = jnp.arange(cache_valid.shape[1])
  query_slots = cache_index + jnp.arange(length)
  causal = slots[None, :] <= query_slots[:, None]  # [L, S]
  return causal[None] & cache_valid[:, None, :]


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, cache: KVCache,
                     mask: jax.Array, cache_index: jax.Array, positions: jax.Array,
                     inv_freq: jax.Array, q_norm: jax.Array | None,
                     k_norm: jax.Array | None, *, eps: float, scale: float
                     ) -> tuple[jax.Array, KVCache]:
  """Attention of `L` new tokens over the cache, with their keys and values written.

  `q [B, L, H, Dk]`, `k [B, L, Hkv, Dk]`, `v [B, L, Hkv, Dv]` come straight from the
  projections: the optional per-head RMSNorm (`q_norm`, `k_norm` weights `[Dk]`) and
  RoPE are applied here. Returns `(out [B, L, H, Dv], cache)`.
  """
  out, k_cache, v_cache = attend_with_cache(q, k, v, cache.k, cache.v, mask, cache_index,
                                            positions, inv_freq, q_norm, k_norm, eps=eps,
                                            scale=scale)
  return out, KVCache(k_cache, v_cache)

"""Decode attention (one new token per sequence) in one Pallas Triton kernel.

For a decode step XLA runs about ten small kernels between the q/k/v projection and
the output projection: per-head q/k RMSNorm, RoPE, two cache updates, the q·k product,
the softmax pieces, the probs·v product and transposes. `decode_attention_triton` does
all of it in one launch. Grid: (batch, kv head). A program normalises and rotates its
query-head group and its new key, writes the new key and value into the cache, and
runs an online-softmax pass over the cache slots up to the current one.

`decode_attention_reference` is the model's XLA path (`models.layers.cached_attention`)
for one token, with the kernel's arguments and results.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from sere_jax.models import layers


def decode_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array,
                               k_cache: jax.Array, v_cache: jax.Array, visible: jax.Array,
                               cache_index: jax.Array, positions: jax.Array,
                               inv_freq: jax.Array, q_norm: jax.Array | None,
                               k_norm: jax.Array | None, *, eps: float, scale: float
                               ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`decode_attention_triton`'s result computed by the model's XLA building blocks."""
  out, cache = layers.cached_attention(
      q[:, None], k[:, None], v[:, None], layers.KVCache(k_cache, v_cache),
      visible[:, None, :], cache_index, positions[:, None], inv_freq, q_norm, k_norm,
      eps=eps, scale=scale)
  return out[:, 0], cache.k, cache.v


def _kernel(q_ref, k_ref, v_ref, visible_ref, index_ref, positions_ref, freq_ref,
            q_norm_ref, k_norm_ref, k_cache_in, v_cache_in, out_ref, k_cache_ref,
            v_cache_ref, *, group, group_pad, head_dim, v_dim, cache_len, block_s, eps,
            scale, qk_norm, interpret):
  del k_cache_in, v_cache_in  # aliased to k_cache_ref, v_cache_ref
  b, g = pl.program_id(0), pl.program_id(1)
  r = jnp.arange(group_pad)
  r_ok = r < group
  d = jnp.arange(head_dim)
  dv = jnp.arange(v_dim)
  half = head_dim // 2
  partner = (d + half) % head_dim  # rotate-half: x * cos + [-x2, x1] * sin
  sign = jnp.where(d < half, -1.0, 1.0)
  index = index_ref[0]
  angle = plt.load(positions_ref.at[b]).astype(jnp.float32) * plt.load(
      freq_ref.at[d % half])
  cos, sin = jnp.cos(angle), jnp.sin(angle)

  def norm_rope(x, x_partner, norm_ref, dtype):
    """RMSNorm (rounded to the activation dtype, as the model does), then RoPE."""
    x, x_partner = x.astype(jnp.float32), x_partner.astype(jnp.float32)
    if qk_norm:
      inv = jax.lax.rsqrt(jnp.mean(x * x, axis=-1) + eps)
      inv = inv[:, None] if x.ndim == 2 else inv
      weight = plt.load(norm_ref.at[d]).astype(jnp.float32)
      weight_partner = plt.load(norm_ref.at[partner]).astype(jnp.float32)
      x = (x * inv * weight).astype(dtype).astype(jnp.float32)
      x_partner = (x_partner * inv * weight_partner).astype(dtype).astype(jnp.float32)
    return (x * cos + sign * x_partner * sin).astype(dtype)

  heads = g * group + r
  q = norm_rope(plt.load(q_ref.at[b, heads[:, None], d[None, :]], mask=r_ok[:, None],
                         other=0),
                plt.load(q_ref.at[b, heads[:, None], partner[None, :]],
                         mask=r_ok[:, None], other=0),
                q_norm_ref, q_ref.dtype).astype(k_cache_ref.dtype)  # [group_pad, Dk]
  k_new = norm_rope(plt.load(k_ref.at[b, g, d]), plt.load(k_ref.at[b, g, partner]),
                    k_norm_ref, k_ref.dtype).astype(k_cache_ref.dtype)
  v_new = plt.load(v_ref.at[b, g, dv]).astype(v_cache_ref.dtype)
  plt.store(k_cache_ref.at[b, index, g, d], k_new)
  plt.store(v_cache_ref.at[b, index, g, dv], v_new)

  def block(i, carry):
    m, l, acc = carry
    s = i * block_s + jnp.arange(block_s)
    s_ok = s < cache_len
    keys = plt.load(k_cache_ref.at[b, s[None, :], g, d[:, None]], mask=s_ok[None, :],
                    other=0)  # [Dk, block_s]
    values = plt.load(v_cache_ref.at[b, s[:, None], g, dv[None, :]], mask=s_ok[:, None],
                      other=0)  # [block_s, Dv]
    # The slot written above is taken from registers: no read-after-write ordering.
    keys = jnp.where((s == index)[None, :], k_new[:, None], keys)
    values = jnp.where((s == index)[:, None], v_new[None, :], values)
    lhs, rhs = q, keys
    if interpret:  # CPU dots take no bf16 x bf16 -> f32
      lhs, rhs = lhs.astype(jnp.float32), rhs.astype(jnp.float32)
    logits = jnp.dot(lhs, rhs, preferred_element_type=jnp.float32) * scale
    seen = s_ok & (plt.load(visible_ref.at[b, s], mask=s_ok, other=0) != 0)
    logits = jnp.where(seen[None, :], logits, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(logits, axis=1))
    shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows that saw nothing yet
    p = jnp.exp(logits - shift[:, None])
    alpha = jnp.exp(m - shift)
    probs, vals = p.astype(values.dtype), values
    if interpret:
      probs, vals = probs.astype(jnp.float32), vals.astype(jnp.float32)
    acc = acc * alpha[:, None] + jnp.dot(probs, vals, preferred_element_type=jnp.float32)
    return m_new, l * alpha + jnp.sum(p, axis=1), acc

  init = (jnp.full((group_pad,), -jnp.inf, jnp.float32),
          jnp.zeros((group_pad,), jnp.float32),
          jnp.zeros((group_pad, v_dim), jnp.float32))
  # Slots after the new token are never visible: stop at its block.
  _, l, acc = jax.lax.fori_loop(0, index // block_s + 1, block, init)
  out = jnp.where(l[:, None] > 0, acc / jnp.where(l > 0, l, 1.0)[:, None], 0.0)
  plt.store(out_ref.at[b, heads[:, None], dv[None, :]], out.astype(out_ref.dtype),
            mask=r_ok[:, None])


def _is_pow2(x: int) -> bool:
  return x >= 16 and x & (x - 1) == 0


@functools.partial(jax.jit, static_argnames=("eps", "scale", "block_s", "num_warps",
                                             "interpret"))
def decode_attention_triton(q: jax.Array, k: jax.Array, v: jax.Array, k_cache: jax.Array,
                            v_cache: jax.Array, visible: jax.Array, cache_index: jax.Array,
                            positions: jax.Array, inv_freq: jax.Array,
                            q_norm: jax.Array | None, k_norm: jax.Array | None, *,
                            eps: float, scale: float, block_s: int = 64,
                            num_warps: int = 4, interpret: bool = False
                            ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Attention of one new token per sequence over its KV cache.

  Args:
    q: `[B, H, Dk]`, k: `[B, Hkv, Dk]`, v: `[B, Hkv, Dv]`: the new token's projections
      (before q/k norm and RoPE).
    k_cache: `[B, S, Hkv, Dk]`, v_cache: `[B, S, Hkv, Dv]`; the new k, v are written
      at slot `cache_index` (in place where XLA can alias the buffers).
    visible: `[B, S]` bool, the slots the new token attends to (itself included; no
      slot after `cache_index`).
    positions: `[B]` RoPE positions; inv_freq: `[Dk / 2]` RoPE inverse frequencies.
    q_norm, k_norm: per-head RMSNorm weights `[Dk]` (Qwen3), or both None; any float
      dtype, read as stored and widened in the kernel (an `astype` here would be two
      extra XLA kernels per layer and step).
    eps: the RMSNorm epsilon; scale: the logit scale.

  Returns:
    `(out [B, H, Dv] in q's dtype, k_cache, v_cache)`. Head dims must be powers of two
    of at least 16 (Triton tiles); the query-head group `H / Hkv` is padded to 16 rows
    for the tensor-core dots.
  """
  batch, heads, head_dim = q.shape
  kv_heads, v_dim = v.shape[1], v.shape[2]
  cache_len = k_cache.shape[1]
  if k.shape != (batch, kv_heads, head_dim) or v.shape[0] != batch or heads % kv_heads:
    raise ValueError(f"q {q.shape}, k {k.shape}, v {v.shape} are not [B, H, Dk], "
                     "[B, Hkv, Dk], [B, Hkv, Dv] with H a multiple of Hkv")
  if k_cache.shape != (batch, cache_len, kv_heads, head_dim) or v_cache.shape != (
      batch, cache_len, kv_heads, v_dim):
    raise ValueError(f"cache shapes {k_cache.shape}, {v_cache.shape} do not fit "
                     f"[B, S, Hkv, D] for q {q.shape} and v {v.shape}")
  if visible.shape != (batch, cache_len):
    raise ValueError(f"visible must be [B, S] = {(batch, cache_len)}, got {visible.shape}")
  if not (_is_pow2(head_dim) and _is_pow2(v_dim) and _is_pow2(block_s)):
    raise ValueError(f"head dims ({head_dim}, {v_dim}) and block_s ({block_s}) must be "
                     "powers of two >= 16")
  if inv_freq.shape != (head_dim // 2,):
    raise ValueError(f"inv_freq must be [{head_dim // 2}] (RoPE over the whole head), "
                     f"got {inv_freq.shape}")
  qk_norm = q_norm is not None
  if qk_norm != (k_norm is not None):
    raise ValueError("q_norm and k_norm must both be given or both be None")
  if not qk_norm:
    q_norm = k_norm = jnp.zeros((head_dim,), jnp.float32)  # unused placeholders
  group = heads // kv_heads
  kernel = functools.partial(
      _kernel, group=group, group_pad=max(16, 1 << (group - 1).bit_length()),
      head_dim=head_dim, v_dim=v_dim, cache_len=cache_len, block_s=block_s, eps=eps,
      scale=scale, qk_norm=qk_norm, interpret=bool(interpret))
  return pl.pallas_call(
      kernel,
      grid=(batch, kv_heads),
      out_shape=(jax.ShapeDtypeStruct((batch, heads, v_dim), q.dtype),
                 jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
                 jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype)),
      input_output_aliases={9: 1, 10: 2},
      compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=2),
      interpret=interpret,
      name="sere_decode_attention",
  )(q, k, v, visible.astype(jnp.int32), jnp.reshape(cache_index, (1,)).astype(jnp.int32),
    positions.astype(jnp.int32), inv_freq.astype(jnp.float32),
    q_norm, k_norm, k_cache, v_cache)

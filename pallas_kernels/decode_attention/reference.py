"""Attention over a KV cache in jnp: the reference of the decode-attention kernel.

The models' attention is built from these functions (`sere_jax.models.layers` imports
them): per-head RMSNorm, RoPE (rotate-half layout), the cache write and grouped-query
attention. `decode_attention_reference` applies them to one new token per sequence,
with the kernel's arguments and results (the new token's projections whole, or as
split-K partials: `qkv_partials`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sere_jax.numerics import mixed_dot_operands, sum_partials

# The q/k/v projections' biases as the model holds them, `(q [H, D], k [Hkv, D],
# v [Hkv, D])`: three arrays, since concatenating them would be one more kernel in
# every decode step (XLA keeps that concatenation inside the decode loop on GPUs).
QkvBias = tuple[jax.Array, jax.Array, jax.Array]


def inverse_rms(x: jax.Array, eps: float) -> jax.Array:
  """`1 / rms(x)` over the last axis in float32 (`rms_norm`'s factor)."""
  xf = x.astype(jnp.float32)
  return jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1) + eps)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  """`weight * x / rms(x)` over the last axis, in float32, returned in x's dtype."""
  xf = x.astype(jnp.float32) * inverse_rms(x, eps)[..., None]
  return (weight.astype(jnp.float32) * xf).astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array,
               scale: float = 1.0) -> jax.Array:
  """Rotates `x [B, L, H, R]` by `positions [B, L]` (rotate-half layout, as HF Llama/Qwen).

  `scale` multiplies cos and sin (YaRN's attention factor).
  """
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, L, R/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(angles) * scale, jnp.sin(angles) * scale
  xf = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
  return (xf * cos + rotated * sin).astype(x.dtype)


def masked_softmax(logits: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
  """Float32 softmax over the last axis of `logits * scale` where `mask` (broadcast to
  the logits) is set; a row with no visible slot is all zeros, not NaN."""
  probs = jax.nn.softmax(jnp.where(mask, logits * scale, -jnp.inf), axis=-1)
  return jnp.where(jnp.isnan(probs), 0.0, probs)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float
           ) -> jax.Array:
  """Grouped-query attention. `q [B, L, H, Dk]`, `k [B, S, Hkv, Dk]`, `v [B, S, Hkv, Dv]`,
  `mask [B, L, S]` -> `[B, L, H, Dv]` in q's dtype. Products accumulate in float32
  and the softmax is float32; the cache is read in its own dtype (no f32 copy)."""
  b, l, h, dk = q.shape
  kv_heads, dtype = k.shape[2], q.dtype
  q, k = mixed_dot_operands(q.reshape(b, l, kv_heads, h // kv_heads, dk).astype(k.dtype), k)
  logits = jnp.einsum("blgrd,bsgd->bgrls", q, k, preferred_element_type=jnp.float32)
  probs = masked_softmax(logits, mask[:, None, None], scale)
  probs, v = mixed_dot_operands(probs.astype(v.dtype), v)
  out = jnp.einsum("bgrls,bsgd->blgrd", probs, v, preferred_element_type=jnp.float32)
  return out.reshape(b, l, h, v.shape[-1]).astype(dtype)


def update_cache(k_cache: jax.Array, v_cache: jax.Array, k: jax.Array, v: jax.Array,
                 index: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Writes `k, v [B, L, H_kv, D]` into the caches `[B, S, H_kv, D]` at slots
  `[index, index + L)`, in the caches' dtypes."""
  start = (0, index, 0, 0)
  return (jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), start),
          jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), start))


def attend_with_cache(q: jax.Array, k: jax.Array, v: jax.Array, k_cache: jax.Array,
                      v_cache: jax.Array, mask: jax.Array, cache_index: jax.Array,
                      positions: jax.Array, inv_freq: jax.Array, q_norm: jax.Array | None,
                      k_norm: jax.Array | None, *, eps: float, scale: float
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Attention of `L` new tokens over the cache, with their keys and values written.

  `q [B, L, H, Dk]`, `k [B, L, Hkv, Dk]`, `v [B, L, Hkv, Dv]` come straight from the
  projections: the optional per-head RMSNorm (`q_norm`, `k_norm` weights `[Dk]`) and
  RoPE are applied here. `mask [B, L, S]`. Returns `(out [B, L, H, Dv], k_cache,
  v_cache)`.
  """
  if q_norm is not None:
    q, k = rms_norm(q, q_norm, eps), rms_norm(k, k_norm, eps)
  q = apply_rope(q, positions, inv_freq)
  k = apply_rope(k, positions, inv_freq)
  k_cache, v_cache = update_cache(k_cache, v_cache, k, v, cache_index)
  return attend(q, k_cache, v_cache, mask, scale), k_cache, v_cache


def num_query_heads(qkv: jax.Array, k_cache: jax.Array, v_cache: jax.Array) -> int:
  """The number of query heads `H` in `qkv [B, H + 2 * Hkv, D]` for caches
  `[B, S, Hkv, D]`; raises ValueError on any other layout."""
  if qkv.ndim != 3 or k_cache.ndim != 4:
    raise ValueError(f"qkv {qkv.shape} and k_cache {k_cache.shape} are not "
                     "[B, H + 2 * Hkv, D] and [B, S, Hkv, D]")
  batch, qkv_heads, head_dim = qkv.shape
  _, cache_len, kv_heads, key_dim = k_cache.shape
  if v_cache.ndim == 4 and v_cache.shape[-1] != key_dim:
    raise ValueError(f"key and value head dims differ (k_cache {k_cache.shape}, v_cache "
                     f"{v_cache.shape}): one qkv array needs Dk == Dv")
  want = (batch, cache_len, kv_heads, head_dim)
  if k_cache.shape != want or v_cache.shape != want:
    raise ValueError(f"cache shapes {k_cache.shape}, {v_cache.shape} are not "
                     f"[B, S, Hkv, D] with B, D = {batch}, {head_dim} from qkv {qkv.shape}")
  heads = qkv_heads - 2 * kv_heads
  if kv_heads < 1 or heads < 1 or heads % kv_heads:
    raise ValueError(f"qkv has {qkv_heads} heads, not H + 2 * Hkv with Hkv = {kv_heads} "
                     "(the caches' KV heads) and H a positive multiple of Hkv")
  return heads


def qkv_partials(qkv: jax.Array, activation_dtype=None) -> tuple[int, jnp.dtype]:
  """`(P, dtype)` of the new token's projections: `qkv [B, H + 2 * Hkv, D]` as one
  array (P = 1, its own dtype; `activation_dtype` None or the same), or float32
  split-K partials `[P, B, H + 2 * Hkv, D]` of the projection dot
  (`sere_jax.numerics.split_k_dot`) whose sum, rounded to `activation_dtype` (the
  unsplit dot's output dtype), is that array. Raises ValueError otherwise."""
  if qkv.ndim == 4:
    if qkv.dtype != jnp.float32 or activation_dtype is None:
      raise ValueError("qkv partials [P, B, H + 2 * Hkv, D] must be float32 and come "
                       f"with an activation_dtype, got {qkv.dtype} and {activation_dtype}")
    return qkv.shape[0], jnp.dtype(activation_dtype)
  if activation_dtype is not None and jnp.dtype(activation_dtype) != qkv.dtype:
    raise ValueError(f"activation_dtype {activation_dtype} is for qkv partials; qkv "
                     f"{qkv.shape} is one array in {qkv.dtype}")
  return 1, qkv.dtype


def folded_norm_weight(x: jax.Array, weight: jax.Array) -> jax.Array:
  """`x * weight` in x's dtype: the input of a projection whose RMSNorm is folded past
  the dot, `rms_norm(x, weight) @ W == (x * weight) @ W / rms(x)` (the row's factor
  `1 / rms(x)` is applied to the dot's result: `folded_norm_x`)."""
  return (x.astype(jnp.float32) * weight.astype(jnp.float32)).astype(x.dtype)


def _check_bias(qkv_bias: QkvBias, rows: int, head_dim: int, kv_heads: int | None) -> None:
  """Raises ValueError unless `qkv_bias` is `([H, D], [Hkv, D], [Hkv, D])` with
  `H + 2 * Hkv = rows` (and `Hkv = kv_heads` where given)."""
  shapes = (tuple(getattr(b, "shape", None) for b in qkv_bias)
            if isinstance(qkv_bias, (tuple, list)) else getattr(qkv_bias, "shape", None))
  ok = (isinstance(shapes, tuple) and len(shapes) == 3
        and all(isinstance(s, tuple) and len(s) == 2 and s[1] == head_dim for s in shapes)
        and shapes[1] == shapes[2] and sum(s[0] for s in shapes) == rows
        and kv_heads in (None, shapes[1][0]))
  if not ok:
    raise ValueError(f"qkv_bias must be the query, key and value biases ([H, D], [Hkv, D], "
                     f"[Hkv, D]) of qkv's H + 2 * Hkv = {rows} heads of D = {head_dim}, "
                     f"got {shapes}")


def check_projection_args(qkv: jax.Array, folded_norm_x: jax.Array | None,
                          folded_norm_eps: float | None,
                          qkv_bias: QkvBias | None, kv_heads: int | None = None) -> None:
  """Raises ValueError unless `folded_norm_x` is None (with no eps) or `[B, D_model]`
  for `qkv`'s B with an eps, and `qkv_bias` is None or the query, key and value biases
  `([H, D], [Hkv, D], [Hkv, D])` of `qkv`'s `H + 2 * Hkv` heads (`Hkv` = `kv_heads`
  where given)."""
  if qkv_bias is not None:
    _check_bias(qkv_bias, *qkv.shape[-2:], kv_heads)
  if folded_norm_x is None:
    if folded_norm_eps is not None:
      raise ValueError("folded_norm_eps is given without folded_norm_x")
    return
  batch = qkv.shape[-3]
  if folded_norm_x.ndim != 2 or folded_norm_x.shape[0] != batch:
    raise ValueError(f"folded_norm_x must be [B, D_model] with B = {batch}, got "
                     f"{folded_norm_x.shape}")
  if folded_norm_eps is None:
    raise ValueError("folded_norm_x needs its RMSNorm's folded_norm_eps")


def whole_qkv(qkv: jax.Array, activation_dtype=None, folded_norm_x: jax.Array | None = None,
              folded_norm_eps: float | None = None, qkv_bias: QkvBias | None = None,
              kv_heads: int | None = None) -> jax.Array:
  """`[B, H + 2 * Hkv, D]` from either form of `qkv_partials`: partials summed in order
  in float32, divided by `rms(folded_norm_x)` and added `qkv_bias` when given, and
  rounded to `activation_dtype` (arguments checked by `check_projection_args`)."""
  _, dtype = qkv_partials(qkv, activation_dtype)
  check_projection_args(qkv, folded_norm_x, folded_norm_eps, qkv_bias, kv_heads)
  if folded_norm_x is None and qkv_bias is None:
    return qkv if qkv.ndim == 3 else sum_partials(qkv).astype(dtype)
  total = qkv.astype(jnp.float32) if qkv.ndim == 3 else sum_partials(qkv)
  if folded_norm_x is not None:
    total = total * inverse_rms(folded_norm_x, folded_norm_eps)[:, None, None]
  if qkv_bias is not None:
    total = total + jnp.concatenate(qkv_bias).astype(jnp.float32)
  return total.astype(dtype)


def decode_attention_reference(qkv: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                               visible: jax.Array, cache_index: jax.Array,
                               positions: jax.Array, inv_freq: jax.Array,
                               q_norm: jax.Array | None, k_norm: jax.Array | None, *,
                               eps: float, scale: float, activation_dtype=None,
                               folded_norm_x: jax.Array | None = None,
                               folded_norm_eps: float | None = None,
                               qkv_bias: QkvBias | None = None
                               ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`triton.decode_attention_triton`'s result by the models' XLA path
  (`attend_with_cache`) for one token per sequence."""
  qkv = whole_qkv(qkv, activation_dtype, folded_norm_x, folded_norm_eps, qkv_bias,
                  k_cache.shape[2])
  heads, kv_heads = num_query_heads(qkv, k_cache, v_cache), k_cache.shape[2]
  q, k, v = jnp.split(qkv[:, None], [heads, heads + kv_heads], axis=2)
  out, k_cache, v_cache = attend_with_cache(
      q, k, v, k_cache, v_cache, visible[:, None, :], cache_index, positions[:, None],
      inv_freq, q_norm, k_norm, eps=eps, scale=scale)
  return out[:, 0], k_cache, v_cache

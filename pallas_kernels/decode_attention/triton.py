"""Decode attention (one new token per sequence) in one Pallas Triton kernel.

For a decode step XLA runs about ten small kernels between the q/k/v projection and
the output projection: per-head q/k RMSNorm, RoPE, two cache updates, the q·k product,
the softmax pieces, the probs·v product and transposes. `decode_attention_triton` does
all of it in one launch. Grid: (batch, kv head, split). A program normalises and
rotates its query-head group and its new key, and runs an online-softmax pass over
its share of the cache slots up to the current one; the first split's program writes
the new key and value into the cache (every program takes them from registers).

With one split (short caches) the program normalises its result in place. With more
(flash-decoding: a long cache's slots divided among more programs, so that a small
batch still fills the GPU), each program writes its unnormalised sum with its
running maximum and denominator, and `combine_splits` merges them: one small XLA
fusion. `default_splits` picks the count from the batch, the KV heads and the
cache length (`SPLITS`).

The new token's projections come in one array `qkv [B, H + 2 * Hkv, D]` (query heads,
then key heads, then value heads): the model builds it by concatenating the q, k and v
projections, which XLA computes as one dot. They may also come as that dot's float32
split-K partials `[P, B, H + 2 * Hkv, D]`, which each program sums for its heads as it
loads them: then no reduction kernel runs between the dot and this one. And the layer's
input RMSNorm may be folded past that dot (`folded_norm_x`): the dot reads the residual
rows times the norm's weight, and each program divides the sums by its row's rms.
The projections' biases, where the model has them, come as its three arrays and are
added after that.

Its reference is `reference.decode_attention_reference`, the models' XLA path for
one token, with the kernel's arguments and results.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from sere_jax.kernels.decode_attention.reference import (QkvBias, check_projection_args,
                                                         num_query_heads, qkv_partials)

# How `default_splits` shares a cache among programs: splits of at least `min_slots`
# slots are added until the grid has `programs` programs. From a sweep on an H100
# (docs/benchmarks/decode_attention_sweep_h100.json; Qwen3-30B-A3B's 4 KV heads, B = 1,
# 16, 64 over 160-16384 slots): B = 1 was fastest with 64-slot splits up to 64 of them
# (16384 slots: 473 -> 25 us per layer), B = 16 with 4-5 splits (2.4x at 16384 slots),
# B = 64 (256 programs) unsplit. Once the unsplit grid has `wide_grid` programs a split
# must hold twice `min_slots`: at B = 16 (64 programs) two 80-slot splits measured no
# faster than one (11.91 against 11.84 us) and cost the merge kernel.
SPLITS = dict(min_slots=64, programs=256, wide_grid=64)


def online_softmax_block(m: jax.Array, logits: jax.Array, seen: jax.Array
                         ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One block of slots in an online softmax over rows (inside a kernel): `m [rows]`
  the running maxima, `logits [rows, block]` (scaled), `seen [block]` the visible
  slots. Returns `(new maxima, unnormalised probabilities [rows, block], the factor
  [rows] that rescales the sums so far)`; rows that have seen nothing stay at zero."""
  logits = jnp.where(seen[None, :], logits, -jnp.inf)
  m_new = jnp.maximum(m, jnp.max(logits, axis=1))
  shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows that saw nothing yet
  return m_new, jnp.exp(logits - shift[:, None]), jnp.exp(m - shift)


def normalise(acc: jax.Array, l: jax.Array) -> jax.Array:
  """`acc [rows, D] / l [rows]`, an online softmax's result; zeros where `l` is 0."""
  return jnp.where(l[:, None] > 0, acc / jnp.where(l > 0, l, 1.0)[:, None], 0.0)


def _kernel(qkv_ref, visible_ref, index_ref, positions_ref, freq_ref, q_norm_ref,
            k_norm_ref, norm_x_ref, q_bias_ref, k_bias_ref, v_bias_ref, k_cache_in,
            v_cache_in, out_ref, k_cache_ref, v_cache_ref, *stats_refs, num_heads,
            num_kv_heads, group, group_pad, head_dim, cache_len, block_s, splits,
            partials, dtype, eps, scale, qk_norm, norm_x_dim, norm_x_eps, biased,
            interpret):
  del k_cache_in, v_cache_in  # aliased to k_cache_ref, v_cache_ref
  b, g, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  r = jnp.arange(group_pad)
  r_ok = r < group
  d = jnp.arange(head_dim)
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

  if norm_x_dim:  # the input RMSNorm folded past the projection: its row factor
    cols = jnp.arange(pl.next_power_of_2(norm_x_dim))
    row = plt.load(norm_x_ref.at[b, cols], mask=cols < norm_x_dim, other=0)
    row = row.astype(jnp.float32)
    row_factor = jax.lax.rsqrt(jnp.sum(row * row) / norm_x_dim + norm_x_eps)

  def load_qkv(rows, cols, bias_ref, bias_rows, mask=None):
    """The new token's projections at (rows, cols): split-K partials summed in order
    (divided by the folded norm's rms, the bias at (bias_rows, cols) of `bias_ref`
    added), rounded to the activation dtype as the unsplit dot would be."""
    other = None if mask is None else 0
    x = plt.load(qkv_ref.at[0, b, rows, cols], mask=mask, other=other)
    for p in range(1, partials):
      x += plt.load(qkv_ref.at[p, b, rows, cols], mask=mask, other=other)
    if norm_x_dim:
      x = x.astype(jnp.float32) * row_factor
    if biased:
      x = x.astype(jnp.float32) + plt.load(bias_ref.at[bias_rows, cols], mask=mask,
                                           other=other).astype(jnp.float32)
    return x.astype(dtype)

  heads = g * group + r  # this program's query heads; its key and value heads follow H
  k_head, v_head = num_heads + g, num_heads + num_kv_heads + g
  q_rows, q_ok = heads[:, None], r_ok[:, None]
  q = norm_rope(load_qkv(q_rows, d[None, :], q_bias_ref, q_rows, q_ok),
                load_qkv(q_rows, partner[None, :], q_bias_ref, q_rows, q_ok),
                q_norm_ref, dtype).astype(k_cache_ref.dtype)  # [group_pad, D]
  k_new = norm_rope(load_qkv(k_head, d, k_bias_ref, g),
                    load_qkv(k_head, partner, k_bias_ref, g),
                    k_norm_ref, dtype).astype(k_cache_ref.dtype)
  v_new = load_qkv(v_head, d, v_bias_ref, g).astype(v_cache_ref.dtype)

  @pl.when(split == 0)
  def _():
    plt.store(k_cache_ref.at[b, index, g, d], k_new)
    plt.store(v_cache_ref.at[b, index, g, d], v_new)

  def block(i, carry):
    m, l, acc = carry
    s = i * block_s + jnp.arange(block_s)
    s_ok = s < cache_len
    keys = plt.load(k_cache_ref.at[b, s[None, :], g, d[:, None]], mask=s_ok[None, :],
                    other=0)  # [D, block_s]
    values = plt.load(v_cache_ref.at[b, s[:, None], g, d[None, :]], mask=s_ok[:, None],
                      other=0)  # [block_s, D]
    # The slot written above is taken from registers: no read-after-write ordering.
    keys = jnp.where((s == index)[None, :], k_new[:, None], keys)
    values = jnp.where((s == index)[:, None], v_new[None, :], values)
    lhs, rhs = q, keys
    if interpret:  # CPU dots take no bf16 x bf16 -> f32
      lhs, rhs = lhs.astype(jnp.float32), rhs.astype(jnp.float32)
    logits = jnp.dot(lhs, rhs, preferred_element_type=jnp.float32) * scale
    seen = s_ok & (plt.load(visible_ref.at[b, s], mask=s_ok, other=0) != 0)
    m_new, p, alpha = online_softmax_block(m, logits, seen)
    probs, vals = p.astype(values.dtype), values
    if interpret:
      probs, vals = probs.astype(jnp.float32), vals.astype(jnp.float32)
    acc = acc * alpha[:, None] + jnp.dot(probs, vals, preferred_element_type=jnp.float32)
    return m_new, l * alpha + jnp.sum(p, axis=1), acc

  init = (jnp.full((group_pad,), -jnp.inf, jnp.float32),
          jnp.zeros((group_pad,), jnp.float32),
          jnp.zeros((group_pad, head_dim), jnp.float32))
  # Slots after the new token are never visible: the blocks up to its block, shared
  # evenly among the splits (a split past the end has none).
  blocks = index // block_s + 1
  per_split = (blocks + splits - 1) // splits
  first = split * per_split
  m, l, acc = jax.lax.fori_loop(first, jnp.minimum(first + per_split, blocks), block, init)
  if splits == 1:
    plt.store(out_ref.at[b, heads[:, None], d[None, :]],
              normalise(acc, l).astype(out_ref.dtype), mask=r_ok[:, None])
  else:  # partial results, [B, splits, H, ...], merged by `combine_splits`
    m_ref, l_ref = stats_refs
    plt.store(out_ref.at[b, split, heads[:, None], d[None, :]], acc, mask=r_ok[:, None])
    plt.store(m_ref.at[b, split, heads], m, mask=r_ok)
    plt.store(l_ref.at[b, split, heads], l, mask=r_ok)


def _is_pow2(x: int) -> bool:
  return x >= 16 and x & (x - 1) == 0


_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


def unsupported(qkv: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                inv_freq: jax.Array, activation_dtype=None,
                folded_norm_x: jax.Array | None = None,
                qkv_bias: QkvBias | None = None) -> str | None:
  """Why the kernel cannot take these inputs (None when it can): the head dim must be a
  power of two of at least 16, RoPE must rotate the whole head, and activations,
  caches, the folded norm's input rows and the biases must be bfloat16, float16 or
  float32."""
  _, dtype = qkv_partials(qkv, activation_dtype)
  if dtype not in _DTYPES:
    return f"takes bfloat16, float16 or float32 activations, not {dtype}"
  head_dim = qkv.shape[-1]
  if not _is_pow2(head_dim):
    return f"takes head dims that are powers of two >= 16, not {head_dim}"
  if inv_freq.shape != (head_dim // 2,):
    return (f"rotates the whole head ({head_dim // 2} RoPE frequencies), not "
            f"{inv_freq.shape} frequencies")
  arrays = (("qkv", qkv), ("k_cache", k_cache), ("v_cache", v_cache),
            ("folded_norm_x", folded_norm_x),
            *(("qkv_bias", bias) for bias in qkv_bias or ()))
  for name, array in arrays:
    if array is not None and array.dtype not in _DTYPES:
      return f"takes bfloat16, float16 or float32 arrays, not {name} in {array.dtype}"
  return None


def default_splits(batch: int, kv_heads: int, cache_len: int) -> int:
  """Splits of each sequence's cache (`SPLITS`): as many as bring the grid to
  `programs` programs, each over `min_slots` slots or more, twice that once the
  unsplit grid has `wide_grid` programs (so one for short caches and for batches that
  fill the grid)."""
  unsplit = batch * kv_heads
  min_slots = SPLITS["min_slots"] * (2 if unsplit >= SPLITS["wide_grid"] else 1)
  most = cache_len // min_slots
  wanted = -(-SPLITS["programs"] // unsplit)
  return max(1, min(most, wanted))


def combine_splits(acc: jax.Array, m: jax.Array, l: jax.Array, dtype) -> jax.Array:
  """Merges the splits' unnormalised sums `acc [B, P, H, D]`, running maxima `m` and
  denominators `l [B, P, H]` (all float32) into `[B, H, D]` in `dtype`; a head that
  saw no slot gives zeros."""
  top = jnp.max(m, axis=1, keepdims=True)
  weight = jnp.where(m == -jnp.inf, 0.0, jnp.exp(m - jnp.where(top == -jnp.inf, 0.0, top)))
  total = jnp.sum(weight * l, axis=1)
  out = jnp.sum(weight[..., None] * acc, axis=1)
  return jnp.where(total[..., None] > 0,
                   out / jnp.where(total > 0, total, 1.0)[..., None], 0.0).astype(dtype)


@functools.partial(jax.jit, static_argnames=("eps", "scale", "block_s", "splits",
                                             "num_warps", "activation_dtype",
                                             "folded_norm_eps", "interpret"))
def decode_attention_triton(qkv: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                            visible: jax.Array, cache_index: jax.Array,
                            positions: jax.Array, inv_freq: jax.Array,
                            q_norm: jax.Array | None, k_norm: jax.Array | None, *,
                            eps: float, scale: float, block_s: int = 64,
                            splits: int | None = None, num_warps: int = 4,
                            activation_dtype=None, folded_norm_x: jax.Array | None = None,
                            folded_norm_eps: float | None = None,
                            qkv_bias: QkvBias | None = None, interpret: bool = False
                            ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Attention of one new token per sequence over its KV cache.

  Args:
    qkv: `[B, H + 2 * Hkv, D]`, the new token's projections (before q/k norm and RoPE):
      its `H` query heads, then its `Hkv` key heads, then its `Hkv` value heads. One
      array, so the model's q/k/v projection stays one XLA dot with one output. Or
      that dot's float32 split-K partials `[P, B, H + 2 * Hkv, D]`, summed here as they
      are loaded (no reduction kernel between the dot and this one), with
      `activation_dtype` the dtype their sum is rounded to.
    k_cache, v_cache: `[B, S, Hkv, D]`; the new key and value are written at slot
      `cache_index` (in place where XLA can alias the buffers).
    visible: `[B, S]` bool, the slots the new token attends to (itself included; no
      slot after `cache_index`).
    positions: `[B]` RoPE positions; inv_freq: `[D / 2]` RoPE inverse frequencies.
    q_norm, k_norm: per-head RMSNorm weights `[D]` (Qwen3), or both None; any float
      dtype, read as stored and widened in the kernel (an `astype` here would be two
      extra XLA kernels per layer and step).
    eps: the RMSNorm epsilon; scale: the logit scale.
    folded_norm_x: `[B, D_model]`, the layer's input rows, when `qkv` is the projection
      of `reference.folded_norm_weight(x, norm weight)` rather than of `rms_norm(x)`:
      the summed projections are divided by `rms(x)` (with `folded_norm_eps`) before
      the rest. The input RMSNorm is then no kernel of its own (its scale goes into
      the dot's operand, which XLA fuses into the dot).
    qkv_bias: the query, key and value projections' biases `([H, D], [Hkv, D],
      [Hkv, D])` (Qwen2), added to the sums (after the folded norm's division), or
      None. Three arrays as the model holds them (`reference.QkvBias`).
    block_s: cache slots per step of a program; splits: programs per sequence and KV
      head, each over an equal share of the slots up to `cache_index` (None:
      `default_splits`).

  Returns:
    `(out [B, H, D] in the activation dtype, k_cache, v_cache)`. `H` must be a multiple of `Hkv`
    and `D` a power of two of at least 16 (Triton tiles); the query-head group
    `H / Hkv` is padded to 16 rows for the tensor-core dots.
  """
  partials, dtype = qkv_partials(qkv, activation_dtype)
  qkv = qkv.reshape(partials, *qkv.shape[-3:])
  heads = num_query_heads(jax.ShapeDtypeStruct(qkv.shape[1:], dtype), k_cache, v_cache)
  check_projection_args(qkv, folded_norm_x, folded_norm_eps, qkv_bias, k_cache.shape[2])
  batch, cache_len, kv_heads, head_dim = k_cache.shape
  if visible.shape != (batch, cache_len):
    raise ValueError(f"visible must be [B, S] = {(batch, cache_len)}, got {visible.shape}")
  if not (_is_pow2(head_dim) and _is_pow2(block_s)):
    raise ValueError(f"head dim ({head_dim}) and block_s ({block_s}) must be powers of "
                     "two >= 16")
  if inv_freq.shape != (head_dim // 2,):
    raise ValueError(f"inv_freq must be [{head_dim // 2}] (RoPE over the whole head), "
                     f"got {inv_freq.shape}")
  if splits is None:
    splits = default_splits(batch, kv_heads, cache_len)
  if not isinstance(splits, int) or splits < 1:
    raise ValueError(f"splits must be a positive integer, got {splits!r}")
  qk_norm = q_norm is not None
  if qk_norm != (k_norm is not None):
    raise ValueError("q_norm and k_norm must both be given or both be None")
  if not qk_norm:
    q_norm = k_norm = jnp.zeros((head_dim,), jnp.float32)  # unused placeholders
  norm_x_dim = 0 if folded_norm_x is None else folded_norm_x.shape[1]
  if folded_norm_x is None:
    folded_norm_x = jnp.zeros((1, 1), jnp.float32)  # unused placeholder
  biased = qkv_bias is not None
  if not biased:
    qkv_bias = (jnp.zeros((1, 1), jnp.float32),) * 3  # unused placeholders
  group = heads // kv_heads
  kernel = functools.partial(
      _kernel, num_heads=heads, num_kv_heads=kv_heads, group=group,
      group_pad=max(16, 1 << (group - 1).bit_length()), head_dim=head_dim,
      cache_len=cache_len, block_s=block_s, splits=splits, partials=partials,
      dtype=dtype, eps=eps, scale=scale, qk_norm=qk_norm, norm_x_dim=norm_x_dim,
      norm_x_eps=folded_norm_eps, biased=biased, interpret=bool(interpret))
  caches = (jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
            jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype))
  if splits == 1:
    out_shape = (jax.ShapeDtypeStruct((batch, heads, head_dim), dtype), *caches)
  else:
    f32 = jnp.float32
    out_shape = (jax.ShapeDtypeStruct((batch, splits, heads, head_dim), f32), *caches,
                 jax.ShapeDtypeStruct((batch, splits, heads), f32),
                 jax.ShapeDtypeStruct((batch, splits, heads), f32))
  results = pl.pallas_call(
      kernel,
      grid=(batch, kv_heads, splits),
      out_shape=out_shape,
      input_output_aliases={11: 1, 12: 2},
      compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=2),
      interpret=interpret,
      name="sere_decode_attention",
  )(qkv, visible.astype(jnp.int32), jnp.reshape(cache_index, (1,)).astype(jnp.int32),
    positions.astype(jnp.int32), inv_freq.astype(jnp.float32),
    q_norm, k_norm, folded_norm_x, *qkv_bias, k_cache, v_cache)
  if splits == 1:
    return results
  acc, k_cache, v_cache, m, l = results
  return combine_splits(acc, m, l, dtype), k_cache, v_cache

"""Latent attention (one new token per sequence) in one Pallas Triton kernel.

XLA runs MLA's decode attention in the latent space as five or more small kernels:
two batched dots for the logits (latent and rotated parts), the softmax pieces and the
probs·latent dot. `latent_attention_triton` does it in one launch. Grid: (batch, head
block, split). A program loads its `block_h` heads' latent and rotated queries once
and runs an online-softmax pass over its share of the cache slots up to
`cache_index`, reading each block of latents once for both of its dots (logits, then
the weighted sum). With one split it normalises its result in place; with more
(flash-decoding) the programs' partial results are merged by one XLA fusion.

A program's pass over the slots bounds the kernel, whatever the batch: so small
grids share the slots among more programs, and `default_config` picks the block of
slots and the splits from the grid (`TUNING`).

Latent and rotary widths need not be powers of two: the program's tiles are padded
to the next power of two (at least 16, as the tensor-core dots need) and the loads
masked, so the padding adds zeros to every product.

Its reference is `reference.latent_attention_reference`, with the same arguments.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from sere_jax.kernels.decode_attention.triton import (combine_splits, normalise,
                                                      online_softmax_block)

_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
_NT = (((1,), (1,)), ((), ()))  # a [M, K] x b [N, K] -> [M, N]

# How `default_config` picks `(block_s, splits)`: an unsplit grid of fewer than
# `programs` programs (sequences x head blocks) gets `narrow_block_s`-slot blocks and
# splits until it has `programs`, at most one per block of the cache; a wider grid runs
# unsplit with `wide_block_s`-slot blocks. From the sweep on an H100
# (docs/benchmarks/latent_attention_sweep_h100.json; DeepSeek-V2-Lite's 16 heads over
# 160 slots; µs per layer with the sweep's own cache update): B = 1 took 16.99 µs
# with one 32-slot program and 10.02 with 8 splits; B = 16 19.46 and 14.50 (4 splits);
# B = 64 (64 programs) 24.03 with 32-slot and 20.55 with 64-slot blocks, more splits
# being slower there.
TUNING = dict(programs=64, narrow_block_s=32, wide_block_s=64)


def default_config(batch: int, head_blocks: int, cache_len: int) -> tuple[int, int]:
  """`(block_s, splits)` for a grid of `batch * head_blocks` unsplit programs over a
  cache of `cache_len` slots (`TUNING`)."""
  unsplit = batch * head_blocks
  if unsplit >= TUNING["programs"]:
    return TUNING["wide_block_s"], 1
  block_s = TUNING["narrow_block_s"]
  return block_s, max(1, min(-(-TUNING["programs"] // unsplit), -(-cache_len // block_s)))


def _tile(n: int) -> int:
  """The power of two of at least 16 that holds `n`."""
  return max(16, 1 << (n - 1).bit_length())


def _kernel(q_latent_ref, q_pe_ref, latent_ref, k_pe_ref, visible_ref, index_ref, out_ref,
            *stats_refs, heads, rank, rope, cache_len, block_h, block_s, splits, scale,
            interpret):
  b, g, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  h = g * block_h + jnp.arange(block_h)
  r, p = jnp.arange(_tile(rank)), jnp.arange(_tile(rope))
  h_ok, r_ok, p_ok = h < heads, r < rank, p < rope
  dtype = latent_ref.dtype

  def operands(x, y):
    """The dot's operands: CPU dots take no bf16 x bf16 -> f32 in interpret mode."""
    return (x.astype(jnp.float32), y.astype(jnp.float32)) if interpret else (x, y)

  q_latent = plt.load(q_latent_ref.at[b, h[:, None], r[None, :]],
                      mask=h_ok[:, None] & r_ok[None, :], other=0).astype(dtype)
  q_pe = plt.load(q_pe_ref.at[b, h[:, None], p[None, :]],
                  mask=h_ok[:, None] & p_ok[None, :], other=0).astype(k_pe_ref.dtype)

  def block(i, carry):
    m, l, acc = carry
    s = i * block_s + jnp.arange(block_s)
    s_ok = s < cache_len
    latent = plt.load(latent_ref.at[b, s[:, None], r[None, :]],
                      mask=s_ok[:, None] & r_ok[None, :], other=0)  # [block_s, R]
    k_pe = plt.load(k_pe_ref.at[b, s[:, None], p[None, :]],
                    mask=s_ok[:, None] & p_ok[None, :], other=0)  # [block_s, P]
    logits = (jax.lax.dot_general(*operands(q_latent, latent), _NT,
                                  preferred_element_type=jnp.float32)
              + jax.lax.dot_general(*operands(q_pe, k_pe), _NT,
                                    preferred_element_type=jnp.float32)) * scale
    seen = s_ok & (plt.load(visible_ref.at[b, s], mask=s_ok, other=0) != 0)
    m_new, probs, alpha = online_softmax_block(m, logits, seen)
    acc = acc * alpha[:, None] + jnp.dot(*operands(probs.astype(dtype), latent),
                                         preferred_element_type=jnp.float32)
    return m_new, l * alpha + jnp.sum(probs, axis=1), acc

  init = (jnp.full((block_h,), -jnp.inf, jnp.float32), jnp.zeros((block_h,), jnp.float32),
          jnp.zeros((block_h, _tile(rank)), jnp.float32))
  # No slot after the new token's is visible: the blocks up to its block, shared
  # evenly among the splits (a split past the end has none).
  blocks = jnp.minimum(index_ref[0] // block_s + 1, pl.cdiv(cache_len, block_s))
  per_split = (blocks + splits - 1) // splits
  first = split * per_split
  m, l, acc = jax.lax.fori_loop(first, jnp.minimum(first + per_split, blocks), block, init)
  hr_ok = h_ok[:, None] & r_ok[None, :]
  if splits == 1:
    plt.store(out_ref.at[b, h[:, None], r[None, :]], normalise(acc, l).astype(out_ref.dtype),
              mask=hr_ok)
  else:  # partial results, [B, splits, H, ...], merged by `combine_splits`
    m_ref, l_ref = stats_refs
    plt.store(out_ref.at[b, split, h[:, None], r[None, :]], acc, mask=hr_ok)
    plt.store(m_ref.at[b, split, h], m, mask=h_ok)
    plt.store(l_ref.at[b, split, h], l, mask=h_ok)


def unsupported(q_latent: jax.Array, q_pe: jax.Array, latent: jax.Array,
                k_pe: jax.Array) -> str | None:
  """Why the kernel cannot take these inputs (None when it can): queries and caches
  must be bfloat16, float16 or float32."""
  for name, array in (("q_latent", q_latent), ("q_pe", q_pe), ("latent", latent),
                      ("k_pe", k_pe)):
    if array.dtype not in _DTYPES:
      return f"takes bfloat16, float16 or float32 arrays, not {name} in {array.dtype}"
  return None


def _check_shapes(q_latent, q_pe, latent, k_pe, visible):
  if q_latent.ndim != 3 or latent.ndim != 3:
    raise ValueError(f"q_latent must be [B, H, R] and latent [B, S, R], got "
                     f"{list(q_latent.shape)} and {list(latent.shape)}")
  batch, heads, rank = q_latent.shape
  cache_len, rope = latent.shape[1], k_pe.shape[-1]
  want = {"q_pe": (q_pe, (batch, heads, rope)), "latent": (latent, (batch, cache_len, rank)),
          "k_pe": (k_pe, (batch, cache_len, rope)), "visible": (visible, (batch, cache_len))}
  for name, (array, shape) in want.items():
    if array.shape != shape:
      raise ValueError(f"{name} must be {list(shape)} for q_latent {list(q_latent.shape)}, "
                       f"latent {list(latent.shape)} and k_pe {list(k_pe.shape)}, got "
                       f"{list(array.shape)}")


def _check_block(name: str, size: int) -> None:
  if size < 16 or size & (size - 1):
    raise ValueError(f"{name} must be a power of two >= 16, got {size}")


@functools.partial(jax.jit, static_argnames=("scale", "block_h", "block_s", "splits",
                                             "num_warps", "interpret"))
def latent_attention_triton(q_latent: jax.Array, q_pe: jax.Array, latent: jax.Array,
                            k_pe: jax.Array, visible: jax.Array, cache_index: jax.Array,
                            *, scale: float, block_h: int = 16,
                            block_s: int | None = None, splits: int | None = None,
                            num_warps: int = 4,
                            interpret: bool = False
                            ) -> jax.Array:
  """Attention of one new token per sequence over a latent cache.

  Args:
    q_latent: `[B, H, R]`, each head's no-RoPE query in the latent space.
    q_pe: `[B, H, P]`, each head's rotated query part.
    latent, k_pe: the cache, `[B, S, R]` and `[B, S, P]` (the shared rotated key).
    visible: `[B, S]` bool, the slots the new token attends to (none after
      `cache_index`: the kernel reads the slots up to it only).
    cache_index: the new token's slot (a scalar).
    scale: the logit scale.
    block_h: heads per program (rows of the dots, padded with masked rows);
      block_s: cache slots per step of a program. Powers of two of at least 16.
    splits: programs per sequence and head block, each over an equal share of the
      blocks of slots up to `cache_index`; their partial results are merged by
      `decode_attention.triton.combine_splits` (one small XLA fusion).
    `block_s` and `splits` left None are `default_config`'s.

  Returns:
    `[B, H, R]` in q_latent's dtype: the softmax-weighted sum of the visible latents.
  """
  _check_shapes(q_latent, q_pe, latent, k_pe, visible)
  _check_block("block_h", block_h)
  batch, heads, rank = q_latent.shape
  cache_len, rope = latent.shape[1], k_pe.shape[-1]
  tuned_block_s, tuned_splits = default_config(batch, pl.cdiv(heads, block_h), cache_len)
  block_s = tuned_block_s if block_s is None else block_s
  splits = tuned_splits if splits is None else splits
  _check_block("block_s", block_s)
  if not isinstance(splits, int) or splits < 1:
    raise ValueError(f"splits must be a positive integer, got {splits!r}")
  kernel = functools.partial(
      _kernel, heads=heads, rank=rank, rope=rope, cache_len=cache_len, block_h=block_h,
      block_s=block_s, splits=splits, scale=scale, interpret=bool(interpret))
  if splits == 1:
    out_shape = jax.ShapeDtypeStruct(q_latent.shape, q_latent.dtype)
  else:
    f32 = jnp.float32
    out_shape = (jax.ShapeDtypeStruct((batch, splits, heads, rank), f32),
                 jax.ShapeDtypeStruct((batch, splits, heads), f32),
                 jax.ShapeDtypeStruct((batch, splits, heads), f32))
  results = pl.pallas_call(
      kernel,
      grid=(batch, pl.cdiv(heads, block_h), splits),
      out_shape=out_shape,
      compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=2),
      interpret=interpret,
      name="sere_latent_attention",
  )(q_latent, q_pe, latent, k_pe, visible.astype(jnp.int32),
    jnp.reshape(cache_index, (1,)).astype(jnp.int32))
  return results if splits == 1 else combine_splits(*results, q_latent.dtype)

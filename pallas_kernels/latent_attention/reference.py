"""Attention over a compressed (latent) cache in jnp: the latent-attention reference.

Multi-head latent attention (DeepSeek-V2) caches per token one normalised latent,
shared by every head as key and value, and one rotated key shared by every head. One
new token attends in the latent space: each head's no-RoPE query is mapped into it
(`kv_b_proj`'s key half absorbed), the logits add the rotated parts, and the
attention-weighted latent is mapped out by the value half afterwards (by the caller).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sere_jax.kernels.decode_attention.reference import masked_softmax
from sere_jax.numerics import mixed_dot_operands


def latent_attention_reference(q_latent: jax.Array, q_pe: jax.Array, latent: jax.Array,
                               k_pe: jax.Array, visible: jax.Array, cache_index: jax.Array,
                               *, scale: float) -> jax.Array:
  """Attention of one new token per sequence over a latent cache.

  `q_latent [B, H, R]` is each head's no-RoPE query in the latent space, `q_pe [B, H, P]`
  its rotated part; the cache holds `latent [B, S, R]` (keys and values at once) and
  the shared rotated key `k_pe [B, S, P]`; `visible [B, S]` marks the slots attended to
  (none after `cache_index`, which this reference does not need). Returns `[B, H, R]`
  in q_latent's dtype. Products accumulate in float32 and the softmax is float32; a
  sequence with no visible slot gets zeros.
  """
  del cache_index
  logits = (
      jnp.einsum("bhr,bsr->bhs", *mixed_dot_operands(q_latent.astype(latent.dtype), latent),
                 preferred_element_type=jnp.float32)
      + jnp.einsum("bhp,bsp->bhs", *mixed_dot_operands(q_pe.astype(k_pe.dtype), k_pe),
                   preferred_element_type=jnp.float32))
  probs = masked_softmax(logits, visible[:, None], scale)
  out = jnp.einsum("bhs,bsr->bhr", *mixed_dot_operands(probs.astype(latent.dtype), latent),
                   preferred_element_type=jnp.float32)
  return out.astype(q_latent.dtype)

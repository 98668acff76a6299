"""The interface every decoder model implements (see `layers.py` for conventions).

    out = model(tokens, positions, token_valid, cache, cache_valid, cache_index,
                decode=False, last_only=False)
    out.logits  # [B, L, V] float32 ([B, 1, V], the last position's, with last_only)
    out.cache   # list of per-layer caches, updated at [cache_index, cache_index + L)
    out.stats   # tuple of RerouteStats, one per MoE layer

`last_only=True` applies the LM head to the last position only: a prefill that samples
the next token needs no more, and the full float32 logits of 64 prompts of 128 tokens
over a 152k vocabulary take 4.6 GiB. `model.init_cache(batch, length, dtype)` makes an
empty cache, every leaf of it batch-major (`[B, ...]`); `model.config` is the model's
frozen config (with `vocab_size` and `architecture`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp

from sere_jax import policies


class ForwardOutput(NamedTuple):
  logits: jax.Array
  cache: list[Any]
  stats: tuple[policies.RerouteStats, ...]


def param_dtype(model: nnx.Module) -> jnp.dtype:
  """The dtype of the model's first floating-point parameter (float32 if none): the
  dtype its KV cache and checkpoints use."""
  for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)):
    dtype = getattr(leaf, "dtype", None)
    if dtype is not None and jnp.issubdtype(dtype, jnp.floating):
      return jnp.dtype(dtype)
  return jnp.dtype(jnp.float32)

"""The decode-attention op: `decode_attention(..., implementation=)`.

One new token per sequence: per-head q/k RMSNorm, RoPE, the write of its key and
value into the cache, and grouped-query attention over the cache. Implementations
(`IMPLEMENTATIONS`, `REGISTRY`):
  triton     one Pallas Triton kernel (NVIDIA GPUs), `triton.decode_attention_triton`;
             inputs it cannot take (`triton.unsupported`: a head dim that is not a
             power of two >= 16, partial RoPE, other dtypes) run `xla` instead, with
             one log line naming the reason.
  interpret  the Triton kernel in Pallas interpret mode (any backend), the same way.
  xla        the models' XLA path, `reference.decode_attention_reference`.
  auto       triton on GPU, interpret on CPU, xla on TPU (no TPU kernel).
(The Qwen models choose with their own `attention_impl`, whose `auto` is `xla`
off GPUs.)
"""

from __future__ import annotations

import jax

from sere_jax.kernels import registry
from sere_jax.kernels.decode_attention import triton
from sere_jax.kernels.decode_attention.reference import (QkvBias,
                                                         decode_attention_reference)


# The arguments that say what `qkv` holds (the reference takes them too).
_PROJECTION_ARGS = ("activation_dtype", "folded_norm_x", "folded_norm_eps", "qkv_bias")


def _triton(qkv, k_cache, v_cache, visible, cache_index, positions, inv_freq, q_norm,
            k_norm, *, eps, scale, interpret=False, **kw):
  projection = {name: kw.pop(name, None) for name in _PROJECTION_ARGS}
  reason = triton.unsupported(qkv, k_cache, v_cache, inv_freq, projection["activation_dtype"],
                              projection["folded_norm_x"], projection["qkv_bias"])
  args = (qkv, k_cache, v_cache, visible, cache_index, positions, inv_freq, q_norm, k_norm)
  if reason:
    registry.log_triton_fallback("decode_attention", reason, interpret=interpret,
                                 running="the XLA attention")
    return decode_attention_reference(*args, eps=eps, scale=scale, **projection)
  return triton.decode_attention_triton(*args, eps=eps, scale=scale, interpret=interpret,
                                        **projection, **kw)


IMPLEMENTATIONS = {
    "triton": _triton,
    "interpret": lambda *args, **kw: _triton(*args, interpret=True, **kw),
    "xla": decode_attention_reference,
}
REGISTRY = registry.Registry("decode_attention", IMPLEMENTATIONS, references=("xla",),
                             fallback="xla")


def decode_attention(qkv: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                     visible: jax.Array, cache_index: jax.Array, positions: jax.Array,
                     inv_freq: jax.Array, q_norm: jax.Array | None,
                     k_norm: jax.Array | None, *, eps: float, scale: float,
                     activation_dtype=None, folded_norm_x: jax.Array | None = None,
                     folded_norm_eps: float | None = None, qkv_bias: QkvBias | None = None,
                     implementation: str = "auto", **options
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Attention of one new token per sequence over its KV cache.

  Arguments and results as `triton.decode_attention_triton`: `qkv [B, H + 2 * Hkv, D]`
  (or float32 split-K partials `[P, B, H + 2 * Hkv, D]` with `activation_dtype`, the
  dtype of their sum), caches `[B, S, Hkv, D]`, `visible [B, S]`, `positions [B]`,
  `inv_freq [D / 2]`, optional per-head norm weights `[D]`, and, with the layer's input
  RMSNorm folded past the projection dot, its input rows `folded_norm_x [B, D_model]`
  and `folded_norm_eps`, and the projections' biases `qkv_bias` (`([H, D], [Hkv, D],
  [Hkv, D])`);
  returns `(out [B, H, D], k_cache, v_cache)`.
  `implementation` is one of `REGISTRY.names`; `**options` are the chosen backend's
  tuning knobs (`block_s`, `splits`, `num_warps` for the Triton kernel).
  """
  fn = REGISTRY.get(implementation)
  return fn(qkv, k_cache, v_cache, visible, cache_index, positions, inv_freq, q_norm,
            k_norm, eps=eps, scale=scale, activation_dtype=activation_dtype,
            folded_norm_x=folded_norm_x, folded_norm_eps=folded_norm_eps,
            qkv_bias=qkv_bias, **options)

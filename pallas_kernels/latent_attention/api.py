"""The latent-attention op: `latent_attention(..., implementation=)`.

One new token per sequence attends over multi-head latent attention's compressed
cache, in the latent space (see `reference`). Implementations (`IMPLEMENTATIONS`,
`REGISTRY`):
  triton     one Pallas Triton kernel (NVIDIA GPUs), `triton.latent_attention_triton`;
             inputs it cannot take (`triton.unsupported`: other dtypes) run `xla`
             instead, with one log line naming the reason.
  interpret  the Triton kernel in Pallas interpret mode (any backend), the same way.
  xla        the jnp reference, `reference.latent_attention_reference`.
  auto       triton on GPU, interpret on CPU, xla on TPU (no TPU kernel).
(DeepSeek-V2 chooses with its own `attention_impl`, whose `auto` is `xla` off GPUs.)
"""

from __future__ import annotations

import jax

from sere_jax.kernels import registry
from sere_jax.kernels.latent_attention import triton
from sere_jax.kernels.latent_attention.reference import latent_attention_reference


def _triton(q_latent, q_pe, latent, k_pe, visible, cache_index, *, scale, interpret=False,
            **options):
  reason = triton.unsupported(q_latent, q_pe, latent, k_pe)
  if reason:
    registry.log_triton_fallback("latent_attention", reason, interpret=interpret)
    return latent_attention_reference(q_latent, q_pe, latent, k_pe, visible, cache_index,
                                      scale=scale)
  return triton.latent_attention_triton(q_latent, q_pe, latent, k_pe, visible,
                                        cache_index, scale=scale, interpret=interpret,
                                        **options)


IMPLEMENTATIONS = {
    "triton": _triton,
    "interpret": lambda *args, **kw: _triton(*args, interpret=True, **kw),
    "xla": latent_attention_reference,
}
REGISTRY = registry.Registry("latent_attention", IMPLEMENTATIONS, references=("xla",),
                             fallback="xla")


def latent_attention(q_latent: jax.Array, q_pe: jax.Array, latent: jax.Array,
                     k_pe: jax.Array, visible: jax.Array, cache_index: jax.Array, *,
                     scale: float, implementation: str = "auto", **options) -> jax.Array:
  """Attention of one new token per sequence over a latent cache.

  Arguments and result as `reference.latent_attention_reference`: `q_latent [B, H, R]`,
  `q_pe [B, H, P]`, `latent [B, S, R]`, `k_pe [B, S, P]`, `visible [B, S]` (no slot
  after `cache_index`) -> `[B, H, R]`. `implementation` is one of `REGISTRY.names`;
  `**options` are the chosen backend's tuning knobs (`block_h`, `block_s`,
  `num_warps` for the Triton kernel).
  """
  fn = REGISTRY.get(implementation)
  return fn(q_latent, q_pe, latent, k_pe, visible, cache_index, scale=scale, **options)

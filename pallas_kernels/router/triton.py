"""Softmax top-K routing in one kernel for NVIDIA GPUs (Pallas Triton).

XLA runs a decode step's router as a softmax kernel, a sort-based `top_k` and small
fusions around them (several launches of a few microseconds each, per layer). This
kernel does it in one launch: each program takes a block of tokens' `[E]` logits and
picks the K largest by repeated argmax (ties: lower expert first, as `lax.top_k`).
The picks form the kernel's serial chain, one cross-lane argmax per round; the
softmax weights are computed after the loop from the picked logits (independent
reductions), renormalised to sum to 1 if asked. Softmax is monotonic, so selecting on
the logits selects the same experts as selecting on the probabilities. Reference:
`reference.route_reference` (`sere_jax.routing.route`).

The logits may come as float32 split-K partials `[P, T, E]` of the router dot
(`sere_jax.numerics.split_k_dot`), which the kernel sums as it loads them: one
reduction kernel per layer fewer than XLA's own split-K dot followed by this kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from sere_jax.kernels.router import reference


def _router_kernel(logits_ref, ids_ref, weights_ref, *, num_tokens, num_experts,
                   experts_pad, top_k, normalize, block_t, partials):
  tokens = pl.program_id(0) * block_t + jnp.arange(block_t)
  token_ok = tokens < num_tokens
  lanes = jnp.arange(experts_pad)[None, :]
  ok = token_ok[:, None] & (lanes < num_experts)
  logits = plt.load(logits_ref.at[0, tokens[:, None], lanes], mask=ok, other=-jnp.inf)
  for p in range(1, partials):  # split-K partials, summed in order
    logits += plt.load(logits_ref.at[p, tokens[:, None], lanes], mask=ok, other=0.0)
  # The serial chain: one argmax per round (Triton's keeps the first of equal maxima).
  remaining, ids = logits, []
  for _ in range(top_k):
    pick = jnp.argmax(remaining, axis=1)
    ids.append(pick)
    remaining = jnp.where(lanes == pick[:, None], -jnp.inf, remaining)
  # Off the chain: each pick's logit by an independent masked sum, then its weight.
  # Padding rows (all -inf) give NaN here; they are never stored.
  top = jnp.max(logits, axis=1)
  denom = jnp.sum(jnp.exp(logits - top[:, None]), axis=1)
  weights = [jnp.exp(jnp.sum(jnp.where(lanes == pick[:, None], logits, 0.0), axis=1)
                     - top) / denom for pick in ids]
  if normalize:
    total = functools.reduce(jnp.add, weights)
    weights = [w / total for w in weights]
  for j in range(top_k):
    plt.store(ids_ref.at[tokens, j], ids[j].astype(jnp.int32), mask=token_ok)
    plt.store(weights_ref.at[tokens, j], weights[j], mask=token_ok)


@functools.partial(jax.jit, static_argnames=("top_k", "normalize", "block_t", "num_warps",
                                             "interpret"))
def route_triton(router_logits: jax.Array, top_k: int, *, normalize: bool = False,
                 block_t: int = 1, num_warps: int = 1, interpret: bool = False
                 ) -> tuple[jax.Array, jax.Array]:
  """`reference.route_reference` as one kernel: `[T, E]` logits, or float32 split-K
  partials `[P, T, E]` that sum to them, -> `(ids [T, K] int32, weights [T, K]
  float32)`, ids by descending score, ties to the lower expert.

  `block_t` (tokens per program, a power of two) and `num_warps` are GPU tuning knobs.
  The defaults, one token per single-warp program, were the fastest on an H200
  (`tools/decode_layer_sweep.py`, router gemm included: 5.8 us per layer against
  11.0 for 16 tokens and 4 warps and 8.6 for XLA's routing, at B = 16).
  """
  partials = reference.check_logits(router_logits)
  num_tokens, num_experts = router_logits.shape[-2:]
  if not 0 < top_k <= num_experts:
    raise ValueError(f"top_k must be in [1, {num_experts}], got {top_k}")
  if block_t < 1 or block_t & (block_t - 1):
    raise ValueError(f"block_t must be a power of two, got {block_t}")
  experts_pad = max(16, 1 << (num_experts - 1).bit_length())
  kernel = functools.partial(
      _router_kernel, num_tokens=num_tokens, num_experts=num_experts,
      experts_pad=experts_pad, top_k=top_k, normalize=normalize, block_t=block_t,
      partials=partials)
  return pl.pallas_call(
      kernel,
      grid=(pl.cdiv(num_tokens, block_t),),
      out_shape=(jax.ShapeDtypeStruct((num_tokens, top_k), jnp.int32),
                 jax.ShapeDtypeStruct((num_tokens, top_k), jnp.float32)),
      compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret,
      name="sere_router",
  )(router_logits.astype(jnp.float32).reshape(partials, num_tokens, num_experts))

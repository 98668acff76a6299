"""The expert-skipping grouped matmul op: `gmm(..., implementation=)`.

`out[r] = x[row_token[r]] @ w[expert(r)]` over the rows of the experts' groups,
accumulated in float32; the weights of experts without rows are not read. With
`activation="swiglu"` the result is `SiLU(gate) * up` of a fused gate/up projection:
the Triton kernel computes it in its epilogue when `tiles.SWIGLU_TILES` is set, every
other implementation after the matmul. Implementations (`IMPLEMENTATIONS`,
`REGISTRY`):
  triton         Pallas Triton kernel (NVIDIA GPUs), `triton.gmm_triton` with the
                 tuned `tiles.TILES`.
  tpu            Pallas Mosaic kernel (TPUs), `tpu.gmm_tpu`.
  mosaic_gpu     Pallas Mosaic GPU kernel (Hopper GPUs: TMA + wgmma),
                 `mosaic_gpu.gmm_mosaic_gpu` with `tiles.MOSAIC_GPU_TILES`; shapes or
                 dtypes it cannot take run the Triton kernel instead, with one log
                 line naming the reason.
  interpret      the Triton kernel in Pallas interpret mode (any backend).
  tpu_interpret  the TPU kernel in Pallas' TPU interpret mode (any backend).
  mosaic_gpu_interpret  the Mosaic GPU kernel in its interpret mode (any backend).
  xla            the pure-jnp reference, `reference.gmm_reference`.
  auto           triton on GPU, tpu on TPU, interpret elsewhere.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

from sere_jax.kernels import registry
from sere_jax.kernels.gmm.reference import gmm_reference, swiglu
from sere_jax.kernels.gmm import mosaic_gpu
from sere_jax.kernels.gmm.tiles import MOSAIC_GPU_TILES, SWIGLU_TILES, TILES
from sere_jax.kernels.gmm.tpu import gmm_tpu
from sere_jax.kernels.gmm.triton import gmm_triton
from sere_jax.kernels.schedule.reference import active_experts_from_offsets


ACTIVATIONS = (None, "swiglu")


def _epilogue(out: jax.Array, activation: str | None, out_dtype) -> jax.Array:
  """The activation and output cast of an implementation that does not fuse them."""
  if activation == "swiglu":
    out = swiglu(out)
  return out.astype(out_dtype)


def _triton(x, w, group_offsets, row_token, *, active_experts, num_active, num_rows,
            activation, out_dtype, **options):
  del active_experts, num_active  # the kernel finds the experts with rows itself
  if activation == "swiglu" and SWIGLU_TILES is not None:
    return gmm_triton(x, w, group_offsets, row_token, num_rows=num_rows, swiglu=True,
                      out_dtype=out_dtype, **dict(SWIGLU_TILES, **options))
  out = gmm_triton(x, w, group_offsets, row_token, num_rows=num_rows,
                   out_dtype=out_dtype if activation is None else jnp.float32,
                   **dict(TILES, **options))
  return out if activation is None else _epilogue(out, activation, out_dtype)


def _mosaic_gpu(x, w, group_offsets, row_token, *, active_experts, num_active, num_rows,
                activation, out_dtype, interpret=False, **options):
  options = dict(MOSAIC_GPU_TILES, **options)
  reason = mosaic_gpu.unsupported(x, w, block_k=options["block_k"])
  if reason:
    registry.log_once(f"gmm: the Mosaic GPU kernel {reason}; running the Triton kernel")
    return _triton(x, w, group_offsets, row_token, active_experts=active_experts,
                   num_active=num_active, num_rows=num_rows, activation=activation,
                   out_dtype=out_dtype, interpret=interpret)
  del active_experts, num_active  # the item table is built from the offsets
  if not interpret:
    mosaic_gpu.check_device()
  return _epilogue(mosaic_gpu.gmm_mosaic_gpu(x, w, group_offsets, row_token,
                                             num_rows=num_rows, interpret=interpret,
                                             **options), activation, out_dtype)


def _tpu(x, w, group_offsets, row_token, *, active_experts, num_active, num_rows,
         activation, out_dtype, **options):
  if active_experts is None:
    active_experts = active_experts_from_offsets(group_offsets)
  if num_active is None:
    num_active = jnp.sum(jnp.diff(group_offsets) > 0, dtype=jnp.int32)
  return _epilogue(gmm_tpu(x, w, group_offsets, active_experts, num_active, row_token,
                           num_rows=num_rows, **options), activation, out_dtype)


def _reference(x, w, group_offsets, row_token, *, active_experts, num_active, num_rows,
               activation, out_dtype):
  del active_experts, num_active
  return _epilogue(gmm_reference(x, w, group_offsets, row_token, num_rows), activation,
                   out_dtype)


IMPLEMENTATIONS = {
    "triton": _triton,
    "tpu": _tpu,
    "mosaic_gpu": _mosaic_gpu,
    "interpret": lambda *args, **kw: _triton(*args, interpret=True, **kw),
    "tpu_interpret": lambda *args, **kw: _tpu(*args, interpret=pltpu.InterpretParams(),
                                              **kw),
    "mosaic_gpu_interpret": lambda *args, **kw: _mosaic_gpu(*args, interpret=True, **kw),
    "xla": _reference,
}
REGISTRY = registry.Registry("gmm", IMPLEMENTATIONS, references=("xla",), fallback="xla")


def gmm(x: jax.Array, w: jax.Array, group_offsets: jax.Array,
        row_token: jax.Array | None = None, *, active_experts: jax.Array | None = None,
        num_active: jax.Array | None = None, num_rows: int | None = None,
        activation: str | None = None, out_dtype=jnp.float32,
        implementation: str = "auto", **options) -> jax.Array:
  """Grouped matmul over the experts with rows.

  Args:
    x: `[M, D]` rows in expert order, or `[T, D]` tokens when `row_token` is given.
    w: `[E, D, N]` expert weights.
    group_offsets: `[E + 1]` int32 row offsets of each expert's group.
    row_token: optional `[M]` int32 token of each row.
    active_experts, num_active: the schedule's active-expert list and its length
      (`Schedule.active_experts`, `Schedule.num_distinct`); the TPU kernel reads
      them (derived from the offsets when None), the others ignore them.
    num_rows: M (required when `row_token` is None and x has extra rows).
    activation: None, or "swiglu": `w` is a fused `[E, D, 2F]` gate/up projection
      (gate first) and the result is `SiLU(gate) * up`, `[M, F]`.
    out_dtype: the result's dtype (float32 by default).
    implementation: one of `REGISTRY.names`.
    **options: tuning knobs of the chosen backend (for `triton` and `interpret` they
      override `tiles.TILES`, or `tiles.SWIGLU_TILES` for a fused activation; for the
      Mosaic GPU ones `tiles.MOSAIC_GPU_TILES`).

  Returns:
    `[M, N]` (`[M, N / 2]` with `swiglu`) in `out_dtype`; rows outside every group
    are unspecified (zero for `xla`).
  """
  fn = REGISTRY.get(implementation)
  if activation not in ACTIVATIONS:
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
  if activation == "swiglu" and w.shape[-1] % 2:
    raise ValueError("activation='swiglu' needs a fused gate/up weight with an even "
                     f"number of columns, got w of shape {w.shape}")
  return fn(x, w, group_offsets, row_token, active_experts=active_experts,
            num_active=num_active, num_rows=num_rows, activation=activation,
            out_dtype=out_dtype, **options)

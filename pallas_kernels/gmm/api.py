"""The expert-skipping grouped matmul op: `gmm(..., implementation=)`.

`out[r] = x[row_token[r]] @ w[expert(r)]` over the rows of the experts' groups, in
float32; the weights of experts without rows are not read. Implementations
(`IMPLEMENTATIONS`, `REGISTRY`):
  triton         Pallas Triton kernel (NVIDIA GPUs), `triton.gmm_triton` with the
                 tuned `tiles.TILES`.
  tpu            Pallas Mosaic kernel (TPUs), `tpu.gmm_tpu`.
  interpret      the Triton kernel in Pallas interpret mode (any backend).
  tpu_interpret  the TPU kernel in Pallas' TPU interpret mode (any backend).
  xla            the pure-jnp reference, `reference.gmm_reference`.
  auto           triton on GPU, tpu on TPU, interpret elsewhere.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

from sere_jax.kernels import registry
from sere_jax.kernels.gmm.reference import gmm_reference
from sere_jax.kernels.gmm.tiles import TILES
from sere_jax.kernels.gmm.tpu import gmm_tpu
from sere_jax.kernels.gmm.triton import gmm_triton
from sere_jax.kernels.schedule.reference import active_experts_from_offsets


def _triton(x, w, group_offsets, row_token, *, active_experts, num_active, num_rows,
            **options):
  del active_experts, num_active  # the kernel finds the experts with rows itself
  return gmm_triton(x, w, group_offsets, row_token, num_rows=num_rows,
                    **dict(TILES, **options))


def _tpu(x, w, group_offsets, row_token, *, active_experts, num_active, num_rows,
         **options):
  if active_experts is None:
    active_experts = active_experts_from_offsets(group_offsets)
  if num_active is None:
    num_active = jnp.sum(jnp.diff(group_offsets) > 0, dtype=jnp.int32)
  return gmm_tpu(x, w, group_offsets, active_experts, num_active, row_token,
                 num_rows=num_rows, **options)


def _reference(x, w, group_offsets, row_token, *, active_experts, num_active, num_rows):
  del active_experts, num_active
  return gmm_reference(x, w, group_offsets, row_token, num_rows)


IMPLEMENTATIONS = {
    "triton": _triton,
    "tpu": _tpu,
    "interpret": lambda *args, **kw: _triton(*args, interpret=True, **kw),
    "tpu_interpret": lambda *args, **kw: _tpu(*args, interpret=pltpu.InterpretParams(),
                                              **kw),
    "xla": _reference,
}
REGISTRY = registry.Registry("gmm", IMPLEMENTATIONS, references=("xla",), fallback="xla")


def gmm(x: jax.Array, w: jax.Array, group_offsets: jax.Array,
        row_token: jax.Array | None = None, *, active_experts: jax.Array | None = None,
        num_active: jax.Array | None = None, num_rows: int | None = None,
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
    implementation: one of `REGISTRY.names`.
    **options: tuning knobs of the chosen backend (for `triton` and `interpret` they
      override `tiles.TILES`).

  Returns:
    `[M, N]` float32; rows outside every group are unspecified (zero for `xla`).
  """
  fn = REGISTRY.get(implementation)
  return fn(x, w, group_offsets, row_token, active_experts=active_experts,
            num_active=num_active, num_rows=num_rows, **options)

"""Times what one more kernel costs inside a decode-style loop on a GPU.

    python tools/kernel_boundary_cost.py OUT.json [VARIANTS]

A chain of tiny dependent kernels (each reads a `[32, 256]` float32 array, 32 KB, and
writes `x * 1.0001 + 0.5`) runs in one jitted `fori_loop`, as the decode loop runs its
layers, and the time per kernel is the difference between chains of 64 and 8 kernels
divided by 56. Variants (default: all):
  xla              XLA fusions (an optimization barrier keeps them apart)
  triton           Pallas Triton kernels, 4 programs
  mgpu             Pallas Mosaic GPU kernels, one block, TMA copies in and out
  mgpu_wait        the same launched with programmatic dependent launch (PDL): the
                   kernel waits (`griddepcontrol_wait`) before it reads its input
  mgpu_pdl         the same, and each kernel lets its successor launch at once
                   (`griddepcontrol_launch_dependents`)
  triton_mgpu_pdl  Triton and PDL Mosaic GPU kernels alternating
  xla_mgpu_pdl     XLA fusions and PDL Mosaic GPU kernels alternating
  *_nocb           a variant compiled without XLA command buffers (CUDA graphs)
The JSON holds µs per kernel per variant (and the error of a three-kernel chain
against jnp); a variant that fails records its error and the others go on.
"""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.experimental.pallas import triton as plt

from sere_jax import benchmarking
from sere_jax import fileio
from sere_jax.benchmarking import timing

ROWS, COLS = 32, 256
SHORT, LONG, ROUNDS = 8, 64, 50
OUT = jax.ShapeDtypeStruct((ROWS, COLS), jnp.float32)


def _update(x):
  return x * 1.0001 + 0.5


def xla_step(x: jax.Array) -> jax.Array:
  return jax.lax.optimization_barrier(_update(x))


def triton_step(x: jax.Array, programs: int = 4) -> jax.Array:
  def kernel(x_ref, o_ref):
    o_ref[...] = _update(x_ref[...])

  block = pl.BlockSpec((ROWS // programs, COLS), lambda i: (i, 0))
  return pl.pallas_call(kernel, grid=(programs,), out_shape=OUT, in_specs=[block],
                        out_specs=block,
                        compiler_params=plt.CompilerParams(num_warps=4, num_stages=1))(x)


def mosaic_step(x: jax.Array, *, wait: bool = False, trigger: bool = False) -> jax.Array:
  def body(x_gmem, o_gmem):
    if trigger:
      plgpu.griddepcontrol_launch_dependents()
    if wait:  # before the first read of the predecessor's output
      plgpu.griddepcontrol_wait()

    def scoped(x_smem, o_smem, barrier):
      plgpu.copy_gmem_to_smem(x_gmem, x_smem, barrier)
      plgpu.barrier_wait(barrier)
      o_smem[...] = _update(x_smem[...])
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(o_smem, o_gmem)
      plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(scoped, plgpu.SMEM((ROWS, COLS), jnp.float32),
                  plgpu.SMEM((ROWS, COLS), jnp.float32), plgpu.Barrier(num_arrivals=1))

  return plgpu.kernel(body, out_type=OUT, grid=(1,), grid_names=("block",),
                      kernel_name="boundary_cost_mosaic")(x)


PDL_STEP = functools.partial(mosaic_step, wait=True, trigger=True)
STEPS = {
    "xla": (xla_step,),
    "triton": (triton_step,),
    "mgpu": (mosaic_step,),
    "mgpu_wait": (functools.partial(mosaic_step, wait=True),),
    "mgpu_pdl": (PDL_STEP,),
    "triton_mgpu_pdl": (triton_step, PDL_STEP),
    "xla_mgpu_pdl": (xla_step, PDL_STEP),
}
VARIANTS = (*STEPS, "xla_nocb", "triton_nocb", "mgpu_pdl_nocb")


def chain(variant: str, length: int):
  """A jitted `(x, rounds) -> x` running `rounds` times a chain of `length` kernels."""
  steps = STEPS[variant.removesuffix("_nocb")]
  options = ({"xla_gpu_enable_command_buffer": ""} if variant.endswith("_nocb")
             else None)

  def body(_, x):
    for i in range(length):
      x = steps[i % len(steps)](x)
    return x

  return jax.jit(lambda x, rounds: jax.lax.fori_loop(0, rounds, body, x),
                 static_argnums=1, compiler_options=options)


def _seconds(fn, x) -> float:
  jax.block_until_ready(fn(x, ROUNDS))  # compiles and warms up
  return timing.median_seconds(lambda: fn(x, ROUNDS), 7)


def measure(variant: str) -> dict:
  x = jnp.ones((ROWS, COLS), jnp.float32)
  expected = _update(_update(_update(x)))
  error = float(jnp.max(jnp.abs(chain(variant, 3)(x, 1) - expected)))
  short, long = _seconds(chain(variant, SHORT), x), _seconds(chain(variant, LONG), x)
  return dict(us_per_kernel=(long - short) / ((LONG - SHORT) * ROUNDS) * 1e6,
              max_error=error, short_chain_ms=short * 1e3, long_chain_ms=long * 1e3)


def main(argv: list[str]) -> None:
  variants = argv[2].split(",") if len(argv) > 2 else VARIANTS
  rows = {}
  for variant in variants:
    try:
      rows[variant] = measure(variant)
    except Exception as err:  # pylint: disable=broad-except
      rows[variant] = dict(error=f"{type(err).__name__}: {err}"[:600])
    print(variant, rows[variant], flush=True)
  fileio.write_json_atomic(argv[1], dict(
      command="python tools/kernel_boundary_cost.py " + " ".join(argv[1:]),
      env=benchmarking.environment(), rows=rows), compact=True)


if __name__ == "__main__":
  main(sys.argv)

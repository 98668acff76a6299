"""Timing helpers for benchmarks on any backend: the environment record
of a result, the device's read and copy bandwidths (the rooflines' denominators), and
`LayerChain`, which times one layer inside one jit — a `fori_loop` over rounds, each
round running a chain of layers whose weights differ (so caches never serve a repeat),
with a data dependency from each layer to the next; the chain update itself is timed
with a trivial step and subtracted (`chain_overhead`).
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def environment() -> dict[str, Any]:
  """Device kind, backend and library versions for a benchmark record."""
  device = jax.devices()[0]
  import flax  # pylint: disable=g-import-not-at-top
  return {
      "backend": jax.default_backend(),
      "device_kind": device.device_kind,
      "device_count": jax.device_count(),
      "jax": jax.__version__,
      "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else jax.__version__,
      "flax": flax.__version__,
      "python": platform.python_version(),
      "host": platform.node(),
      "git_commit": _git_commit(),
  }


def _git_commit() -> str | None:
  """The source tree's commit (with `+dirty` for local changes), if it is a git checkout."""
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  try:
    commit = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True, check=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", root, "status", "--porcelain"],
                           capture_output=True, text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return None
  return commit + ("+dirty" if dirty else "")


def _median_seconds(fn: Callable[[], Any], repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def read_bandwidth(num_bytes: int = 4 << 30, repeats: int = 10) -> float:
  """HBM read bandwidth in bytes/s: the best of a few read-only reductions.

  XLA's reductions differ in how close they get to the memory system's limit; the
  fastest one is the tightest (most honest) roofline.
  """
  cols = 8192
  rows = max(1, num_bytes // (4 * cols))
  buf = jax.random.uniform(jax.random.PRNGKey(1), (rows, cols), jnp.float32)
  reductions = [lambda b: jnp.sum(b, axis=1), lambda b: jnp.sum(b, axis=0),
                lambda b: jnp.max(b.reshape(-1, 128, cols), axis=1)]
  best = 0.0
  for fn in reductions:
    reduce = jax.jit(fn)
    jax.block_until_ready(reduce(buf))
    best = max(best, rows * cols * 4 / _median_seconds(lambda: reduce(buf), repeats))
  return best


def copy_bandwidth(num_bytes: int = 2 << 30, repeats: int = 10) -> float:
  """Device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
  n = num_bytes // 4
  buf = jax.random.uniform(jax.random.PRNGKey(2), (n,), jnp.float32)
  copy = jax.jit(lambda b: b * 1.0001)
  jax.block_until_ready(copy(buf))
  seconds = _median_seconds(lambda: copy(buf), repeats)
  return 2 * n * 4 / seconds


def _normalise(x: jax.Array) -> jax.Array:
  xf = x.astype(jnp.float32)
  return (xf * jax.lax.rsqrt(jnp.mean(xf * xf) + 1e-6)).astype(x.dtype)


class LayerChain:
  """Times `step(x, *layer_args[i])` over a chain of layers inside one jit.

  `step` returns an array shaped like `x` (or a tuple whose first element is);
  the next layer's input is the normalised sum, as a residual stream would be.
  """

  def __init__(self, step: Callable[..., Any]):
    def run(x, rounds, layer_args):
      def one_round(_, x):
        for args in layer_args:
          # The barrier ties each layer's inputs to the running x, so that no
          # layer's work is hoisted out of the loop as invariant.
          x, args = jax.lax.optimization_barrier((x, args))
          y = step(x, *args)
          y = y[0] if isinstance(y, tuple) else y
          x = _normalise(x + y.astype(x.dtype))
        return x
      return jax.lax.fori_loop(0, rounds, one_round, x)
    self._run = jax.jit(run)

  def seconds_per_layer(self, x: jax.Array, layer_args: Sequence[tuple],
                        min_seconds: float = 0.03, repeats: int = 5) -> float:
    """Median seconds per layer step (chain update included)."""
    layer_args = tuple(tuple(a) for a in layer_args)
    jax.block_until_ready(self._run(x, 1, layer_args))  # compile + warm up
    once = _median_seconds(lambda: self._run(x, 1, layer_args), 3)
    rounds = max(1, int(np.ceil(min_seconds / max(once, 1e-6))))
    total = _median_seconds(lambda: self._run(x, rounds, layer_args), repeats)
    return total / (rounds * len(layer_args))


def chain_overhead(x: jax.Array, num_layers: int, **kwargs) -> float:
  """Seconds per layer of the chain update alone (to subtract from step times)."""
  chain = LayerChain(lambda x, dummy: x)
  return chain.seconds_per_layer(x, [(jnp.zeros((), x.dtype),)] * num_layers, **kwargs)

"""Timing helpers for benchmarks on any backend: the environment record
of a result (`environment`; `select_platform` picks the device first) and
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


def select_platform(name: str) -> None:
  """Makes JAX run on the `name` devices (`cpu`, `gpu`, `tpu`; empty: whatever JAX
  finds). Raises ValueError naming the platform and the devices that are there when
  it is missing or is not JAX's default backend. `cpu` works everywhere if called
  before JAX initialises a backend (it sets `jax_platforms`)."""
  if not name:
    return
  if name == "cpu":
    jax.config.update("jax_platforms", "cpu")
  try:
    jax.devices(name)
  except Exception as e:  # pylint: disable=broad-except  # JAX raises several types
    reason = (str(e).splitlines() or [type(e).__name__])[0]
    raise ValueError(f"no {name} device here ({reason}); JAX finds "
                     f"{_device_list()}") from None
  if jax.default_backend() != name:
    raise ValueError(f"{name} devices are here but JAX's default backend is "
                     f"{jax.default_backend()!r}; set JAX_PLATFORMS={name}")


def _device_list() -> str:
  try:
    return ", ".join(sorted({f"{d.platform} ({d.device_kind})" for d in jax.devices()}))
  except Exception:  # pylint: disable=broad-except
    return "no devices"


def environment() -> dict[str, Any]:
  """Device kind, backend and library versions for a benchmark record; also the
  backend's platform version (CUDA / libtpu), the NVIDIA driver (GPUs, from
  `nvidia-smi`) and the bytes JAX may allocate on the device (None on a CPU)."""
  device = jax.devices()[0]
  import flax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  try:
    stats = device.memory_stats() or {}
  except Exception:  # pylint: disable=broad-except  # not every backend has it
    stats = {}
  return {
      "backend": jax.default_backend(),
      "device_kind": device.device_kind,
      "device_count": jax.device_count(),
      "platform_version": _platform_version(),
      "driver": _nvidia_driver() if jax.default_backend() == "gpu" else None,
      "device_bytes_limit": stats.get("bytes_limit"),
      "jax": jax.__version__,
      "jaxlib": getattr(jaxlib, "__version__", None),
      "flax": flax.__version__,
      "python": platform.python_version(),
      "host": platform.node(),
      "git_commit": _git_commit(),
  }


def _platform_version() -> str | None:
  try:
    from jax.extend import backend  # pylint: disable=g-import-not-at-top
    return str(backend.get_backend().platform_version).strip()
  except Exception:  # pylint: disable=broad-except
    return None


def _nvidia_driver() -> str | None:
  """The NVIDIA driver version `nvidia-smi` reports, if it runs."""
  try:
    out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version",
                          "--format=csv,noheader"], capture_output=True, text=True,
                         check=True, timeout=30).stdout.split()
  except (OSError, subprocess.SubprocessError):
    return None
  return out[0] if out else None


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


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
  """The median wall time of `repeats` calls of `fn`, each waited for on the device."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _normalise(x: jax.Array) -> jax.Array:
  xf = x.astype(jnp.float32)
  return (xf * jax.lax.rsqrt(jnp.mean(xf * xf) + 1e-6)).astype(x.dtype)


class LayerChain:
  """Times `step(x, *layer_args[i])` over a chain of layers inside one jit.

  `step` returns an array shaped like `x` (or a tuple whose first element is);
  the next layer's input is the normalised sum, as a residual stream would be.
  `compiler_options` (XLA debug options by name) go to the chain's `jax.jit`.

  With `carry_args`, `step` returns `(y, new_args)` and each layer's arguments are
  carried through the loop and donated, as a decode step carries its KV cache (a
  kernel that writes its cache in place then copies nothing); the arguments given to
  `seconds_per_layer` are consumed, and `layer_args` holds the updated ones after it.
  """

  def __init__(self, step: Callable[..., Any],
               compiler_options: dict[str, Any] | None = None, *, carry_args: bool = False):
    def layer(x, args):
      # The barrier ties each layer's inputs to the running x, so that no layer's
      # work is hoisted out of the loop as invariant.
      x, args = jax.lax.optimization_barrier((x, args))
      out = step(x, *args)
      if carry_args:
        y, args = out
      else:
        y = out[0] if isinstance(out, tuple) else out
      return _normalise(x + y.astype(x.dtype)), tuple(args)

    def run(x, rounds, layer_args):
      def one_round(_, x):
        for args in layer_args:
          x, _ = layer(x, args)
        return x
      return jax.lax.fori_loop(0, rounds, one_round, x)

    def run_carried(x, rounds, layer_args):
      def one_round(_, carry):
        x, layer_args = carry
        new_args = []
        for args in layer_args:
          x, args = layer(x, args)
          new_args.append(args)
        return x, tuple(new_args)
      return jax.lax.fori_loop(0, rounds, one_round, (x, layer_args))

    self._carry_args = carry_args
    self.layer_args: tuple[tuple, ...] | None = None
    self._run = (jax.jit(run_carried, compiler_options=compiler_options, donate_argnums=2)
                 if carry_args else jax.jit(run, compiler_options=compiler_options))

  def seconds_per_layer(self, x: jax.Array, layer_args: Sequence[tuple],
                        min_seconds: float = 0.03, repeats: int = 5) -> float:
    """Median seconds per layer step (chain update included)."""
    args = tuple(tuple(a) for a in layer_args)

    def call(rounds):
      if not self._carry_args:
        return self._run(x, rounds, args)
      out, self.layer_args = self._run(x, rounds, self.layer_args)
      return out

    self.layer_args = args if self._carry_args else None
    jax.block_until_ready(call(1))  # compile + warm up
    once = median_seconds(lambda: call(1), 3)
    rounds = max(1, int(np.ceil(min_seconds / max(once, 1e-6))))
    total = median_seconds(lambda: call(rounds), repeats)
    return total / (rounds * len(args))


def chain_overhead(x: jax.Array, num_layers: int, **kwargs) -> float:
  """Seconds per layer of the chain update alone (to subtract from step times)."""
  chain = LayerChain(lambda x, dummy: x)
  return chain.seconds_per_layer(x, [(jnp.zeros((), x.dtype),)] * num_layers, **kwargs)

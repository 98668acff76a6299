"""Device memory for the decode benchmarks: the GPU memory fraction the benchmark asks
JAX for, and whether a model fits the device at a batch size, checked before anything
is built or compiled.

JAX preallocates 75 % of a GPU's memory by default; Qwen3-30B-A3B's bf16 weights alone
are 61 GB (57 GiB), so on an 80 GB card its KV cache and activations do not fit in the
remaining 3 GiB of that pool. `set_memory_fraction` raises the fraction to
`BENCHMARK_MEM_FRACTION` (through `XLA_PYTHON_CLIENT_MEM_FRACTION`, read when JAX
initialises its GPU backend) unless the user set it. `decode_bytes` estimates what one
case needs: the parameters, the KV cache twice (the prefill's, kept, and the copy a
timed pass runs on), the prefill's activations and `WORKSPACE_BYTES`; `check_fits`
compares that with the device's `memory_stats()["bytes_limit"]` (a CPU reports none:
nothing is checked there).
"""

from __future__ import annotations

import math
import os
from typing import Any, MutableMapping, Sequence

from flax import nnx
import jax
import jax.numpy as jnp

from sere_jax import expert_parallel
from sere_jax.benchmarking import decode_models

MEM_FRACTION_ENV = "XLA_PYTHON_CLIENT_MEM_FRACTION"
BENCHMARK_MEM_FRACTION = "0.95"
# Compiler scratch, cuBLAS / Triton workspaces and allocator slack.
WORKSPACE_BYTES = 1 << 30
# Copies of the KV cache alive while a decode case is timed.
KV_COPIES = 2


class DoesNotFitError(RuntimeError):
  """A benchmark case needs more device memory than the device has."""


def set_memory_fraction(fraction: str = BENCHMARK_MEM_FRACTION,
                        environ: MutableMapping[str, str] | None = None) -> str:
  """Sets `XLA_PYTHON_CLIENT_MEM_FRACTION` to `fraction` unless it is set already;
  returns a line saying what was done. Call it before JAX initialises a backend (the
  variable is read then): afterwards nothing is changed, and the line says so."""
  environ = os.environ if environ is None else environ
  if MEM_FRACTION_ENV in environ:
    return f"{MEM_FRACTION_ENV}={environ[MEM_FRACTION_ENV]} (set by the user)"
  if _backends_initialized():
    return (f"{MEM_FRACTION_ENV} not set and JAX's backend already initialised: JAX's "
            "default GPU memory fraction (0.75) applies")
  environ[MEM_FRACTION_ENV] = fraction
  return (f"{MEM_FRACTION_ENV}={fraction} set by the benchmark (JAX's default, 0.75 of "
          "the GPU, leaves no room for Qwen3-30B-A3B's KV cache and activations on an "
          "80 GB card); set the variable yourself to choose another value")


def _backends_initialized() -> bool:
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):
    return False


def device_bytes_limit(device: Any = None) -> int | None:
  """The bytes JAX may allocate on `device` (default: the first), or None where the
  device does not say (a CPU)."""
  device = jax.devices()[0] if device is None else device
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except  # not every backend implements it
    return None
  if not stats or "bytes_limit" not in stats:
    return None
  return int(stats["bytes_limit"])


def _nbytes(tree: Any) -> int:
  return sum(math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize
             for leaf in jax.tree.leaves(tree) if hasattr(leaf, "shape"))


def decode_bytes(model: str, scale: str, batches: Sequence[int], prompt_len: int,
                 new_tokens: int, expert_devices: int = 1) -> dict[str, Any]:
  """What the decode benchmark of `model` at `scale` needs per batch size, from the
  model's shapes alone (nothing is allocated): `{"param_bytes", "per_batch": {B:
  {"kv_bytes", "activation_bytes", "total_bytes"}}}`; `kv_bytes` counts `KV_COPIES`
  caches, `activation_bytes` is an estimate of the prefill's (every position's hidden
  state, attention scores and expert activations in float32, and the last position's
  logits) and `total_bytes` adds the parameters and `WORKSPACE_BYTES`. With
  `expert_devices` N > 1, one device's share: the routed experts' weights split N ways
  (`sere_jax.expert_parallel`), everything else whole."""
  net, _, hf = decode_models.abstract_model(model, scale)
  state = nnx.state(net)
  param_bytes = _nbytes(state)
  if expert_devices > 1:
    experts = _nbytes([v for path, v in jax.tree.leaves_with_path(state)
                       if set(expert_parallel.EXPERT_PARAMS)
                       & {getattr(k, "key", None) for k in path}])
    param_bytes += -experts + -(-experts // expert_devices)
  total_len = prompt_len + new_tokens - 1
  d = hf["hidden_size"]
  heads = hf["num_attention_heads"]
  k = hf["num_experts_per_tok"]
  ffn = max(hf["moe_intermediate_size"], hf.get("shared_expert_intermediate_size") or 0,
            hf.get("intermediate_size") or 0)
  attn_width = heads * (hf.get("head_dim") or d // heads) * 3
  per_token = 4 * (8 * d + k * (3 * hf["moe_intermediate_size"] + d) + 3 * ffn
                   + 2 * heads * total_len + attn_width)
  per_batch = {}
  for batch in batches:
    cache = jax.eval_shape(lambda b=batch: net.init_cache(b, total_len, jnp.bfloat16))
    kv = KV_COPIES * _nbytes(cache)
    activations = batch * prompt_len * per_token + 2 * 4 * batch * hf["vocab_size"]
    per_batch[int(batch)] = dict(kv_bytes=kv, activation_bytes=activations,
                                 total_bytes=param_bytes + kv + activations
                                 + WORKSPACE_BYTES)
  return dict(param_bytes=param_bytes, per_batch=per_batch)


def _gib(n: float) -> str:
  return f"{n / 2**30:.2f} GiB"


def check_fits(needs: dict[str, dict[str, Any]], bytes_limit: int | None) -> None:
  """Raises DoesNotFitError naming every case of `needs` (`{label: decode_bytes
  entry with "param_bytes" merged in}`) whose `total_bytes` exceed `bytes_limit`, with
  its parts and the device's limit; nothing is checked when `bytes_limit` is None."""
  if bytes_limit is None:
    return
  over = {label: need for label, need in needs.items() if need["total_bytes"] > bytes_limit}
  if not over:
    return
  lines = [f"{label} needs {need['total_bytes']:,} bytes ({_gib(need['total_bytes'])}: "
           f"parameters {_gib(need['param_bytes'])}, KV cache {_gib(need['kv_bytes'])}, "
           f"activations ~{_gib(need['activation_bytes'])}, workspace "
           f"{_gib(WORKSPACE_BYTES)})" for label, need in over.items()]
  fraction = os.environ.get(MEM_FRACTION_ENV)
  raise DoesNotFitError(
      "does not fit the device: " + "; ".join(lines) + f"; the device gives JAX "
      f"{bytes_limit:,} bytes ({_gib(bytes_limit)}"
      + (f", {MEM_FRACTION_ENV}={fraction}" if fraction else "") + "). Use smaller "
      f"batch sizes, or raise {MEM_FRACTION_ENV} if the card has more memory.")


def decode_needs(model: str, scale: str, batches: Sequence[int], prompt_len: int,
                 new_tokens: int, expert_devices: int = 1) -> dict[str, dict[str, Any]]:
  """`decode_bytes` as `{"<model> B=<batch>": need}` for `check_fits`."""
  plan = decode_bytes(model, scale, batches, prompt_len, new_tokens, expert_devices)
  return {f"{model} B={b}": dict(need, param_bytes=plan["param_bytes"])
          for b, need in plan["per_batch"].items()}

"""Calibrating SERE's expert similarity on a real model, and storing it with the model.

    matrices = calibrate(model, batches, "frobenius", token_budget=400 * 128)
    apply_similarity(model, matrices)                  # every MoeBlock.similarity
    save_similarity(model_dir, matrices, {"metric": "frobenius", "tokens": 51200,
                                          "data_source": "fineweb-edu"})
    matrices, metadata = load_similarity(model_dir)    # sere_similarity.safetensors

How inputs are captured: each `MoeBlock` sows its input `x [T, D]` and valid mask
`[T]` as `nnx.Intermediate`s, which only happens inside `nnx.capture` (a no-op on the
normal path). One jitted prefill per batch (no re-routing, no KV cache kept) returns
every MoE layer's inputs; then one jitted update per layer moves the valid tokens to
the front, runs every expert on them `token_chunk` tokens and `expert_chunk` experts
at a time (`similarity.expert_outputs`) and streams the outputs into the layer's
`similarity.SimilarityState`. Padding tokens and tokens past `token_budget` are
excluded: their outputs are zeroed and not counted.
"""

from __future__ import annotations

import datetime
import functools
import os
from typing import Any, Callable, Iterable, Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from sere_jax import moe
from sere_jax import numerics
from sere_jax import similarity

SIMILARITY_FILE = "sere_similarity.safetensors"
METADATA_KEYS = ("metric", "tokens", "data_source", "created")

# A batch is `tokens [B, L]` (all valid) or `(tokens [B, L], valid [B, L] bool)` with
# padding on the left (models/layers.py conventions).
Batch = np.ndarray | tuple[np.ndarray, np.ndarray]


def _moe_paths(model: nnx.Module) -> list[tuple]:
  return [path for path, m in nnx.iter_graph(model) if isinstance(m, moe.MoeBlock)]


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_dtype"))
def capture_moe_inputs(graphdef, state, tokens, valid, *, cache_dtype):
  """One prefill without re-routing -> (inputs `[T, D]`, valid `[T]`) per MoE layer."""
  model = nnx.merge(graphdef, state)
  for block in moe.moe_blocks(model):
    block.reroute = moe.NO_REROUTE
  batch, length = tokens.shape
  positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0).astype(jnp.int32)
  cache = model.init_cache(batch, length, cache_dtype)

  def forward(m):
    return m(tokens, positions, valid, cache, valid, jnp.zeros((), jnp.int32),
             decode=False).stats

  _, sown = nnx.capture(forward, nnx.Intermediate)(model)
  flat = dict(nnx.to_flat_state(sown))

  def only(path, name):  # each block runs once per forward: a 1-tuple
    (value,) = flat[(*path, name)].get_value()
    return value

  return [(only(p, moe.CAPTURE_INPUT), only(p, moe.CAPTURE_VALID))
          for p in _moe_paths(model)]


@functools.partial(jax.jit, static_argnames=("metric", "expert_chunk", "token_chunk"),
                   donate_argnames=("state",))
def _update_layer(state, x, mask, w_gate_up, w_down, *, metric, expert_chunk, token_chunk):
  """Streams the experts' outputs on the tokens `x [T, D]` where `mask` into `state`."""
  count = jnp.sum(mask, dtype=jnp.int32)
  order = jnp.argsort(~mask, stable=True)  # valid tokens first, in order
  pad = -x.shape[0] % token_chunk
  x = jnp.pad(x[order], ((0, pad), (0, 0)))

  def body(i, st):
    start = i * token_chunk
    chunk = jax.lax.dynamic_slice_in_dim(x, start, token_chunk)
    keep = start + jnp.arange(token_chunk) < count
    out = similarity.expert_outputs(chunk, w_gate_up, w_down, expert_chunk)
    new = similarity.update(st, jnp.where(keep[None, :, None], out, 0.0), metric)
    return new._replace(tokens=st.tokens + jnp.sum(keep, dtype=jnp.int32))

  steps = (count + token_chunk - 1) // token_chunk
  return jax.lax.fori_loop(0, steps, body, state)


def _batch_arrays(batch: Batch) -> tuple[np.ndarray, np.ndarray]:
  tokens, valid = batch if isinstance(batch, tuple) else (batch, None)
  tokens = np.asarray(tokens, np.int32)
  valid = np.ones(tokens.shape, bool) if valid is None else np.asarray(valid, bool)
  if tokens.ndim != 2 or valid.shape != tokens.shape:
    raise ValueError(f"a batch needs tokens [B, L] and valid [B, L]; got {tokens.shape} "
                     f"and {valid.shape}")
  return tokens, valid


def calibrate(model: nnx.Module, token_batches: Iterable[Batch], metric: str, *,
              token_budget: int, expert_chunk: int = 16, token_chunk: int = 256,
              gram_tokens: int = 1024,
              progress: Callable[[int, int], None] | None = None) -> list[jax.Array]:
  """Expert similarity `[E, E]` of every MoE layer, in layer order.

  Runs the model over `token_batches` (see `Batch`) until `token_budget` valid tokens
  were used (the CKA metrics stop at `min(token_budget, gram_tokens)`, the tokens
  they keep); `progress(tokens_so_far, budget)` is called after each batch. `weights`
  needs no data (`similarity.weight_similarity`; `token_batches` is not read).

  Memory (float32 unless noted; T = tokens per batch, E experts, D hidden, F expert
  width, c = min(expert_chunk, E), t = token_chunk, G = gram_tokens):
    * per batch: one prefill (no KV cache kept beyond it) and every MoE layer's input,
      `layers x T x D` in the model's dtype;
    * per chunk: the experts' outputs `E x t x D` (about three copies: raw, masked,
      normalised for cosine), `c x t x 2F` activations and `c` experts' weights in
      float32. For Qwen3-30B-A3B (E=128, D=2048, F=768) at t=256, c=16:
      3 x 0.27 GB + 25 MB + 0.3 GB, whatever the batch or the token budget;
    * state: `E x E` per layer; CKA adds `E x G x D` per layer (1 GB per layer for
      Qwen3-30B-A3B at G=1024: lower `gram_tokens` for many layers).
  """
  blocks = moe.moe_blocks(model)
  if metric == "weights":
    weights = jax.jit(similarity.weight_similarity, static_argnames="expert_chunk")
    return [weights(b.w_gate_up[...], b.w_down[...], expert_chunk=expert_chunk)
            for b in blocks]
  if token_budget < 1:
    raise ValueError(f"token_budget must be >= 1, got {token_budget}")
  gram = gram_tokens if metric.startswith("cka") else 0
  budget = min(token_budget, gram) if gram else token_budget
  states = [similarity.init_state(metric, b.num_experts, b.w_gate_up.shape[1],
                                  gram_tokens=gram) for b in blocks]
  graphdef, state = nnx.split(model)
  cache_dtype = numerics.param_dtype(model)
  used = 0
  for batch in token_batches:
    tokens, valid = _batch_arrays(batch)
    flat = valid.reshape(-1)
    take = flat & (np.cumsum(flat) <= budget - used)  # the budget's share of this batch
    captured = capture_moe_inputs(graphdef, state, jnp.asarray(tokens), jnp.asarray(valid),
                               cache_dtype=cache_dtype)
    for i, (block, (x, x_valid)) in enumerate(zip(blocks, captured)):
      states[i] = _update_layer(states[i], x, x_valid & jnp.asarray(take),
                                block.w_gate_up[...], block.w_down[...], metric=metric,
                                expert_chunk=expert_chunk, token_chunk=token_chunk)
    used += int(take.sum())
    if progress is not None:
      progress(used, budget)
    if used >= budget:
      break
  if used == 0:
    raise ValueError("no valid calibration tokens were given")
  finalize = jax.jit(similarity.finalize, static_argnames="metric")
  return [finalize(s, metric=metric) for s in states]


def apply_similarity(model: nnx.Module, matrices: Sequence[Any]) -> None:
  """Sets every MoE layer's similarity; ValueError (naming the layer) if one does not
  fit its layer's experts or is not finite."""
  blocks = moe.moe_blocks(model)
  if len(matrices) != len(blocks):
    raise ValueError(f"{len(matrices)} similarity matrices for {len(blocks)} MoE layers")
  arrays = [np.asarray(m, np.float32) for m in matrices]
  for i, (block, sim) in enumerate(zip(blocks, arrays)):
    expected = (block.num_experts, block.num_experts)
    if sim.shape != expected:
      raise ValueError(f"MoE layer {i}: similarity has shape {sim.shape}, expected "
                       f"{expected}")
    if not np.all(np.isfinite(sim)):
      raise ValueError(f"MoE layer {i}: similarity holds NaN or inf")
  for block, sim in zip(blocks, arrays):
    block.similarity.set_value(jnp.asarray(sim))


def save_similarity(directory: str, matrices: Sequence[Any], metadata: dict[str, Any]
                    ) -> str:
  """Writes `directory/sere_similarity.safetensors` atomically; returns its path.

  `metadata` needs `metric`, `tokens` and `data_source`; `created` defaults to now
  (UTC, ISO 8601). Values are stored as strings.
  """
  missing = [k for k in METADATA_KEYS[:3] if k not in metadata]
  if missing:
    raise ValueError(f"similarity metadata lacks {missing}")
  meta = {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(
      timespec="seconds")}
  meta.update({k: str(v) for k, v in metadata.items()})
  tensors = {f"layer_{i}": np.ascontiguousarray(np.asarray(m, np.float32))
             for i, m in enumerate(matrices)}
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, SIMILARITY_FILE)
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "wb") as fh:
    fh.write(safetensors.numpy.save(tensors, metadata=meta))
    fh.flush()
    os.fsync(fh.fileno())
  os.replace(tmp, path)
  return path


def load_similarity(directory: str) -> tuple[list[np.ndarray], dict[str, str]]:
  """`(matrices in MoE-layer order, metadata)` from `directory/sere_similarity.safetensors`."""
  path = os.path.join(directory, SIMILARITY_FILE)
  with safetensors.safe_open(path, framework="numpy") as fh:
    metadata = dict(fh.metadata() or {})
    keys = set(fh.keys())
    expected = {f"layer_{i}" for i in range(len(keys))}
    if keys != expected:
      raise ValueError(f"{path}: expected keys layer_0..layer_{len(keys) - 1}, got "
                       f"{sorted(keys)}")
    matrices = [fh.get_tensor(f"layer_{i}") for i in range(len(keys))]
  return matrices, metadata


def layer_statistics(matrices: Sequence[Any], select_top_k: int | None = None,
                     threshold: float | None = None, *, top_k: int | None = None,
                     batch: int = 16) -> list[dict[str, float]]:
  """`similarity.summary` of every layer, with its MoE-layer index as `layer`."""
  return [{"layer": i, **similarity.summary(m, select_top_k, threshold, top_k=top_k,
                                            batch=batch)}
          for i, m in enumerate(matrices)]

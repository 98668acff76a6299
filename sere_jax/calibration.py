"""Calibrating SERE's expert similarity on a real model, and storing it with the model.

    matrices = calibrate(model, batches, "frobenius", token_budget=400 * 128)
    apply_similarity(model, matrices)                  # every MoeBlock.similarity
    save_similarity(model_dir, matrices, {"metric": "frobenius", "tokens": 51200,
                                          "data_source": "fineweb-edu"})
    matrices, metadata = load_similarity(model_dir)    # sere_similarity.safetensors

    stats = calibrate_pool(model, batches, token_budget=400 * 128)  # expert_pool policy
    apply_pool_stats(model, stats)                     # MoeBlock.set_pool_stats
    save_pool_stats(model_dir, stats, {"tokens": 51200, "data_source": "fineweb-edu"})

How inputs are captured: each `MoeBlock` sows its input `x [T, D]` and valid mask
`[T]` as `nnx.Intermediate`s, which only happens inside `nnx.capture` (a no-op on the
normal path). One jitted prefill per batch (no re-routing, no KV cache kept) returns
every MoE layer's inputs; then one jitted update per layer moves the valid tokens to
the front, runs every expert on them `token_chunk` tokens and `expert_chunk` experts
at a time (`similarity.expert_outputs`) and streams the outputs into the layer's
`similarity.SimilarityState` (or, for `calibrate_pool`, its `similarity.PoolState`).
Padding tokens and tokens past `token_budget` are excluded: their outputs are zeroed
and not counted.

The pool statistics are stored beside the model as `sere_pool_stats.safetensors`
(keys `output_norm_<i>` and `scale_<i>` per MoE layer); `checkpoint.load_model`
applies that file as it does the similarity's, and `checkpoint.save` keeps them in the
model state.
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
from sere_jax import similarity
from sere_jax.models import base as model_base
from sere_jax.models import hf_import

SIMILARITY_FILE = "sere_similarity.safetensors"
POOL_STATS_FILE = "sere_pool_stats.safetensors"
METADATA_KEYS = ("metric", "tokens", "data_source", "created")
# One MoE layer's `expert_pool` statistics: (output_norm [E], scale [E, E]).
PoolStats = tuple[Any, Any]

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


@functools.lru_cache(maxsize=None)
def _similarity_update(metric: str) -> Callable:
  """`similarity.update` for `metric` (one object per metric: a static jit argument)."""
  return functools.partial(similarity.update, metric=metric)


@functools.partial(jax.jit, static_argnames=("update", "expert_chunk", "token_chunk"),
                   donate_argnames=("state",))
def _update_layer(state, x, mask, w_gate_up, w_down, *, update, expert_chunk, token_chunk):
  """Streams the experts' outputs on the tokens `x [T, D]` where `mask` into `state`
  with `update(state, outputs [E, t, D])`."""
  count = jnp.sum(mask, dtype=jnp.int32)
  order = jnp.argsort(~mask, stable=True)  # valid tokens first, in order
  pad = -x.shape[0] % token_chunk
  x = jnp.pad(x[order], ((0, pad), (0, 0)))

  def body(i, st):
    start = i * token_chunk
    chunk = jax.lax.dynamic_slice_in_dim(x, start, token_chunk)
    keep = start + jnp.arange(token_chunk) < count
    out = similarity.expert_outputs(chunk, w_gate_up, w_down, expert_chunk)
    new = update(st, jnp.where(keep[None, :, None], out, 0.0))
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
  gram = gram_tokens if metric.startswith("cka") else 0
  budget = min(token_budget, gram) if gram else token_budget
  states = [similarity.init_state(metric, b.num_experts, b.w_gate_up.shape[1],
                                  gram_tokens=gram) for b in blocks]
  states = _stream(model, token_batches, states, _similarity_update(metric), budget,
                   expert_chunk=expert_chunk, token_chunk=token_chunk, progress=progress)
  finalize = jax.jit(similarity.finalize, static_argnames="metric")
  return [finalize(s, metric=metric) for s in states]


def calibrate_pool(model: nnx.Module, token_batches: Iterable[Batch], *,
                   token_budget: int, expert_chunk: int = 16, token_chunk: int = 256,
                   ridge: float = 1e-6,
                   progress: Callable[[int, int], None] | None = None
                   ) -> list[PoolStats]:
  """`expert_pool` statistics `(output_norm [E], scale [E, E])` of every MoE layer,
  in layer order (`similarity.finalize_pool_state`), from the same expert outputs as
  `calibrate` and with its arguments and memory, without the CKA prefix."""
  states = [similarity.init_pool_state(b.num_experts) for b in moe.moe_blocks(model)]
  states = _stream(model, token_batches, states, similarity.update_pool_state,
                   token_budget, expert_chunk=expert_chunk, token_chunk=token_chunk,
                   progress=progress)
  finalize = jax.jit(similarity.finalize_pool_state)
  return [finalize(s, ridge) for s in states]


def _stream(model: nnx.Module, token_batches: Iterable[Batch], states: list,
            update: Callable, budget: int, *, expert_chunk: int, token_chunk: int,
            progress: Callable[[int, int], None] | None) -> list:
  """Runs the model over `token_batches` until `budget` valid tokens were used and
  streams every MoE layer's expert outputs into its state with `update`."""
  if budget < 1:
    raise ValueError(f"token_budget must be >= 1, got {budget}")
  blocks = moe.moe_blocks(model)
  graphdef, state = nnx.split(model)
  cache_dtype = model_base.param_dtype(model)
  used = 0
  for batch in token_batches:
    tokens, valid = _batch_arrays(batch)
    flat = valid.reshape(-1)
    take = flat & (np.cumsum(flat) <= budget - used)  # the budget's share of this batch
    captured = capture_moe_inputs(graphdef, state, jnp.asarray(tokens), jnp.asarray(valid),
                                  cache_dtype=cache_dtype)
    for i, (block, (x, x_valid)) in enumerate(zip(blocks, captured)):
      states[i] = _update_layer(states[i], x, x_valid & jnp.asarray(take),
                                block.w_gate_up[...], block.w_down[...], update=update,
                                expert_chunk=expert_chunk, token_chunk=token_chunk)
    used += int(take.sum())
    if progress is not None:
      progress(used, budget)
    if used >= budget:
      break
  if used == 0:
    raise ValueError("no valid calibration tokens were given")
  return states


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


def apply_pool_stats(model: nnx.Module, stats: Sequence[PoolStats]) -> None:
  """Sets every MoE layer's `expert_pool` statistics (`MoeBlock.set_pool_stats`);
  ValueError (naming the layer) if one does not fit its layer or is not finite."""
  blocks = moe.moe_blocks(model)
  if len(stats) != len(blocks):
    raise ValueError(f"{len(stats)} pool statistics for {len(blocks)} MoE layers")
  arrays = [(np.asarray(n, np.float32), np.asarray(s, np.float32)) for n, s in stats]
  for i, (block, (norm, scale)) in enumerate(zip(blocks, arrays)):
    e = block.num_experts
    if norm.shape != (e,) or scale.shape != (e, e):
      raise ValueError(f"MoE layer {i}: pool statistics have shapes {norm.shape} and "
                       f"{scale.shape}, expected {(e,)} and {(e, e)}")
    if not (np.all(np.isfinite(norm)) and np.all(np.isfinite(scale))):
      raise ValueError(f"MoE layer {i}: pool statistics hold NaN or inf")
  for block, (norm, scale) in zip(blocks, arrays):
    block.set_pool_stats(jnp.asarray(norm), jnp.asarray(scale))


def save_similarity(directory: str, matrices: Sequence[Any], metadata: dict[str, Any]
                    ) -> str:
  """Writes `directory/sere_similarity.safetensors` atomically; returns its path.

  `metadata` needs `metric`, `tokens` and `data_source`; `created` defaults to now
  (UTC, ISO 8601). Values are stored as strings.
  """
  tensors = {f"layer_{i}": np.asarray(m, np.float32) for i, m in enumerate(matrices)}
  return _save(os.path.join(directory, SIMILARITY_FILE), tensors, metadata,
               METADATA_KEYS[:3])


def save_pool_stats(directory: str, stats: Sequence[PoolStats], metadata: dict[str, Any]
                    ) -> str:
  """Writes `directory/sere_pool_stats.safetensors` atomically; returns its path.

  `metadata` needs `tokens` and `data_source`; `created` defaults to now.
  """
  tensors = {}
  for i, (norm, scale) in enumerate(stats):
    tensors[f"output_norm_{i}"] = np.asarray(norm, np.float32)
    tensors[f"scale_{i}"] = np.asarray(scale, np.float32)
  return _save(os.path.join(directory, POOL_STATS_FILE), tensors, metadata,
               ("tokens", "data_source"))


def _save(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, Any],
          required: Sequence[str]) -> str:
  missing = [k for k in required if k not in metadata]
  if missing:
    raise ValueError(f"{os.path.basename(path)} metadata lacks {missing}")
  meta = {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(
      timespec="seconds")}
  meta.update({k: str(v) for k, v in metadata.items()})
  tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "wb") as fh:
    fh.write(safetensors.numpy.save(tensors, metadata=meta))
    fh.flush()
    os.fsync(fh.fileno())
  os.replace(tmp, path)
  return path


def load_similarity(directory: str) -> tuple[list[np.ndarray], dict[str, str]]:
  """`(matrices in MoE-layer order, metadata)` from `directory/sere_similarity.safetensors`."""
  tensors, metadata = _load(os.path.join(directory, SIMILARITY_FILE), ("layer",))
  return [t[0] for t in tensors], metadata


def load_pool_stats(directory: str) -> tuple[list[PoolStats], dict[str, str]]:
  """`(per-layer (output_norm, scale) in MoE-layer order, metadata)` from
  `directory/sere_pool_stats.safetensors`."""
  tensors, metadata = _load(os.path.join(directory, POOL_STATS_FILE),
                            ("output_norm", "scale"))
  return [(norm, scale) for norm, scale in tensors], metadata


def _load(path: str, prefixes: Sequence[str]
          ) -> tuple[list[tuple[np.ndarray, ...]], dict[str, str]]:
  """Per layer i, the tensors `<prefix>_<i>` of a file holding exactly those; errors
  name the file (missing, truncated or corrupt, other keys)."""
  with hf_import.open_safetensors(path) as fh:
    metadata = dict(fh.metadata() or {})
    keys = set(fh.keys())
    layers = len(keys) // len(prefixes)
    expected = {f"{p}_{i}" for p in prefixes for i in range(layers)}
    if keys != expected:
      names = " and ".join(f"{p}_0..{p}_{layers - 1}" for p in prefixes)
      raise ValueError(f"{path}: expected keys {names}, got {sorted(keys)}")
    tensors = [tuple(fh.get_tensor(f"{p}_{i}") for p in prefixes) for i in range(layers)]
  return tensors, metadata


def layer_statistics(matrices: Sequence[Any], select_top_k: int | None = None,
                     threshold: float | None = None, *, top_k: int | None = None,
                     batch: int = 16) -> list[dict[str, float]]:
  """`similarity.summary` of every layer, with its MoE-layer index as `layer`."""
  return [{"layer": i, **similarity.summary(m, select_top_k, threshold, top_k=top_k,
                                            batch=batch)}
          for i, m in enumerate(matrices)]

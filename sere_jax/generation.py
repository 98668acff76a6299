"""Batched autoregressive generation for any model following `models/base.py`.

    result = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=32,
                      sampling=SamplingConfig(temperature=0.7, top_p=0.9, seed=1),
                      eos_ids=(2,))
    result.tokens          # new tokens per prompt (EOS / stop sequence not included)
    result.finish_reason   # "eos" | "stop" | "length" per prompt
    result.decode_stats    # [steps, num_moe_layers, 5]: distinct_before,
                           #   distinct_after, critical_kept, slots_rerouted,
                           #   max_device_distinct (means over groups if the
                           #   blocks re-route in groups)

How it runs: prompts are left-padded to a common length `P` (layers.py conventions),
so every sequence writes cache slot `cache_index`. The prefill is one jitted call of
the whole model (all layers) over `[B, P]` that also samples the first token; a
prompt longer than `prefill_chunk` positions is padded to a multiple of it and
prefilled in chunks of that many positions, one call each (the same compiled call),
so that attention scores take `[B, H, chunk, cache]` rather than `[B, H, P, cache]`
of memory. All
decode steps then run on the device in one more jitted call, a `lax.while_loop`
(`decode_loop`) whose step runs the model over `[B, 1]` and samples; EOS and
stop-sequence checks and the output buffer live there too, so the host dispatches two
calls per `generate`, not one per token (per-call host work, e.g. hashing the model's
graph definition, costs milliseconds for a 48-layer model). The KV cache is donated,
so XLA updates it in place. The model is passed to the jitted functions as
`nnx.split` state (a pytree argument) and its graph definition (a static argument),
so a second `generate` on the same model and settings reuses the compiled calls. A
finished sequence is fed padding with `token_valid = False` and `cache_valid = False`
from then on, so it no longer adds experts to the batch's routing (nor its stats); the
loop stops when every sequence has finished.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple, Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from sere_jax import moe
from sere_jax import validation
from sere_jax.models import base as model_base

# The RerouteStats fields a model step reports per MoE layer, in this order.
STAT_FIELDS = ("distinct_before", "distinct_after", "critical_kept", "slots_rerouted",
               "max_device_distinct")
FINISH_REASONS = ("eos", "stop", "length")
# Prompt positions per prefill call (`generate`'s `prefill_chunk`). The XLA attention's
# float32 scores of one call take 4 * heads * chunk * cache bytes per sequence: for
# Qwen3-30B-A3B (32 heads) and an 8192-token prompt 2 GiB in 2048-position chunks, 8 GiB
# in one call, beside 57 GiB of weights on a card with about 75 GiB.
DEFAULT_PREFILL_CHUNK = 2048


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How the next token is drawn from the logits.

  Attributes:
    temperature: 0 means greedy (argmax); otherwise logits are divided by it.
    top_k: keep only the `top_k` most likely tokens (0 = off).
    top_p: nucleus sampling: keep the smallest set of most likely tokens whose
      probability sums to at least `top_p` (1 = off). In (0, 1].
    seed: seed of the sampling key.
  """

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0

  def __post_init__(self):
    if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)):
      raise ValueError(f"temperature must be a number >= 0, got {self.temperature!r}")
    if not (math.isfinite(self.temperature) and self.temperature >= 0):
      raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
    if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
      raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
    if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)):
      raise ValueError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
    if not 0.0 < float(self.top_p) <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
    if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not (
        0 <= self.seed < 2**32):
      raise ValueError(f"seed must be an integer in [0, 2**32), got {self.seed!r}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


def filter_logits(logits: jax.Array, config: SamplingConfig) -> jax.Array:
  """Temperature-scaled `[B, V]` float32 logits with tokens outside top-k / top-p at -inf."""
  logits = logits.astype(jnp.float32) / config.temperature
  vocab = logits.shape[-1]
  if 0 < config.top_k < vocab:
    kth = jax.lax.top_k(logits, config.top_k)[0][:, -1:]
    logits = jnp.where(logits >= kth, logits, -jnp.inf)
  if config.top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = mass_before < config.top_p  # the top token is always kept
    keep = jnp.zeros_like(keep_sorted).at[
        jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    logits = jnp.where(keep, logits, -jnp.inf)
  return logits


def sample(logits: jax.Array, key: jax.Array, config: SamplingConfig) -> jax.Array:
  """Draws one token per row of `logits [B, V]` -> `[B]` int32."""
  if config.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, filter_logits(logits, config), axis=-1).astype(
      jnp.int32)


class GenerationResult(NamedTuple):
  tokens: list[list[int]]  # new tokens per prompt, without the EOS / stop sequence
  finish_reason: list[str]  # "eos", "stop" or "length" per prompt
  decode_stats: np.ndarray  # [steps, num_moe_layers, 5] float64 (STAT_FIELDS)
  prefill_stats: np.ndarray  # [num_moe_layers, 5] float64 (means over prefill chunks)


def stats_array(stats: Sequence[Any]) -> jax.Array:
  """A model output's per-layer RerouteStats -> `[num_layers, len(STAT_FIELDS)]` float32 in
  STAT_FIELDS order (means over re-routing groups when the blocks re-route in groups,
  else the values themselves)."""
  if not stats:
    return jnp.zeros((0, len(STAT_FIELDS)), jnp.float32)
  return jnp.stack([jnp.stack([jnp.mean(jnp.asarray(getattr(s, f), jnp.float32))
                               for f in STAT_FIELDS]) for s in stats])


def _sampling_static(config: SamplingConfig) -> SamplingConfig:
  # The seed enters through the key; keep it out of the jit cache key.
  return dataclasses.replace(config, seed=0)


def _forward_and_sample(model, tokens, positions, token_valid, cache, cache_valid,
                        cache_index, key, sampling: SamplingConfig, decode: bool):
  """Marks slots `[cache_index, cache_index + L)` valid where `token_valid`, runs the
  model on `tokens [B, L]` and samples from the last position's logits. Returns
  `(next_token [B], cache, cache_valid, stats [num_moe_layers, 5])`."""
  cache_valid = jax.lax.dynamic_update_slice(cache_valid, token_valid, (0, cache_index))
  out = model(tokens, positions, token_valid, cache, cache_valid, cache_index,
              decode=decode, last_only=True)  # a prefill needs no other logits
  next_token = sample(out.logits[:, -1, :], key, sampling)
  return next_token, out.cache, cache_valid, stats_array(out.stats)


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "decode"),
                   donate_argnames=("cache", "cache_valid"))
def model_step(graphdef: Any, state: Any, tokens: jax.Array, positions: jax.Array,
               token_valid: jax.Array, cache: Any, cache_valid: jax.Array,
               cache_index: jax.Array, key: jax.Array, *, sampling: SamplingConfig,
               decode: bool) -> tuple[jax.Array, Any, jax.Array, jax.Array]:
  """One jitted forward of the `nnx.split` model `(graphdef, state)` over `tokens
  [B, L]` that samples the next token: `generate`'s prefill (`decode=False`), or one
  decode step when timed alone. Marks cache slots `[cache_index, cache_index + L)` valid
  where `token_valid`; the cache is donated. Returns `(next_token [B], cache,
  cache_valid, stats [num_moe_layers, 5])`."""
  return _forward_and_sample(nnx.merge(graphdef, state), tokens, positions, token_valid,
                             cache, cache_valid, cache_index, key, sampling, decode)


def padded_prompt_length(prompts: Sequence[Sequence[int]], length_multiple: int = 1,
                         prefill_chunk: int = 0) -> int:
  """The length `generate` left-pads a batch of prompts to: the longest prompt, rounded
  up to a multiple of `length_multiple`, and then, if longer than `prefill_chunk` (> 0),
  to a multiple of `prefill_chunk`."""
  length = -(-max(len(p) for p in prompts) // length_multiple) * length_multiple
  if 0 < prefill_chunk < length:
    length = -(-length // prefill_chunk) * prefill_chunk
  return length


def _validate(model, prompts, max_new_tokens, eos_ids, stop_sequences, cache_length,
              length_multiple, prefill_chunk, steps_per_check):
  validation.check_int("max_new_tokens", max_new_tokens, 1)
  validation.check_int("steps_per_check", steps_per_check, 1)
  if not prompts:
    raise ValueError("prompts is empty: give at least one prompt")
  vocab = getattr(model.config, "vocab_size", None)
  for i, prompt in enumerate(prompts):
    if len(prompt) == 0:
      raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
    for tok in prompt:
      if isinstance(tok, bool) or not isinstance(tok, (int, np.integer)):
        raise ValueError(f"prompt {i} holds a non-integer token {tok!r}")
      if tok < 0 or (vocab is not None and tok >= vocab):
        raise ValueError(f"prompt {i} holds token id {tok}, outside [0, {vocab})")
  for e in eos_ids:
    if vocab is not None and not 0 <= e < vocab:
      raise ValueError(f"eos id {e} is outside [0, {vocab})")
  for s in stop_sequences:
    if len(s) == 0:
      raise ValueError("stop sequences must not be empty")
  longest = max(len(p) for p in prompts)
  max_pos = getattr(model.config, "max_position_embeddings", None)
  if max_pos is not None and longest + max_new_tokens > max_pos:
    raise ValueError(f"the longest prompt ({longest} tokens) + max_new_tokens "
                     f"({max_new_tokens}) exceeds the model's max positions "
                     f"(max_position_embeddings={max_pos})")
  validation.check_int("length_multiple", length_multiple, 1)
  validation.check_int("prefill_chunk", prefill_chunk, 0)  # 0: the whole prompt at once
  # The last sampled token is never fed back, so the cache needs P + N - 1 slots.
  padded = padded_prompt_length(prompts, length_multiple, prefill_chunk)
  needed = padded + max_new_tokens - 1
  if cache_length is not None and needed > cache_length:
    raise ValueError(f"the longest prompt ({longest} tokens, padded to {padded}) + "
                     f"max_new_tokens ({max_new_tokens}) needs {needed} cache slots, "
                     f"more than cache_length={cache_length}")


# Finish reasons on the device: index into FINISH_REASONS, or RUNNING.
RUNNING = -1
# Rows the decode loop runs at least (`decode_loop`'s `min_rows`): a single sequence
# decodes beside a padding row, so that its dots stay matrix products without padding
# each one (`numerics.gemm_dot`).
MIN_DECODE_ROWS = 2
_EOS, _STOP, _LENGTH = (FINISH_REASONS.index(r) for r in ("eos", "stop", "length"))


class Accepted(NamedTuple):
  """What the decode loop keeps per sequence (all on the device)."""

  tokens: jax.Array  # [B, max_new_tokens] int32; the first `count` are the output
  count: jax.Array  # [B] int32
  reason: jax.Array  # [B] int32: RUNNING or an index into FINISH_REASONS


def _accept(acc: Accepted, token: jax.Array, *, eos_ids: tuple[int, ...],
            stop_sequences: tuple[tuple[int, ...], ...], max_new_tokens: int) -> Accepted:
  """Appends `token [B]` to every running sequence and decides which ones finish.

  A sequence finishes at an EOS token (not kept), when its tokens end with a stop
  sequence (the first of `stop_sequences` that matches; removed), or at
  `max_new_tokens` tokens. Finished sequences do not change.
  """
  running = acc.reason == RUNNING
  is_eos = running & jnp.isin(token, jnp.asarray(eos_ids, jnp.int32)) if eos_ids else (
      jnp.zeros_like(running))
  append = running & ~is_eos
  cols = jnp.arange(acc.tokens.shape[1])[None, :]
  tokens = jnp.where(append[:, None] & (cols == acc.count[:, None]), token[:, None],
                     acc.tokens)
  count = acc.count + append
  stopped = jnp.zeros_like(running)
  for stop in stop_sequences:
    if len(stop) > max_new_tokens:
      continue
    tail_cols = count[:, None] - len(stop) + jnp.arange(len(stop))[None, :]
    tail = jnp.take_along_axis(tokens, jnp.maximum(tail_cols, 0), axis=1)
    hit = (append & ~stopped & (count >= len(stop))
           & jnp.all(tail == jnp.asarray(stop, jnp.int32), axis=1))
    count = jnp.where(hit, count - len(stop), count)
    stopped = stopped | hit
  full = append & ~stopped & (count >= max_new_tokens)
  reason = jnp.select([is_eos, stopped, full], [_EOS, _STOP, _LENGTH], acc.reason)
  return Accepted(tokens, count, reason.astype(jnp.int32))


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "max_new_tokens",
                                             "eos_ids", "stop_sequences", "pad_id",
                                             "steps_per_check", "min_rows"),
                   donate_argnames=("cache", "cache_valid"))
def decode_loop(graphdef: Any, state: Any, first_token: jax.Array, lengths: jax.Array,
                cache: Any, cache_valid: jax.Array, prompt_len: jax.Array,
                base_key: jax.Array, *, sampling: SamplingConfig, max_new_tokens: int,
                eos_ids: tuple[int, ...], stop_sequences: tuple[tuple[int, ...], ...],
                pad_id: int, steps_per_check: int = 1, min_rows: int = MIN_DECODE_ROWS
                ) -> tuple[Accepted, jax.Array, jax.Array, Any, jax.Array]:
  """Every decode step of `generate` in one jitted call (a `lax.while_loop`) over the
  `nnx.split` model `(graphdef, state)`; the cache is donated.

  Starts from the prefill's `first_token [B]`; step `s` feeds each running sequence's
  last token at cache slot `prompt_len + s` and position `lengths + s`, and finished
  sequences pad with `token_valid = False`. The loop ends when every sequence has
  finished or after `max_new_tokens - 1` steps. Returns `(accepted: Accepted,
  steps: int32, stats [max(max_new_tokens - 1, 1), num_moe_layers, 5], cache,
  cache_valid)`; rows of `stats` past `steps` are zero. (The cache is returned so that
  the donated input buffers become the loop's, without a copy.)

  On GPUs the loop's condition goes to the host after every iteration, and the GPU
  waits for the host to launch the next one. With `steps_per_check = k > 1` an
  iteration runs k steps (an inner loop of known trip count, which XLA runs without
  that round trip); a step that starts when the loop should already have stopped is
  a padding step that changes no output, only the returned cache after the last step
  (an unused slot, or the last slot once `max_new_tokens` is reached): at most k - 1
  steps are wasted.

  A batch of fewer than `min_rows` sequences decodes beside padding rows: copies of
  its first sequence's cache that are finished from the start, so they feed padding
  with `token_valid = False`, add no experts and change no output (every dot then has
  `min_rows` rows at least; XLA's GPU compiler turns a one-row dot into a slower
  multiply and reduction, which `numerics.gemm_dot` avoids by padding each dot on its
  own, one launch more per dot). They cost one copy of the cache per call.
  """
  validation.check_int("steps_per_check", steps_per_check, 1)
  validation.check_int("min_rows", min_rows, 1)
  accept = functools.partial(_accept, eos_ids=eos_ids, stop_sequences=stop_sequences,
                             max_new_tokens=max_new_tokens)
  batch = first_token.shape[0]
  rows = max(batch, min_rows)
  first_token, lengths, cache, cache_valid = (
      _pad_rows(a, rows) for a in (first_token, lengths, cache, cache_valid))
  reason = jnp.where(jnp.arange(rows) < batch, RUNNING, _LENGTH).astype(jnp.int32)
  acc = accept(Accepted(jnp.zeros((rows, max_new_tokens), jnp.int32),
                        jnp.zeros((rows,), jnp.int32), reason), first_token)
  model = nnx.merge(graphdef, state)
  num_layers = len(moe.moe_blocks(model))
  # One row at least: the body is traced even when it never runs (max_new_tokens = 1).
  stats = jnp.zeros((max(max_new_tokens - 1, 1), num_layers, len(STAT_FIELDS)),
                    jnp.float32)

  def running(carry):
    step, _, acc, *_ = carry
    return (step < max_new_tokens - 1) & jnp.any(acc.reason == RUNNING)

  def decode_step(carry):
    step, token, acc, cache, cache_valid, stats = carry
    alive = acc.reason == RUNNING
    # Within the cache: only a padding step past `max_new_tokens` (below) would leave it.
    slot = jnp.minimum(prompt_len + step, cache_valid.shape[1] - 1)
    token, cache, cache_valid, step_stats = _forward_and_sample(
        model, jnp.where(alive, token, pad_id)[:, None], (lengths + step)[:, None],
        alive[:, None], cache, cache_valid, slot,
        jax.random.fold_in(base_key, step + 1), sampling, decode=True)
    stats = jax.lax.dynamic_update_index_in_dim(stats, step_stats, step, 0)
    return step + 1, token, accept(acc, token), cache, cache_valid, stats

  def step_or_pad(_, carry):
    """`decode_step` while the loop goes on, else a padding step that keeps the carry
    but for the cache: no sequence is running, so it writes an unused slot, or the
    last one once `max_new_tokens` is reached (its slot index is clamped to the
    cache)."""
    go_on = running(carry)
    step, token, acc, _, _, stats = carry
    _, new_token, new_acc, cache, cache_valid, new_stats = decode_step(carry)
    keep = lambda new, old: jnp.where(go_on, new, old)
    return (step + go_on.astype(jnp.int32), keep(new_token, token),
            jax.tree.map(keep, new_acc, acc), cache, cache_valid, keep(new_stats, stats))

  body = decode_step if steps_per_check == 1 else (
      lambda carry: jax.lax.fori_loop(0, steps_per_check, step_or_pad, carry))
  steps, _, acc, cache, cache_valid, stats = jax.lax.while_loop(
      running, body,
      (jnp.asarray(0, jnp.int32), first_token, acc, cache, cache_valid, stats))
  acc, cache, cache_valid = jax.tree.map(lambda a: a[:batch], (acc, cache, cache_valid))
  return acc, steps, stats, cache, cache_valid


def _pad_rows(tree: Any, rows: int) -> Any:
  """Every leaf of `tree` (batch-major) with copies of its first row appended up to
  `rows` rows."""
  def pad(a):
    extra = rows - a.shape[0]
    return a if extra <= 0 else jnp.concatenate([a, jnp.repeat(a[:1], extra, axis=0)])
  return jax.tree.map(pad, tree)


def generate(model: nnx.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             sampling: SamplingConfig = SamplingConfig(), eos_ids: Sequence[int] = (),
             stop_sequences: Sequence[Sequence[int]] = (), cache_length: int | None = None,
             pad_id: int = 0, cache_dtype: Any = None, length_multiple: int = 1,
             prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
             steps_per_check: int = 1) -> GenerationResult:
  """Generates up to `max_new_tokens` tokens for each prompt (see the module docstring).

  A sequence stops at any of `eos_ids` (reason "eos") or when its new tokens end with
  one of `stop_sequences` (token-id lists; reason "stop"); neither is included in the
  returned tokens. `cache_length` defaults to the slots needed.

  Prompts are left-padded to the longest one rounded up to a multiple of
  `length_multiple` (`padded_prompt_length`): the prefill compiles once per padded
  length, so batches of prompts of different lengths share compiled prefills (the
  decode loop compiles once per cache length; give a fixed `cache_length` for that).
  The padding changes no output. A padded prompt longer than `prefill_chunk` (0: no
  limit) is padded further to a multiple of it and prefilled chunk by chunk, which
  changes no token either (a prefill that re-routes, `decode_only=False`, re-routes
  each chunk's tokens together; `prefill_stats` are means over the chunks).
  `steps_per_check` decode steps run between two checks of whether the loop is done
  (`decode_loop`); it changes no output.
  """
  prompts = [list(p) for p in prompts]
  eos_ids = tuple(sorted({int(e) for e in eos_ids}))
  stop_sequences = tuple(tuple(int(t) for t in s) for s in stop_sequences)
  _validate(model, prompts, max_new_tokens, eos_ids, stop_sequences, cache_length,
            length_multiple, prefill_chunk, steps_per_check)
  moe.check_calibrated(model)

  batch = len(prompts)
  lengths = np.array([len(p) for p in prompts], np.int32)
  prompt_len = padded_prompt_length(prompts, length_multiple, prefill_chunk)
  total = cache_length or prompt_len + max_new_tokens - 1
  pad = prompt_len - lengths  # left padding per sequence

  tokens = np.full((batch, prompt_len), pad_id, np.int32)
  for i, p in enumerate(prompts):
    tokens[i, pad[i]:] = p
  cols = np.arange(prompt_len)[None, :]
  token_valid = cols >= pad[:, None]
  positions = np.where(token_valid, cols - pad[:, None], 0).astype(np.int32)
  graphdef, state = nnx.split(model)
  sampling_static = _sampling_static(sampling)
  base_key = jax.random.PRNGKey(sampling.seed)
  if cache_dtype is None:
    cache_dtype = model_base.param_dtype(model)
  cache = model.init_cache(batch, total, cache_dtype)
  cache_valid = jnp.zeros((batch, total), jnp.bool_)

  chunk = prefill_chunk if 0 < prefill_chunk < prompt_len else prompt_len
  chunk_stats = []
  for start in range(0, prompt_len, chunk):  # the last chunk's token is the first one
    cols = slice(start, start + chunk)
    first_token, cache, cache_valid, stats = model_step(
        graphdef, state, jnp.asarray(tokens[:, cols]), jnp.asarray(positions[:, cols]),
        jnp.asarray(token_valid[:, cols]), cache, cache_valid,
        jnp.asarray(start, jnp.int32), jax.random.fold_in(base_key, 0),
        sampling=sampling_static, decode=False)
    chunk_stats.append(stats)
  acc, steps, stats, _, _ = decode_loop(
      graphdef, state, first_token, jnp.asarray(lengths), cache, cache_valid,
      jnp.asarray(prompt_len, jnp.int32), base_key, sampling=sampling_static,
      max_new_tokens=max_new_tokens, eos_ids=eos_ids, stop_sequences=stop_sequences,
      pad_id=pad_id, steps_per_check=steps_per_check)

  out, count, reason = (np.asarray(a) for a in acc)
  generated = [out[i, :count[i]].tolist() for i in range(batch)]
  # Every sequence has finished: the loop runs until the last one reaches the length.
  finish = [FINISH_REASONS[r] for r in reason]
  decode_stats = np.asarray(stats[:int(steps)], np.float64)
  prefill_stats = np.mean(np.asarray(jnp.stack(chunk_stats)), axis=0, dtype=np.float64)
  return GenerationResult(generated, finish, decode_stats, prefill_stats)


def summarize_stats(decode_stats: np.ndarray) -> dict[str, list[float]]:
  """Per-layer means over decode steps of each stat (for reports)."""
  if decode_stats.shape[0] == 0:
    return {f: [] for f in STAT_FIELDS}
  mean = decode_stats.mean(axis=0)
  return {f: [float(x) for x in mean[:, j]] for j, f in enumerate(STAT_FIELDS)}

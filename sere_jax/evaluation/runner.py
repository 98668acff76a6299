"""Runs a model under re-routing policies and measures it against `none`. Teacher
forcing is one jitted forward over `tokens [N, L]` with `decode=True`, which re-routes
per position: the tokens at position l of a group of g sequences re-route together, as
when decoding them one token at a time, and `group_size` g splits the N sequences into
N/g independent groups, so one call evaluates decode batch size g. Against `none`'s
reference log-probs (which do not depend on g, kept on the host: N x (L-1) x V float32,
9.9 GB for 64 x 256 tokens of a 151936-token vocabulary; a forward of `max_tokens`
tokens holds about four `max_tokens x V` float32 arrays on the device) it measures the
next-token NLL, top-1 agreement, KL(none || policy) per token and the mean distinct
experts per layer per decode step; greedy continuations and task answers come from
`generation.generate`. `evaluate_grid` runs every (batch size, spec) pair into
JSON-ready rows, with bootstrap intervals over sequences of the differences to `none`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Callable, Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from sere_jax import generation
from sere_jax import moe
from sere_jax.config import RerouteConfig
from sere_jax.evaluation import metrics
from sere_jax.evaluation.data import Task, chunk_sequences
from sere_jax.evaluation.report import grid_row
from sere_jax.policy_spec import PolicySpec, layer_configs
from sere_jax.models import base as model_base

# Fields of the per-layer routing statistics (generation.STAT_FIELDS order).
STAT_FIELDS = generation.STAT_FIELDS


def configure(model: nnx.Module, configs: Sequence[RerouteConfig], group_size: int,
              matrices: Sequence[Any] | None = None) -> None:
  """Sets each MoE block's config and re-routing group size (and similarity if given)."""
  blocks = moe.moe_blocks(model)
  if len(configs) != len(blocks):
    raise ValueError(f"{len(configs)} configs for {len(blocks)} MoE layers")
  for i, (block, config) in enumerate(zip(blocks, configs)):
    block.reroute = config
    block.group_size = group_size
    if matrices is not None:
      block.similarity[...] = jnp.asarray(matrices[i], jnp.float32)


def stored_similarity(model: nnx.Module) -> list[np.ndarray]:
  """Every MoE block's current similarity matrix (NaN if never calibrated)."""
  return [np.asarray(b.similarity[...]) for b in moe.moe_blocks(model)]


def teacher_forced_logp(graphdef, state, tokens: jax.Array, cache_dtype
                        ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One teacher-forced decode forward of `tokens [B, L]` (traceable): `(logp
  [B, L-1, V] of each next token, nll [B, L-1], stats [layers, 5])`, with re-routing per
  position and group as the blocks are configured."""
  model = nnx.merge(graphdef, state)
  batch, length = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
  valid = jnp.ones((batch, length), jnp.bool_)
  cache = model.init_cache(batch, length, cache_dtype)
  out = model(tokens, positions, valid, cache, valid, jnp.zeros((), jnp.int32),
              decode=True)
  logp = jax.nn.log_softmax(out.logits[:, :-1].astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
  return logp, nll, generation.stats_array(out.stats)


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_dtype"))
def _forward(graphdef, state, tokens, ref_logp, *, cache_dtype):
  """`teacher_forced_logp` against `none`'s `ref_logp`: `(nll [B, L-1], agree [B, L-1],
  kl [B, L-1], stats [layers, 5] (means over positions and groups), logp [B, L-1, V] or
  None)`; agree and kl are None without `ref_logp`."""
  logp, nll, stats = teacher_forced_logp(graphdef, state, tokens, cache_dtype)
  if ref_logp is None:
    return nll, None, None, stats, logp
  agree = jnp.argmax(logp, axis=-1) == jnp.argmax(ref_logp, axis=-1)
  kl = jnp.sum(jnp.exp(ref_logp) * (ref_logp - logp), axis=-1)
  return nll, agree, kl, stats, None


def _check_tokens(tokens: np.ndarray) -> np.ndarray:
  tokens = np.asarray(tokens, np.int32)
  if tokens.ndim != 2 or tokens.shape[1] < 2:
    raise ValueError(f"tokens must be [N, L] with L >= 2, got shape {tokens.shape}")
  return tokens


@dataclasses.dataclass
class Reference:
  """`none`'s next-token log-probs `[N, L-1, V]` (host) and NLL `[N, L-1]`."""
  logp: np.ndarray
  nll: np.ndarray


@dataclasses.dataclass
class TeacherForced:
  """One (policy, group size) teacher-forced evaluation; `stats [layers, 5]`: per-layer
  means over positions and groups of STAT_FIELDS."""
  nll: np.ndarray  # [N, L-1]
  agreement: float
  kl: float
  stats: np.ndarray

  @property
  def perplexity(self) -> float:
    return float(np.exp(np.mean(self.nll)))

  @property
  def distinct_per_layer(self) -> np.ndarray:
    return self.stats[:, STAT_FIELDS.index("distinct_after")]

  @property
  def distinct(self) -> float:
    return float(np.mean(self.distinct_per_layer))


def reference(model: nnx.Module, tokens: np.ndarray, *, max_tokens: int) -> Reference:
  """`none`'s log-probs over `tokens [N, L]` (the model's configs are restored)."""
  tokens = _check_tokens(tokens)
  blocks = moe.moe_blocks(model)
  saved = [(b.reroute, b.group_size) for b in blocks]
  configure(model, [moe.NO_REROUTE] * len(blocks), 0)
  try:
    graphdef, state = nnx.split(model)
    n = chunk_sequences(len(tokens), tokens.shape[1], 1, max_tokens)
    dtype = model_base.param_dtype(model)
    logps, nlls = [], []
    for lo in range(0, len(tokens), n):
      nll, _, _, _, logp = _forward(graphdef, state, jnp.asarray(tokens[lo:lo + n]), None,
                                    cache_dtype=dtype)
      logps.append(np.asarray(logp))
      nlls.append(np.asarray(nll))
  finally:
    for b, (config, group) in zip(blocks, saved):
      b.reroute, b.group_size = config, group
  return Reference(np.concatenate(logps), np.concatenate(nlls))


def teacher_forced(model: nnx.Module, tokens: np.ndarray, group_size: int,
                   ref: Reference, *, max_tokens: int) -> TeacherForced:
  """Evaluates the model's current re-routing configs over `tokens [N, L]` in groups of
  `group_size` sequences (set on every block), in chunks of at most `max_tokens`."""
  tokens = _check_tokens(tokens)
  if ref.nll.shape != (tokens.shape[0], tokens.shape[1] - 1):
    raise ValueError(f"the reference covers {ref.nll.shape}, the tokens {tokens.shape}")
  for block in moe.moe_blocks(model):
    block.group_size = group_size
  moe.check_calibrated(model)
  graphdef, state = nnx.split(model)
  n = chunk_sequences(len(tokens), tokens.shape[1], group_size, max_tokens)
  dtype = model_base.param_dtype(model)
  nlls, agree, kl, stats = [], 0.0, 0.0, []
  for lo in range(0, len(tokens), n):
    out = _forward(graphdef, state, jnp.asarray(tokens[lo:lo + n]),
                   jnp.asarray(ref.logp[lo:lo + n]), cache_dtype=dtype)
    nlls.append(np.asarray(out[0]))
    agree += float(jnp.sum(out[1]))
    kl += float(jnp.sum(out[2]))
    stats.append(np.asarray(out[3], np.float64))
  count = ref.nll.size
  return TeacherForced(np.concatenate(nlls), agree / count, kl / count,
                       np.mean(stats, axis=0))


def greedy(model: nnx.Module, prompts: np.ndarray, new_tokens: int, group_size: int, *,
           max_tokens: int) -> np.ndarray:
  """Greedy continuations `[N, new_tokens]` of `prompts [N, P]` (no EOS) under the
  model's current configs, decoding `group_size`-sequence groups together; batches of
  at most `max_tokens` prompt + new tokens."""
  prompts = np.asarray(prompts, np.int32)
  for block in moe.moe_blocks(model):
    block.group_size = group_size
  n = chunk_sequences(len(prompts), prompts.shape[1] + new_tokens, group_size, max_tokens)
  out = []
  for lo in range(0, len(prompts), n):
    res = generation.generate(model, prompts[lo:lo + n].tolist(),
                              max_new_tokens=new_tokens)
    out.extend(res.tokens)
  return np.asarray(out, np.int32)


def task_accuracy(model: nnx.Module, prompts: Sequence[Sequence[int]],
                  answers: Sequence[str], decode: Callable[[list[int]], str], *,
                  batch_size: int, max_new_tokens: int, scoring: str,
                  eos_ids: Sequence[int] = (), stop: Sequence[str] = ()
                  ) -> tuple[float, list[str]]:
  """Greedy answers in consecutive batches of `batch_size` prompts (each batch
  re-routes together), cut at the first of `stop` strings and scored.
  Returns `(accuracy, generations)`."""
  if scoring not in metrics.SCORERS:
    raise ValueError(f"scoring must be one of {metrics.TASK_SCORING}, got {scoring!r}")
  if len(prompts) != len(answers) or not prompts:
    raise ValueError(f"{len(prompts)} prompts for {len(answers)} answers")
  for block in moe.moe_blocks(model):
    block.group_size = 0  # a batch is one group
  cache_length = max(len(p) for p in prompts) + max_new_tokens - 1
  texts = []
  for lo in range(0, len(prompts), batch_size):
    res = generation.generate(model, prompts[lo:lo + batch_size],
                              max_new_tokens=max_new_tokens, eos_ids=eos_ids,
                              cache_length=cache_length)
    texts.extend(metrics.cut_at_stop(decode(t), stop) for t in res.tokens)
  return float(np.mean(metrics.score_answers(texts, answers, scoring))), texts


def evaluate_grid(model: nnx.Module, specs: Sequence[PolicySpec], batch_sizes: Sequence[int],
                  tokens: np.ndarray, *, max_tokens: int, prompts: np.ndarray | None = None,
                  greedy_tokens: int = 0, task: Task | None = None,
                  similarity_for: Callable[[str], Sequence[Any]] | None = None,
                  log: Callable[..., None] | None = None) -> list[dict[str, Any]]:
  """Evaluates every (batch size, spec) pair; returns one JSON-ready row per pair.

  `tokens [N, L]` are the perplexity windows, `prompts [M, P]` (optional) the greedy
  prompts; N and M must be multiples of every batch size. `similarity_for(metric)`
  gives the per-layer matrices of a spec's metric (called once per metric). `none` is
  evaluated at every batch size even if not in `specs` (its distinct count is the
  baseline). `ppl_delta_ci` is the paired bootstrap 95% interval of `delta_ppl_pct`
  over sequences; with a task, `task_accuracy_delta_ci` that of the accuracy minus
  `none`'s at the same batch size over items. `log(fmt, *args)` reports progress
  (default: absl logging.info).
  """
  if log is None:
    from absl import logging  # pylint: disable=g-import-not-at-top
    log = logging.info
  if not batch_sizes or any(g < 1 for g in batch_sizes):
    raise ValueError(f"batch sizes must be >= 1, got {list(batch_sizes)}")
  for name, arr in (("sequences", tokens), ("prompts", prompts)):
    if arr is not None and len(arr) % math.lcm(*batch_sizes):
      raise ValueError(f"{len(arr)} {name} are not a multiple of every batch size "
                       f"{list(batch_sizes)}")
  specs = list(specs)
  if not any(s.policy == "none" for s in specs):
    specs.insert(0, PolicySpec("none"))
  num_layers = len(moe.moe_blocks(model))
  stored = stored_similarity(model)
  uncalibrated = [s.text for s in specs if s.uses_similarity and s.metric is None]
  if uncalibrated and not all(np.all(np.isfinite(m)) for m in stored):
    raise ValueError(f"specs {uncalibrated} use the model's stored similarity, but the "
                     "model has none (NaN); calibrate it or name a metric in the spec")
  metric_cache: dict[str, list[np.ndarray]] = {}

  def matrices(spec: PolicySpec) -> list[np.ndarray] | None:
    if not spec.uses_similarity:
      return None
    if spec.metric is None:
      return stored
    if spec.metric not in metric_cache:
      if similarity_for is None:
        raise ValueError(f"{spec.text}: metric {spec.metric!r} needs similarity_for")
      t0 = time.time()
      metric_cache[spec.metric] = [np.asarray(m) for m in similarity_for(spec.metric)]
      log("calibrated %s similarity in %.1f s", spec.metric, time.time() - t0)
    return metric_cache[spec.metric]

  start = time.time()
  blocks = moe.moe_blocks(model)
  saved = [(b.reroute, b.group_size) for b in blocks]
  rows: list[dict[str, Any]] = []
  task_correct: list[np.ndarray] = []
  try:
    ref = reference(model, tokens, max_tokens=max_tokens)
    log("reference (none): perplexity %.4f over %s tokens, %.1f s",
        np.exp(np.mean(ref.nll)), ref.nll.size, time.time() - start)
    none_greedy = None
    if prompts is not None and greedy_tokens > 0:
      configure(model, [moe.NO_REROUTE] * num_layers, 0)
      none_greedy = greedy(model, prompts, greedy_tokens, 0, max_tokens=max_tokens)
    total = len(batch_sizes) * len(specs)
    for g in batch_sizes:
      for spec in specs:
        t0 = time.time()
        mats = matrices(spec)
        configs = layer_configs(spec, mats, num_layers)
        configure(model, configs, g, mats)
        result = teacher_forced(model, tokens, g, ref, max_tokens=max_tokens)
        row = grid_row(spec, g, result, ref.nll, configs)
        if none_greedy is not None:
          cont = (none_greedy if spec.policy == "none" else
                  greedy(model, prompts, greedy_tokens, g, max_tokens=max_tokens))
          row["exact_match"], row["prefix_agreement"] = metrics.exact_match(none_greedy,
                                                                            cont)
        if task is not None:
          row["task_accuracy"], texts = task_accuracy(
              model, task.prompts, task.answers, task.decode, batch_size=g,
              max_new_tokens=task.max_new_tokens, scoring=task.scoring,
              eos_ids=task.eos_ids, stop=task.stop)
          task_correct.append(metrics.score_answers(texts, task.answers, task.scoring))
        row["seconds"] = time.time() - t0
        rows.append(row)
        log("config %d/%d (batch %d, %s): ppl %.4f (%+.2f%%, CI %+.2f..%+.2f), "
            "distinct %.2f, %.1f s (elapsed %.1f s)", len(rows), total, g, spec.label,
            row["perplexity"], row["delta_ppl_pct"], *row["ppl_delta_ci"],
            row["distinct"], row["seconds"], time.time() - start)
  finally:
    for b, (config, group) in zip(blocks, saved):
      b.reroute, b.group_size = config, group
    for b, m in zip(blocks, stored):
      b.similarity[...] = jnp.asarray(m)
  for i, row in enumerate(rows):
    n = next(j for j, r in enumerate(rows) if r["batch_size"] == row["batch_size"]
             and r["policy"] == "none")
    row["distinct_none"] = rows[n]["distinct"]
    row["distinct_pct_of_none"] = 100.0 * row["distinct"] / rows[n]["distinct"]
    if task_correct:
      row["task_accuracy_delta_ci"] = list(metrics.paired_bootstrap_accuracy_delta_ci(
          task_correct[i], task_correct[n]))
  return rows


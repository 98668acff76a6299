"""Quality of SERE and its baselines against top-K routing (`none`), in batched decoding.

    specs = policy_spec.parse_list(["none", "sere:2:0.3", "topk_truncate:2"])
    ref = reference(model, tokens, max_tokens=8192)          # `none` log-probs, once
    matrices = stored_similarity(model)
    configure(model, layer_configs(specs[1], matrices, len(matrices)), 16, matrices)
    result = teacher_forced(model, tokens, 16, ref, max_tokens=8192)
    result.perplexity, result.agreement, result.kl, result.distinct

    rows = evaluate_grid(model, specs, [1, 4, 16], tokens, max_tokens=8192,
                         prompts=prompts, greedy_tokens=32)   # one JSON row per pair
    comparisons(rows, [1, 4, 16])

Teacher forcing: one forward over `tokens [N, L]` with `decode=True` re-routes per
position (the tokens at position l of a group of g sequences re-route together, as
when decoding them one token at a time); `group_size` g splits the N sequences into
N/g groups that re-route independently, so one call evaluates decode batch size g.
Metrics are against the `none` reference (whose logits do not depend on g): the
next-token NLL, top-1 agreement, KL(none || policy) per token, and the mean distinct
experts per layer per decode step (distinct_after of every position, group and layer).
Memory: the reference log-probs stay on the host, N x (L-1) x V float32 (9.9 GB for
64 x 256 tokens of Qwen3's 151936-token vocabulary); a forward of `max_tokens` tokens
holds about four `max_tokens x V` float32 arrays on the device.

Greedy exact match: `generation.generate` of M new tokens with `none` and with the
policy; task accuracy: greedy answers to JSONL prompts, scored by `score_gsm8k` or
`score_exact`.

Policies are named by `sere_jax.policy_spec` strings (`sere:2:0.3`, ...).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import time
from typing import Any, Callable, Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from sere_jax import generation
from sere_jax import moe
from sere_jax import numerics
from sere_jax.config import RerouteConfig
from sere_jax.policy_spec import PolicySpec, layer_configs

# Fields of the per-layer routing statistics (generation.STAT_FIELDS order).
STAT_FIELDS = generation.STAT_FIELDS
TASK_SCORING = ("gsm8k", "exact")


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


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_dtype"))
def _forward(graphdef, state, tokens, ref_logp, *, cache_dtype):
  """Teacher-forced decode forward of `tokens [B, L]`. Returns `(nll [B, L-1],
  agree [B, L-1], kl [B, L-1], stats [layers, 4] (means over positions and groups),
  logp [B, L-1, V] or None)`; agree and kl are None without `ref_logp`."""
  model = nnx.merge(graphdef, state)
  batch, length = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
  valid = jnp.ones((batch, length), jnp.bool_)
  cache = model.init_cache(batch, length, cache_dtype)
  out = model(tokens, positions, valid, cache, valid, jnp.zeros((), jnp.int32),
              decode=True)
  logp = jax.nn.log_softmax(out.logits[:, :-1].astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
  stats = generation._stats_array(out.stats)  # pylint: disable=protected-access
  if ref_logp is None:
    return nll, None, None, stats, logp
  agree = jnp.argmax(logp, axis=-1) == jnp.argmax(ref_logp, axis=-1)
  kl = jnp.sum(jnp.exp(ref_logp) * (ref_logp - logp), axis=-1)
  return nll, agree, kl, stats, None


def chunk_sequences(num_sequences: int, length: int, group_size: int,
                    max_tokens: int) -> int:
  """Sequences per forward: the largest multiple of `group_size` that divides
  `num_sequences` with at most `max_tokens` tokens (at least `group_size`)."""
  g = max(group_size, 1)
  if num_sequences % g:
    raise ValueError(f"{num_sequences} sequences are not a multiple of group size {g}")
  best = g
  for n in range(g, num_sequences + 1, g):
    if num_sequences % n == 0 and n * length <= max_tokens:
      best = n
  return best


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
  """One (policy, group size) teacher-forced evaluation.

  `stats [layers, 4]`: per-layer means over positions and groups of STAT_FIELDS.
  """
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
    dtype = numerics.param_dtype(model)
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
  dtype = numerics.param_dtype(model)
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


def exact_match(reference_tokens: np.ndarray, tokens: np.ndarray) -> tuple[float, float]:
  """`(fraction of rows equal to the reference, mean length of the agreeing prefix)`."""
  a, b = np.asarray(reference_tokens), np.asarray(tokens)
  if a.shape != b.shape:
    raise ValueError(f"continuations of shape {b.shape} vs reference {a.shape}")
  same = a == b
  prefix = np.where(same.all(axis=1), a.shape[1], np.argmin(same, axis=1))
  return float(np.mean(same.all(axis=1))), float(np.mean(prefix))


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def last_number(text: str) -> str | None:
  """The last number in `text` with commas and a trailing `.0...` removed, or None."""
  found = _NUMBER.findall(text)
  if not found:
    return None
  number = found[-1].replace(",", "")
  if "." in number:
    number = number.rstrip("0").rstrip(".")
  return number


def score_gsm8k(generation_text: str, answer: str) -> bool:
  """GSM8K: the last number of the generation equals the answer's number (the one after
  `####` if present, else the answer's last number); commas are ignored."""
  if "####" in answer:
    answer = answer.split("####")[-1]
  expected = last_number(answer)
  return expected is not None and last_number(generation_text) == expected


def score_exact(generation_text: str, answer: str) -> bool:
  """The stripped generation starts with the stripped answer (so `42` matches `42\\n
  Question: ...`, the model rambling on after its answer); an empty answer never
  matches."""
  expected = answer.strip()
  return bool(expected) and generation_text.strip().startswith(expected)


SCORERS: dict[str, Callable[[str, str], bool]] = {"gsm8k": score_gsm8k,
                                                  "exact": score_exact}


def task_accuracy(model: nnx.Module, prompts: Sequence[Sequence[int]],
                  answers: Sequence[str], decode: Callable[[list[int]], str], *,
                  batch_size: int, max_new_tokens: int, scoring: str,
                  eos_ids: Sequence[int] = (), stop: Sequence[str] = ()
                  ) -> tuple[float, list[str]]:
  """Greedy answers in consecutive batches of `batch_size` prompts (each batch
  re-routes together), cut at the first of `stop` strings and scored.
  Returns `(accuracy, generations)`."""
  if scoring not in SCORERS:
    raise ValueError(f"scoring must be one of {TASK_SCORING}, got {scoring!r}")
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
    texts.extend(cut_at_stop(decode(t), stop) for t in res.tokens)
  score = SCORERS[scoring]
  return float(np.mean([score(t, a) for t, a in zip(texts, answers)])), texts


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
  """`text` up to the first occurrence of any non-empty string of `stop`."""
  cut = len(text)
  for s in stop:
    if s and s in text:
      cut = min(cut, text.index(s))
  return text[:cut]


def token_windows(streams: Sequence[Sequence[int]], length: int, count: int
                  ) -> np.ndarray:
  """Up to `count` non-overlapping windows `[n, length]`, shared out round-robin over the
  token streams and spread evenly over each stream (not only its beginning)."""
  available = [len(s) // length for s in streams]
  share = [0] * len(streams)
  for _ in range(min(count, sum(available))):  # round-robin over streams with room
    i = min((i for i, n in enumerate(available) if share[i] < n), key=lambda i: share[i])
    share[i] += 1
  rows = []
  for s, n, k in zip(streams, available, share):
    for start in np.linspace(0, n - 1, k).round().astype(int) if k else []:
      rows.append(np.asarray(s[start * length:(start + 1) * length], np.int32))
  return np.stack(rows) if rows else np.zeros((0, length), np.int32)


def divisible_count(count: int, batch_sizes: Sequence[int]) -> int:
  """The largest n <= count divisible by every batch size."""
  lcm = math.lcm(*batch_sizes)
  return count // lcm * lcm


# --- Comparisons --------------------------------------------------------------------

def curve(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
  """`(distinct, delta)` points sorted by distinct, averaging points of equal distinct
  (NaN deltas dropped)."""
  groups: dict[float, list[float]] = {}
  for x, y in points:
    if not math.isnan(y):
      groups.setdefault(x, []).append(y)
  return [(x, float(np.mean(ys))) for x, ys in sorted(groups.items())]


def best_at(points: Sequence[tuple[float, float]], x: float) -> float | None:
  """The lowest delta among points with at most `x` distinct experts (None if none)."""
  ys = [py for px, py in points if px <= x + 1e-9 and not math.isnan(py)]
  return min(ys) if ys else None


def interpolate(points: Sequence[tuple[float, float]], x: float) -> float | None:
  """Linear interpolation along `points` (sorted by x) at `x`; None outside their range."""
  if not points or x < points[0][0] - 1e-9 or x > points[-1][0] + 1e-9:
    return None
  for (x0, y0), (x1, y1) in zip(points, points[1:]):
    if x0 <= x <= x1:
      return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
  return points[0][1]


def comparison_family(spec: PolicySpec) -> str | None:
  """The curve a spec belongs to in the equal-distinct comparison: the policy name for
  specs with the stored similarity and no min_batch (`none` joins every curve as its
  S = K end); None for metric and min_batch variants."""
  if spec.metric is not None or spec.min_batch != 1 or spec.seed:
    return None
  return spec.policy


def equal_distinct(rows: Sequence[dict[str, Any]], families: Sequence[str],
                   num_levels: int = 6) -> dict[str, Any]:
  """Δppl % of each family at common distinct-expert levels, for one batch size.

  `delta_ppl_pct`: linear interpolation along the family's points sorted by distinct
  (`curve`; None outside their range); `best_delta_ppl_pct`: the family's lowest Δppl
  with at most that many distinct experts (`best_at`). Levels are `num_levels` evenly
  spaced from the fewest to the most distinct experts of any family. `rows` need
  `comparison_family`, `distinct` and `delta_ppl_pct`; the `none` row (if any) joins
  every family (it is S = K).
  """
  base = [(r["distinct"], r["delta_ppl_pct"]) for r in rows
          if r["comparison_family"] == "none"]
  points = {f: base + [(r["distinct"], r["delta_ppl_pct"]) for r in rows
                       if r["comparison_family"] == f] for f in families}
  xs = [x for p in points.values() for x, _ in p]
  if not xs:
    return {"levels": [], "delta_ppl_pct": {f: [] for f in families},
            "best_delta_ppl_pct": {f: [] for f in families}, "points": points}
  lo, hi = min(xs), max(xs)
  levels = [float(v) for v in np.linspace(lo, hi, num_levels)] if hi > lo else [lo]
  return {
      "levels": levels,
      "delta_ppl_pct": {f: [interpolate(curve(p), x) for x in levels]
                        for f, p in points.items()},
      "best_delta_ppl_pct": {f: [best_at(p, x) for x in levels] for f, p in points.items()},
      "points": {f: [list(q) for q in curve(p)] for f, p in points.items()},
  }


def comparisons(rows: Sequence[dict[str, Any]], batch_sizes: Sequence[int],
                families: Sequence[str] = ("sere", "topk_truncate", "random", "oea",
                                           "sere_hybrid")
                ) -> dict[str, Any]:
  """Computed comparisons of a grid's rows, keyed by batch size (as a string):
  `equal_distinct` (see `equal_distinct`; with `sere_minus`: per other family, the
  interpolated Δppl % of `sere` minus that family's at each level, negative where
  `sere` loses less, None outside either range) and `metrics`: Δppl % and distinct
  experts of `sere` at S=2, rho=0 per similarity metric (`stored` = the model's own)."""
  out: dict[str, Any] = {"equal_distinct": {}, "metrics": {}}
  for g in batch_sizes:
    at_g = [r for r in rows if r["batch_size"] == g]
    eq = equal_distinct(at_g, families)
    if "sere" in families:
      ours = eq["delta_ppl_pct"]["sere"]
      eq["sere_minus"] = {
          f: [None if a is None or b is None else a - b for a, b in zip(ours, theirs)]
          for f, theirs in eq["delta_ppl_pct"].items() if f != "sere"}
    out["equal_distinct"][str(g)] = eq
    out["metrics"][str(g)] = [
        {"metric": r["metric"] or "stored", "spec": r["spec"], "distinct": r["distinct"],
         "delta_ppl_pct": r["delta_ppl_pct"], "agreement": r["agreement"]}
        for r in at_g if r["policy"] == "sere" and r["select_top_k"] == 2
        and r["min_batch"] == 1 and r["quantile"] is None and r["threshold"] == 0.0]
  return out


@dataclasses.dataclass
class Task:
  """A task for `evaluate_grid`: token prompts, answers, and how to score them."""
  prompts: list[list[int]]
  answers: list[str]
  decode: Callable[[list[int]], str]
  scoring: str = "exact"
  max_new_tokens: int = 256
  eos_ids: tuple[int, ...] = ()
  stop: tuple[str, ...] = ()


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
  baseline). `log(fmt, *args)` reports progress (default: absl logging.info).
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
  try:
    ref = reference(model, tokens, max_tokens=max_tokens)
    ref_ppl = float(np.exp(np.mean(ref.nll)))
    log("reference (none): perplexity %.4f over %s tokens, %.1f s", ref_ppl,
        ref.nll.size, time.time() - start)
    none_greedy = None
    if prompts is not None and greedy_tokens > 0:
      configure(model, [moe.NO_REROUTE] * num_layers, 0)
      none_greedy = greedy(model, prompts, greedy_tokens, 0, max_tokens=max_tokens)
    rows: list[dict[str, Any]] = []
    total = len(batch_sizes) * len(specs)
    for g in batch_sizes:
      for spec in specs:
        t0 = time.time()
        mats = matrices(spec)
        configs = layer_configs(spec, mats, num_layers)
        configure(model, configs, g, mats)
        result = teacher_forced(model, tokens, g, ref, max_tokens=max_tokens)
        row = _row(spec, g, result, ref_ppl, configs)
        if none_greedy is not None:
          cont = (none_greedy if spec.policy == "none" else
                  greedy(model, prompts, greedy_tokens, g, max_tokens=max_tokens))
          row["exact_match"], row["prefix_agreement"] = exact_match(none_greedy, cont)
        if task is not None:
          row["task_accuracy"], _ = task_accuracy(
              model, task.prompts, task.answers, task.decode, batch_size=g,
              max_new_tokens=task.max_new_tokens, scoring=task.scoring,
              eos_ids=task.eos_ids, stop=task.stop)
        row["seconds"] = time.time() - t0
        rows.append(row)
        log("config %d/%d (batch %d, %s): ppl %.4f (%+.2f%%), distinct %.2f, "
            "%.1f s (elapsed %.1f s)", len(rows), total, g, spec.label, row["perplexity"],
            row["delta_ppl_pct"], row["distinct"], row["seconds"], time.time() - start)
  finally:
    for b, (config, group) in zip(blocks, saved):
      b.reroute, b.group_size = config, group
    for b, m in zip(blocks, stored):
      b.similarity[...] = jnp.asarray(m)
  for row in rows:
    none = next(r for r in rows if r["batch_size"] == row["batch_size"]
                and r["policy"] == "none")
    row["distinct_none"] = none["distinct"]
    row["distinct_pct_of_none"] = 100.0 * row["distinct"] / none["distinct"]
  return rows


def _row(spec: PolicySpec, g: int, result: TeacherForced, ref_ppl: float,
         configs: Sequence[RerouteConfig]) -> dict[str, Any]:
  ppl = result.perplexity
  return {
      "spec": spec.text, "label": spec.label, "policy": spec.policy,
      "comparison_family": comparison_family(spec), "batch_size": g,
      "select_top_k": spec.select_top_k, "threshold": spec.threshold,
      "quantile": spec.quantile, "score_weight": spec.score_weight,
      "metric": spec.metric, "min_batch": spec.min_batch, "seed": spec.seed,
      "thresholds": [c.threshold for c in configs],
      "nll": float(np.mean(result.nll)), "perplexity": ppl,
      "delta_ppl_pct": 100.0 * (ppl / ref_ppl - 1.0),
      "agreement": result.agreement, "kl": result.kl,
      "distinct": result.distinct,
      "distinct_per_layer": [float(x) for x in result.distinct_per_layer],
      "stats_per_layer": {f: [float(x) for x in result.stats[:, j]]
                          for j, f in enumerate(STAT_FIELDS)},
  }

"""The quality study: every policy at equal distinct experts, with bootstrap intervals.

    data = study_data(tokenizer, corpus, seq_len=128, per_domain=64)
    rows = run_study(model, specs, [8, 16, 32, 64], data)    # one row per (B, spec)

`study_data` takes held-out windows of each corpus domain, interleaved so that every
decode batch mixes domains, and marks the answer tokens of the synthetic tasks: an
answer counts as right when every token that covers it, and the token after it (the
end of the answer), is the model's top-1 prediction given the true prefix, which is
exactly when greedy decoding from its prompt reproduces it. `run_study` evaluates each
(batch size, spec) by one teacher-forced forward with re-routing per position and
group (as `runner.teacher_forced`), compiling the whole grid of one batch size in
parallel threads first; a row holds the distinct experts per layer, perplexity overall
and per domain with its change against `none` and a paired bootstrap 95 % interval over
sequences, top-1 agreement and KL against `none`, and task exact-match accuracy with
its interval. With `greedy_tokens` > 0 each spec also decodes freely: from the first
`L - greedy_tokens` tokens of every window it generates `greedy_tokens` greedily (the
prompt prefilled without re-routing, every new token re-routed with its group, as
`generation.generate` does), and the row holds how much of `none`'s continuation it
reproduces (whole continuations and the agreeing prefix, with its interval).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import re
from typing import Any, Callable, Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from sere_jax import generation
from sere_jax import moe
from sere_jax.evaluation import metrics
from sere_jax.evaluation.data import token_windows
from sere_jax.evaluation.runner import configure, stored_similarity, teacher_forced_logp
from sere_jax.policy_spec import PolicySpec, layer_configs
from sere_jax.models import base as model_base

_ANSWER = re.compile(r"\nA:([^\n]*)\n")


@dataclasses.dataclass(frozen=True)
class StudyData:
  """`tokens [N, L]`, each sequence's domain, and `answer [N, L-1]`: for each target
  position (token l+1 predicted at l), 1 + the index of the task answer it belongs to
  within its sequence, 0 elsewhere."""
  tokens: np.ndarray
  domains: tuple[str, ...]
  answer: np.ndarray


def _task_window(tokenizer, text: str, length: int) -> tuple[np.ndarray, np.ndarray]:
  """The first `length` tokens of a task document and its answer marks."""
  enc = tokenizer.encode(text, add_special_tokens=False)
  ids, offsets = np.asarray(enc.ids[:length], np.int32), enc.offsets[:length]
  marks = np.zeros(length - 1, np.int32)
  item = 0
  for match in _ANSWER.finditer(text):
    lo, hi = match.span(1)
    covering = [i for i, (a, b) in enumerate(offsets) if a < hi and b > lo]
    if not covering or covering[-1] + 1 >= len(offsets):
      break
    item += 1
    for i in covering + [covering[-1] + 1]:  # the answer and the token that ends it
      if i >= 1:
        marks[i - 1] = item
  if ids.shape[0] < length:
    raise ValueError(f"a task document has {ids.shape[0]} tokens, fewer than {length}")
  return ids, marks


def study_data(tokenizer, documents: dict[str, Sequence[str]], *, seq_len: int,
               per_domain: int) -> StudyData:
  """Windows of `seq_len` tokens, `per_domain` per domain, interleaved by domain.

  `documents` maps a domain to its held-out documents; the `tasks` domain's
  documents must hold `Q: ...\\nA:<answer>\\n` records (the corpus format).
  """
  by_domain: dict[str, tuple[np.ndarray, np.ndarray]] = {}
  for domain, docs in documents.items():
    if domain == "tasks":
      pairs = [_task_window(tokenizer, d, seq_len) for d in docs[:per_domain]]
      tokens = np.stack([p[0] for p in pairs])
      answer = np.stack([p[1] for p in pairs])
    else:
      streams = [np.asarray(e.ids, np.int32) for e in
                 tokenizer.encode_batch(list(docs), add_special_tokens=False)]
      tokens = token_windows(streams, seq_len, per_domain)
      answer = np.zeros((tokens.shape[0], seq_len - 1), np.int32)
    if tokens.shape[0] < per_domain:
      raise ValueError(f"domain {domain!r} gives {tokens.shape[0]} windows of {seq_len} "
                       f"tokens, fewer than {per_domain}")
    by_domain[domain] = (tokens, answer)
  names = sorted(by_domain)
  order = [(d, i) for i in range(per_domain) for d in names]
  return StudyData(np.stack([by_domain[d][0][i] for d, i in order]),
                   tuple(d for d, _ in order),
                   np.stack([by_domain[d][1][i] for d, i in order]))


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_dtype"))
def forward(graphdef, state, tokens, ref_logp, *, cache_dtype):
  """Teacher-forced decode forward of `tokens [N, L]`: per target position the NLL,
  whether the top-1 prediction is the target, top-1 agreement and KL(ref || model)
  against `ref_logp [N, L-1, V]`, and `stats [layers, 5]`."""
  logp, nll, stats = teacher_forced_logp(graphdef, state, tokens, cache_dtype)
  top1 = jnp.argmax(logp, axis=-1)
  agree = top1 == jnp.argmax(ref_logp, axis=-1)
  kl = jnp.sum(jnp.exp(ref_logp) * (ref_logp - logp), axis=-1)
  return nll, top1 == tokens[:, 1:], agree, kl, stats


_GREEDY = generation.SamplingConfig()


@functools.partial(jax.jit, static_argnames=("graphdef", "new_tokens", "cache_dtype"))
def greedy_continuation(graphdef, state, prompts, *, new_tokens, cache_dtype):
  """`new_tokens` greedy tokens `[N, new_tokens]` after `prompts [N, P]` (no EOS):
  `generation.generate`'s prefill and decode loop in one jitted call."""
  model = nnx.merge(graphdef, state)
  batch, length = prompts.shape
  slots = length + new_tokens - 1
  positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
  key = jax.random.PRNGKey(0)
  first, cache, cache_valid, _ = generation.model_step(
      graphdef, state, prompts, positions, jnp.ones((batch, length), jnp.bool_),
      model.init_cache(batch, slots, cache_dtype), jnp.zeros((batch, slots), jnp.bool_),
      jnp.asarray(0, jnp.int32), key, sampling=_GREEDY, decode=False)
  accepted, *_ = generation.decode_loop(
      graphdef, state, first, jnp.full((batch,), length, jnp.int32), cache, cache_valid,
      jnp.asarray(length, jnp.int32), key, sampling=_GREEDY, max_new_tokens=new_tokens,
      eos_ids=(), stop_sequences=(), pad_id=0)
  return accepted.tokens


def answers_correct(correct: np.ndarray, answer: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per sequence, `(answers right, answers)` from `correct [N, L-1]` and the marks."""
  right, total = np.zeros(answer.shape[0]), np.zeros(answer.shape[0])
  for n in range(answer.shape[0]):
    for item in np.unique(answer[n][answer[n] > 0]):
      total[n] += 1
      right[n] += bool(np.all(correct[n][answer[n] == item]))
  return right, total


def ratio_ci(right: np.ndarray, total: np.ndarray, *, seed: int = 0,
             num_resamples: int = 1000) -> tuple[float, float]:
  """95 % percentile bootstrap interval over sequences of `sum(right) / sum(total)`."""
  keep = total > 0
  right, total = right[keep], total[keep]
  rng = np.random.default_rng(seed)
  idx = rng.integers(0, right.shape[0], (num_resamples, right.shape[0]))
  stats = right[idx].sum(axis=1) / total[idx].sum(axis=1)
  return float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5))


def paired_ratio_delta_ci(right_a, right_b, total, *, seed: int = 0,
                          num_resamples: int = 1000) -> tuple[float, float]:
  """95 % interval of accuracy(a) - accuracy(b) (points), paired over sequences."""
  keep = total > 0
  a, b, total = right_a[keep], right_b[keep], total[keep]
  rng = np.random.default_rng(seed)
  idx = rng.integers(0, a.shape[0], (num_resamples, a.shape[0]))
  diff = 100.0 * (a[idx].sum(axis=1) - b[idx].sum(axis=1)) / total[idx].sum(axis=1)
  return float(np.percentile(diff, 2.5)), float(np.percentile(diff, 97.5))


@dataclasses.dataclass
class Outcome:
  """One (batch size, spec) evaluation, per sequence and target position."""
  nll: np.ndarray
  correct: np.ndarray
  agree: np.ndarray
  kl: np.ndarray
  stats: np.ndarray  # [layers, 5]
  continuation: np.ndarray | None = None  # [N, greedy_tokens] free-running greedy


def _configured_state(model, spec, group, matrices):
  """Sets every block's config, group size and similarity for `spec`; returns the
  split model. (A split shares the model's variables: take it right before use.)"""
  configure(model, layer_configs(spec, matrices, len(matrices)), group, matrices)
  return nnx.split(model)


def run_grid(model: nnx.Module, specs: Sequence[PolicySpec], group: int,
             data: StudyData, ref_logp: jax.Array, *, threads: int = 16,
             metric_matrices: dict[str, list[Any]] | None = None,
             greedy_tokens: int = 0,
             progress: Callable[[str], None] = lambda _: None) -> list[Outcome]:
  """Every spec at decode batch size `group`: compiled in parallel, then run. A spec
  naming a similarity metric uses `metric_matrices[metric]` (one `[E, E]` per layer),
  the others the model's stored similarity. `greedy_tokens` > 0 adds each spec's
  free-running greedy continuation of the windows' first `L - greedy_tokens` tokens."""
  dtype = model_base.param_dtype(model)
  stored = stored_similarity(model)

  def matrices(spec):
    if spec.metric is None:
      return stored
    if not metric_matrices or spec.metric not in metric_matrices:
      raise ValueError(f"{spec.text}: no {spec.metric!r} similarity was calibrated")
    return metric_matrices[spec.metric]

  length = data.tokens.shape[1]
  if not 0 <= greedy_tokens < length:
    raise ValueError(f"greedy_tokens must be in [0, {length}) for windows of {length} "
                     f"tokens, got {greedy_tokens}")
  tokens = jnp.asarray(data.tokens)
  prompts = tokens[:, :length - greedy_tokens]
  lowered = []
  for spec in specs:
    graphdef, state = _configured_state(model, spec, group, matrices(spec))
    lowered.append(forward.lower(graphdef, state, tokens, ref_logp, cache_dtype=dtype))
    if greedy_tokens:
      lowered.append(greedy_continuation.lower(graphdef, state, prompts,
                                               new_tokens=greedy_tokens, cache_dtype=dtype))
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    compiled = iter(pool.map(lambda p: p.compile(), lowered))
  outcomes = []
  for spec in specs:
    _, state = _configured_state(model, spec, group, matrices(spec))
    nll, correct, agree, kl, stats = next(compiled)(state, tokens, ref_logp)
    continuation = (np.asarray(next(compiled)(state, prompts)) if greedy_tokens
                    else None)
    outcomes.append(Outcome(np.asarray(nll, np.float64), np.asarray(correct),
                            np.asarray(agree), np.asarray(kl, np.float64),
                            np.asarray(stats, np.float64), continuation))
    progress(spec.text)
  configure(model, [moe.NO_REROUTE] * len(stored), 0, stored)  # leave it as found
  return outcomes


def row(spec: PolicySpec, group: int, out: Outcome, ref: Outcome, data: StudyData,
        seed: int = 0) -> dict[str, Any]:
  """The JSON row of one evaluation against the `none` reference `ref`."""
  distinct = out.stats[:, generation.STAT_FIELDS.index("distinct_after")]
  device_max = out.stats[:, generation.STAT_FIELDS.index("max_device_distinct")]
  right, total = answers_correct(out.correct, data.answer)
  ref_right, _ = answers_correct(ref.correct, data.answer)
  domains = np.asarray(data.domains)
  per_domain = {}
  for d in sorted(set(data.domains)):
    m = domains == d
    per_domain[d] = {
        "perplexity": float(np.exp(out.nll[m].mean())),
        "ppl_delta_pct": 100.0 * (np.exp(out.nll[m].mean() - ref.nll[m].mean()) - 1.0),
        "ppl_delta_ci": list(metrics.paired_bootstrap_delta_ppl_ci(out.nll[m], ref.nll[m],
                                                                   seed=seed))}
  accuracy = float(right.sum() / max(total.sum(), 1))
  greedy = {}
  if out.continuation is not None and ref.continuation is not None:
    prefix = metrics.agreeing_prefix(ref.continuation, out.continuation).astype(np.float64)
    greedy = {"greedy_tokens": int(out.continuation.shape[1]),
              "greedy_match": float(np.mean(prefix == out.continuation.shape[1])),
              "greedy_prefix": float(prefix.mean()),
              "greedy_prefix_ci": list(metrics.bootstrap_ci(prefix, seed=seed))}
  return {
      "spec": spec.text, "label": spec.label, "policy": spec.policy,
      "select_top_k": spec.select_top_k, "pool_size": spec.pool_size,
      "batch_size": group, "seed": spec.seed,
      "distinct_per_layer": float(distinct.mean()),
      "distinct_each_layer": [float(x) for x in distinct],
      "expert_devices": spec.expert_devices,
      "max_device_distinct_per_layer": float(device_max.mean()),
      "perplexity": float(np.exp(out.nll.mean())),
      "ppl_delta_pct": 100.0 * (np.exp(out.nll.mean() - ref.nll.mean()) - 1.0),
      "ppl_delta_ci": list(metrics.paired_bootstrap_delta_ppl_ci(out.nll, ref.nll,
                                                                 seed=seed)),
      "per_domain": per_domain,
      "agreement": float(out.agree.mean()), "kl": float(out.kl.mean()),
      "task_accuracy": accuracy, "task_accuracy_ci": list(ratio_ci(right, total, seed=seed)),
      "task_accuracy_delta_ci": list(paired_ratio_delta_ci(right, ref_right, total,
                                                           seed=seed)),
      "task_answers": int(total.sum()),
      **greedy,
  }

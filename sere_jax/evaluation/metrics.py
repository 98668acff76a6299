"""Scores of one evaluation and their uncertainty: greedy exact match against a
reference continuation, task answers scored GSM8K-style (the final number) or as a
string prefix, and percentile-bootstrap confidence intervals over sequences — of any
statistic (`bootstrap_ci`) and, pairing each sequence with itself under the reference
policy, of the perplexity increase in percent and of the accuracy difference. Pairing
removes the variation between sequences that both policies share, so the interval
measures the policy's effect, not which sequences were drawn.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import numpy as np


def agreeing_prefix(reference_tokens: np.ndarray, tokens: np.ndarray) -> np.ndarray:
  """Per row of `tokens [N, G]`, how many leading tokens equal `reference_tokens`'s."""
  a, b = np.asarray(reference_tokens), np.asarray(tokens)
  if a.shape != b.shape or a.ndim != 2:
    raise ValueError(f"continuations of shape {b.shape} vs reference {a.shape}: need "
                     "equal [N, G] shapes")
  same = a == b
  return np.where(same.all(axis=1), a.shape[1], np.argmin(same, axis=1))


def exact_match(reference_tokens: np.ndarray, tokens: np.ndarray) -> tuple[float, float]:
  """`(fraction of rows equal to the reference, mean length of the agreeing prefix)`."""
  prefix = agreeing_prefix(reference_tokens, tokens)
  return float(np.mean(prefix == np.shape(tokens)[1])), float(np.mean(prefix))


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
TASK_SCORING = tuple(SCORERS)


def score_answers(texts: Sequence[str], answers: Sequence[str], scoring: str
                  ) -> np.ndarray:
  """Per-item correctness `[N]` bool of generations against answers."""
  if scoring not in SCORERS:
    raise ValueError(f"scoring must be one of {TASK_SCORING}, got {scoring!r}")
  if len(texts) != len(answers):
    raise ValueError(f"{len(texts)} generations for {len(answers)} answers")
  score = SCORERS[scoring]
  return np.asarray([score(t, a) for t, a in zip(texts, answers)], bool)


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
  """`text` up to the first occurrence of any non-empty string of `stop`."""
  cut = len(text)
  for s in stop:
    if s and s in text:
      cut = min(cut, text.index(s))
  return text[:cut]


def bootstrap_ci(values_per_sequence: Any, stat: Callable[[np.ndarray], float] = np.mean,
                 num_resamples: int = 1000, seed: int = 0, level: float = 0.95
                 ) -> tuple[float, float]:
  """Percentile bootstrap interval of `stat` over sequences.

  `values_per_sequence [N, ...]`: one entry (a value or an array) per sequence; each
  resample draws N sequences with replacement and applies `stat` to them. Returns the
  `(1 - level) / 2` and `(1 + level) / 2` quantiles of the resampled statistic.
  """
  values = np.asarray(values_per_sequence)
  if values.ndim == 0 or len(values) == 0:
    raise ValueError(f"need at least one sequence, got shape {values.shape}")
  if num_resamples < 1:
    raise ValueError(f"num_resamples must be >= 1, got {num_resamples}")
  if not 0.0 < level < 1.0:
    raise ValueError(f"level must be in (0, 1), got {level}")
  draws = np.random.default_rng(seed).integers(0, len(values),
                                               (num_resamples, len(values)))
  samples = np.asarray([stat(values[d]) for d in draws], np.float64)
  low, high = np.quantile(samples, [(1.0 - level) / 2, (1.0 + level) / 2])
  return float(low), float(high)


def paired_bootstrap_delta_ppl_ci(nll_policy: np.ndarray, nll_ref: np.ndarray,
                                  **kwargs: Any) -> tuple[float, float]:
  """Interval of the perplexity increase in percent, `100 (exp(mean nll_policy) /
  exp(mean nll_ref) - 1)`, resampling sequences (rows of the `[N, L]` next-token NLLs,
  the same sequences under both policies) with replacement. `kwargs`: `bootstrap_ci`'s."""
  policy, ref = _paired(nll_policy, nll_ref)
  if policy.ndim != 2:
    raise ValueError(f"NLLs must be [N, L], got shape {policy.shape}")
  per_sequence = np.stack([policy.mean(axis=1), ref.mean(axis=1)], axis=1)
  return bootstrap_ci(
      per_sequence, lambda v: 100.0 * np.expm1(np.mean(v[:, 0]) - np.mean(v[:, 1])),
      **kwargs)


def paired_bootstrap_accuracy_delta_ci(correct_policy: Sequence[bool],
                                       correct_ref: Sequence[bool], **kwargs: Any
                                       ) -> tuple[float, float]:
  """Interval of the accuracy difference (policy minus reference, in accuracy units)
  over per-item correctness `[N]` of the same items, resampling items with
  replacement. `kwargs`: `bootstrap_ci`'s."""
  policy, ref = _paired(correct_policy, correct_ref)
  per_item = np.stack([policy, ref], axis=1).astype(np.float64)
  return bootstrap_ci(per_item, lambda v: np.mean(v[:, 0]) - np.mean(v[:, 1]), **kwargs)


def _paired(a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape:
    raise ValueError(f"paired samples differ in shape: {a.shape} vs {b.shape}")
  return a, b

"""Brute-force NumPy oracles of SERE re-routing (DESIGN.md §4) and of `sere_hybrid`.

Written from the spec alone, with plain Python loops, so that it shares no code
(and no vectorisation tricks) with `sere_jax.policies`. It is slow on purpose:
every step of §4 is spelled out literally.

Convention: similarity values are compared with the threshold in the precision of
the similarity matrix (float32); tests draw thresholds that are exactly
representable in float32, so the convention never decides a case there.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class OracleStats(NamedTuple):
  distinct_before: int
  distinct_after: int
  critical_kept: int
  slots_rerouted: int


class OracleResult(NamedTuple):
  ids: np.ndarray  # [T, K] int
  weights: np.ndarray  # [T, K], identical to the input weights
  stats: OracleStats
  primary: frozenset  # P (empty when the policy is off)
  target: dict  # expert -> target, for every expert 0..E-1 (identity when off)
  critical: frozenset  # critical experts (empty when off)


def _distinct_valid(ids: np.ndarray, valid: np.ndarray) -> int:
  seen = set()
  for t in range(ids.shape[0]):
    if valid[t]:
      for j in range(ids.shape[1]):
        seen.add(int(ids[t, j]))
  return len(seen)


def sere_oracle(ids, weights, valid, similarity, select_top_k: int, threshold: float,
                min_batch: int = 1) -> OracleResult:
  """SERE on one batch, exactly as DESIGN.md §4 states it.

  Args:
    ids: [T, K] integer expert ids.
    weights: [T, K] routing weights (returned unchanged).
    valid: [T] bools.
    similarity: [E, E] similarity matrix.
    select_top_k: S.
    threshold: rho.
    min_batch: re-routing is off when fewer than max(min_batch, 1) tokens are valid.
  """
  ids = np.asarray(ids)
  weights = np.asarray(weights)
  valid = [bool(v) for v in np.asarray(valid).reshape(-1)]
  sim = np.asarray(similarity, dtype=np.float32)
  num_tokens, top_k = ids.shape
  num_experts = sim.shape[0]
  s = int(select_top_k)
  rho = float(np.float32(threshold))

  before = _distinct_valid(ids, valid)
  identity = {e: e for e in range(num_experts)}
  unchanged = OracleResult(ids.copy(), weights.copy(),
                           OracleStats(before, before, 0, 0),
                           frozenset(), identity, frozenset())

  # Minimum batch size: too few valid tokens -> nothing changes.
  if sum(valid) < max(int(min_batch), 1):
    return unchanged
  # Step 1.
  if s <= 0 or s >= top_k:
    return unchanged
  # Step 2: primary set over valid tokens' top-S slots.
  primary = set()
  for t in range(num_tokens):
    if not valid[t]:
      continue
    for j in range(s):
      primary.add(int(ids[t, j]))
  if not primary:
    return unchanged

  # Step 3: a target for every expert.
  target = {}
  critical = set()
  for e in range(num_experts):
    if e in primary:
      target[e] = e
      continue
    best_p, best_sim = None, None
    for p in sorted(primary):  # ascending, strict '>' -> ties go to the lowest index
      value = float(sim[e, p])
      if best_sim is None or value > best_sim:
        best_p, best_sim = p, value
    if rho > 0 and best_sim < rho:
      critical.add(e)
      target[e] = e
    else:
      target[e] = best_p

  # Step 4: primary slots are kept, secondary slots follow their expert's target.
  new_ids = ids.copy()
  for t in range(num_tokens):  # every row, valid or not
    for j in range(s, top_k):
      new_ids[t, j] = target[int(ids[t, j])]

  # Step 5: statistics over valid tokens.
  critical_used = set()
  rerouted = 0
  for t in range(num_tokens):
    if not valid[t]:
      continue
    for j in range(top_k):
      if j >= s and int(ids[t, j]) in critical:
        critical_used.add(int(ids[t, j]))
      if new_ids[t, j] != ids[t, j]:
        rerouted += 1
  stats = OracleStats(before, _distinct_valid(new_ids, valid), len(critical_used),
                      rerouted)
  return OracleResult(new_ids, weights.copy(), stats, frozenset(primary), target,
                      frozenset(critical))


def sere_hybrid_oracle(ids, weights, valid, similarity, router_scores,
                       select_top_k: int, threshold: float, score_weight: float,
                       min_batch: int = 1) -> OracleResult:
  """`sere_hybrid` on one batch: SERE whose substitute is chosen per token.

  P and the critical experts are exactly SERE's (critical: best similarity to P below
  rho, rho > 0). A secondary slot of token t holding an expert e that is neither in P
  nor critical gets the p in P maximising
  `(1 - lam) * similarity[e, p] + lam * router_scores[t, p]` (ties to the lowest p),
  evaluated in float32 one operation at a time. Weights are unchanged.

  Returns an `OracleResult` whose `target` is SERE's per-expert nearest-primary map
  (the similarity-only substitute) for reference; the ids hold the per-token choice.
  """
  # P, the critical experts and the similarity-only nearest primary are SERE's.
  sere = sere_oracle(ids, weights, valid, similarity, select_top_k, threshold, min_batch)
  if not sere.primary:  # SERE changed nothing (off, too few tokens, or P empty)
    return sere
  ids = np.asarray(ids)
  valid = [bool(v) for v in np.asarray(valid).reshape(-1)]
  sim = np.asarray(similarity, dtype=np.float32)
  scores = np.asarray(router_scores, dtype=np.float32)
  num_tokens, top_k = ids.shape
  s = int(select_top_k)
  w_sim = np.float32(1.0 - float(score_weight))
  w_score = np.float32(float(score_weight))
  primary, critical = sere.primary, sere.critical

  # Per-token substitutes for the secondary slots (every row, valid or not).
  new_ids = ids.copy()
  for t in range(num_tokens):
    for j in range(s, top_k):
      e = int(ids[t, j])
      if e in primary or e in critical:
        continue
      best_p, best_value = None, None
      for p in sorted(primary):
        value = np.float32(np.float32(w_sim * sim[e, p])
                           + np.float32(w_score * scores[t, p]))
        if best_value is None or value > best_value:
          best_p, best_value = p, value
      new_ids[t, j] = best_p

  rerouted = sum(int(new_ids[t, j] != ids[t, j])
                 for t in range(num_tokens) if valid[t] for j in range(top_k))
  stats = OracleStats(sere.stats.distinct_before, _distinct_valid(new_ids, valid),
                      sere.stats.critical_kept, rerouted)
  return OracleResult(new_ids, np.asarray(weights).copy(), stats, primary, sere.target,
                      critical)


def random_valid_mask(rng: np.random.Generator, mode: str, n: int) -> np.ndarray:
  """A `[n]` bool token mask for the randomized tests: "all", "none", "one" (a random
  token) or "random" (each token valid with a random probability)."""
  if mode == "all":
    return np.ones(n, bool)
  if mode == "none":
    return np.zeros(n, bool)
  if mode == "one":
    valid = np.zeros(n, bool)
    valid[rng.integers(0, n)] = True
    return valid
  return rng.random(n) < rng.random()

"""Brute-force NumPy oracles of SERE re-routing (docs/concepts.md), of `sere_hybrid`, of
`sere_ep` (with the placement of experts on devices) and of the controls.

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


def _nearest_primaries(sim: np.ndarray, primary: set, rho: float) -> tuple[dict, set]:
  """Each non-primary expert's most similar primary (ascending scan, strict '>': ties go
  to the lowest index) and the critical experts: best similarity below rho, rho > 0."""
  nearest, critical = {}, set()
  for e in range(sim.shape[0]):
    if e in primary:
      continue
    best_p, best_sim = None, None
    for p in sorted(primary):
      value = float(sim[e, p])
      if best_sim is None or value > best_sim:
        best_p, best_sim = p, value
    nearest[e] = best_p
    if rho > 0 and best_sim < rho:
      critical.add(e)
  return nearest, critical


def sere_oracle(ids, weights, valid, similarity, select_top_k: int, threshold: float,
                min_batch: int = 1) -> OracleResult:
  """SERE on one batch, exactly as docs/concepts.md states it.

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

  # Step 3: a target for every expert: itself if primary or critical, else its nearest
  # primary.
  nearest, critical = _nearest_primaries(sim, primary, rho)
  target = {e: e if e in primary or e in critical else nearest[e] for e in range(num_experts)}

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


# ---------------------------------------------------------------------------
# Controls and rivals of docs/concepts.md: keep_active, expert_pool, oracle, and the
# expert_pool calibration statistics. Same conventions: plain loops, every row is
# re-routed (valid or not), statistics count valid tokens only, and a dropped slot is
# the token's first expert with weight 0.


class PolicyResult(NamedTuple):
  ids: np.ndarray  # [T, K] int
  weights: np.ndarray  # [T, K] float64
  stats: OracleStats


def _applies(valid, min_batch: int) -> bool:
  return sum(bool(v) for v in valid) >= max(int(min_batch), 1)


def _primary_set(ids, valid, s: int) -> set:
  return {int(ids[t, j]) for t in range(ids.shape[0]) if valid[t] for j in range(s)}


def _result(ids, weights, new_ids, new_w, valid) -> PolicyResult:
  rerouted = 0
  for t in range(ids.shape[0]):
    if valid[t]:
      for j in range(ids.shape[1]):
        if new_ids[t, j] != ids[t, j] or new_w[t, j] != weights[t, j]:
          rerouted += 1
  stats = OracleStats(_distinct_valid(ids, valid), _distinct_valid(new_ids, valid), 0,
                      rerouted)
  return PolicyResult(new_ids, new_w, stats)


def keep_active_oracle(ids, weights, valid, select_top_k: int, renormalize: bool,
                       min_batch: int = 1) -> PolicyResult:
  """Keep the top-S slots; keep a slot past S whose expert is a primary of the batch,
  drop the rest; optionally rescale the kept weights to the token's original sum."""
  ids = np.asarray(ids)
  weights = np.asarray(weights, np.float64)
  valid = [bool(v) for v in np.asarray(valid).reshape(-1)]
  num_tokens, top_k = ids.shape
  s = int(select_top_k)
  new_ids, new_w = ids.copy(), weights.copy()
  if not (0 < s < top_k and _applies(valid, min_batch)):
    return _result(ids, weights, new_ids, new_w, valid)
  primary = _primary_set(ids, valid, s)
  for t in range(num_tokens):
    for j in range(s, top_k):
      if int(ids[t, j]) not in primary:
        new_ids[t, j] = ids[t, 0]
        new_w[t, j] = 0.0
    if renormalize:
      kept = sum(new_w[t])
      if kept > 0:
        total = sum(weights[t])
        for j in range(top_k):
          new_w[t, j] = new_w[t, j] * total / kept
  return _result(ids, weights, new_ids, new_w, valid)


def expert_pool_oracle(ids, weights, valid, similarity, pool_size: int,
                       output_norm=None, scale=None, min_batch: int = 1) -> PolicyResult:
  """importance(e) = sum over valid tokens' slots on e of weight x output_norm[e]; the
  pool is the `pool_size` most important experts valid tokens use (ties to the lower
  index); every slot outside it moves to its most similar pool member (ties to the
  lower index), its weight times scale[e, p] clipped to [0, 2]."""
  ids = np.asarray(ids)
  weights = np.asarray(weights, np.float64)
  valid = [bool(v) for v in np.asarray(valid).reshape(-1)]
  sim = np.asarray(similarity, np.float32)
  num_experts = sim.shape[0]
  norm = np.ones(num_experts) if output_norm is None else np.asarray(output_norm)
  scale = np.ones((num_experts, num_experts)) if scale is None else np.asarray(scale)
  num_tokens, top_k = ids.shape
  new_ids, new_w = ids.copy(), weights.copy()
  if not _applies(valid, min_batch):
    return _result(ids, weights, new_ids, new_w, valid)
  importance = {}
  for t in range(num_tokens):
    if valid[t]:
      for j in range(top_k):
        e = int(ids[t, j])
        importance[e] = importance.get(e, 0.0) + weights[t, j] * float(norm[e])
  ranked = sorted(importance, key=lambda e: (-importance[e], e))
  pool = sorted(ranked[:pool_size])
  for t in range(num_tokens):
    for j in range(top_k):
      e = int(ids[t, j])
      if e in pool:
        continue
      best_p, best_sim = None, None
      for p in pool:
        if best_sim is None or float(sim[e, p]) > best_sim:
          best_p, best_sim = p, float(sim[e, p])
      new_ids[t, j] = best_p
      new_w[t, j] = weights[t, j] * min(max(float(scale[e, best_p]), 0.0), 2.0)
  return _result(ids, weights, new_ids, new_w, valid)


def oracle_policy_oracle(ids, weights, valid, expert_out, select_top_k: int,
                         min_batch: int = 1) -> PolicyResult:
  """Each slot past S of token t holding expert e takes the primary p minimising
  ||expert_out[t, p] - expert_out[t, e]|| (ties to the lower index), e itself if it
  is a primary. Weights are unchanged."""
  ids = np.asarray(ids)
  weights = np.asarray(weights, np.float64)
  valid = [bool(v) for v in np.asarray(valid).reshape(-1)]
  out = np.asarray(expert_out, np.float64)
  num_tokens, top_k = ids.shape
  s = int(select_top_k)
  new_ids = ids.copy()
  if not (0 < s < top_k and _applies(valid, min_batch)):
    return _result(ids, weights, new_ids, weights.copy(), valid)
  primary = sorted(_primary_set(ids, valid, s))
  for t in range(num_tokens):
    for j in range(s, top_k):
      e = int(ids[t, j])
      if e in primary:
        continue
      best_p, best_d = None, None
      for p in primary:
        d = float(np.sum((out[t, p] - out[t, e]) ** 2))
        if best_d is None or d < best_d:
          best_p, best_d = p, d
      new_ids[t, j] = best_p
  return _result(ids, weights, new_ids, weights.copy(), valid)


def pool_stats_oracle(outputs, ridge: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
  """Per expert, the mean output norm over tokens; per pair (e, p), with u = A_e[t]
  and v = A_p[t], sum_t ||u|| <u, v> / (sum_t ||u|| ||v||^2 + lam), lam = ridge x the
  mean denominator over all pairs, diagonal 1. `outputs` is [E, T, H]."""
  a = np.asarray(outputs, np.float64)
  num_experts, num_tokens, _ = a.shape
  norm = np.zeros(num_experts)
  num = np.zeros((num_experts, num_experts))
  den = np.zeros((num_experts, num_experts))
  for e in range(num_experts):
    for t in range(num_tokens):
      norm[e] += np.linalg.norm(a[e, t]) / num_tokens
  for e in range(num_experts):
    for p in range(num_experts):
      for t in range(num_tokens):
        u, v = a[e, t], a[p, t]
        num[e, p] += np.linalg.norm(u) * float(u @ v)
        den[e, p] += np.linalg.norm(u) * float(v @ v)
  lam = ridge * den.mean()
  scale = num / (den + lam)
  np.fill_diagonal(scale, 1.0)
  return norm, scale


# ---------------------------------------------------------------------------
# sere_ep: SERE for experts placed on devices in contiguous blocks. Same conventions
# as `sere_oracle`: every row is re-routed (valid or not), statistics count valid
# tokens only.


def device_blocks(num_experts: int, num_devices: int) -> list[list[int]]:
  """The experts of each device: contiguous blocks of ceil(E / n), the last devices
  holding fewer (possibly none)."""
  per_device = 0
  while per_device * num_devices < num_experts:
    per_device += 1
  blocks = []
  for d in range(num_devices):
    low, high = d * per_device, (d + 1) * per_device
    blocks.append([e for e in range(num_experts) if low <= e < high])
  return blocks


def _device_of(expert: int, blocks: list[list[int]]) -> int:
  for d, block in enumerate(blocks):
    if expert in block:
      return d
  raise AssertionError(f"expert {expert} is on no device")


def max_distinct_per_device(ids, valid, num_experts: int, num_devices: int) -> int:
  """The most distinct experts that valid tokens' slots read on any one device."""
  ids = np.asarray(ids)
  valid = [bool(v) for v in np.asarray(valid).reshape(-1)]
  blocks = device_blocks(num_experts, num_devices)
  best = 0
  for block in blocks:
    seen = set()
    for t in range(ids.shape[0]):
      if not valid[t]:
        continue
      for j in range(ids.shape[1]):
        if int(ids[t, j]) in block:
          seen.add(int(ids[t, j]))
    best = max(best, len(seen))
  return best


def sere_ep_oracle(ids, weights, valid, similarity, select_top_k: int, threshold: float,
                   num_devices: int, min_batch: int = 1) -> OracleResult:
  """`sere_ep` on one batch, from its stated semantics.

  Primaries P: the top-S experts of valid tokens. Critical: not in P, best similarity
  to P below rho (rho > 0). Budget: the most primaries any device holds. A critical
  expert used by some valid token's secondary slot is kept while its device has room:
  per device, such experts by descending secondary weight (sum of the weights of valid
  secondary slots holding it; ties to the lowest index), at most budget - (primaries
  on the device) of them. Every other non-primary expert goes to its most similar
  primary (ties to the lowest index). `critical` of the result holds the kept experts
  and `stats.critical_kept` counts them.
  """
  # P and the critical experts are SERE's; so is "nothing changes".
  sere = sere_oracle(ids, weights, valid, similarity, select_top_k, threshold, min_batch)
  if not sere.primary:  # SERE changed nothing (off, too few tokens, or P empty)
    return sere
  ids = np.asarray(ids)
  weights = np.asarray(weights)
  valid = [bool(v) for v in np.asarray(valid).reshape(-1)]
  sim = np.asarray(similarity, dtype=np.float32)
  num_tokens, top_k = ids.shape
  num_experts = sim.shape[0]
  s = int(select_top_k)
  primary, critical = set(sere.primary), set(sere.critical)
  # Every non-primary expert's nearest primary, the critical ones' too (SERE keeps
  # those, `sere_ep` may not).
  nearest, _ = _nearest_primaries(sim, primary, float(np.float32(threshold)))

  # Secondary routing weight of each expert (exact in float64 for dyadic weights).
  mass, used = {}, set()
  for t in range(num_tokens):
    if not valid[t]:
      continue
    for j in range(s, top_k):
      e = int(ids[t, j])
      used.add(e)
      mass[e] = mass.get(e, 0.0) + float(weights[t, j])

  blocks = device_blocks(num_experts, num_devices)
  primaries_on = [sum(1 for e in block if e in primary) for block in blocks]
  budget = max(primaries_on)
  kept = set()
  for d, block in enumerate(blocks):
    wanted = [e for e in block if e in critical and e in used]
    wanted.sort(key=lambda e: (-mass[e], e))
    room = budget - primaries_on[d]
    for e in wanted[:room]:
      kept.add(e)

  target = {}
  for e in range(num_experts):
    target[e] = e if (e in primary or e in kept) else nearest[e]

  new_ids = ids.copy()
  for t in range(num_tokens):
    for j in range(s, top_k):
      new_ids[t, j] = target[int(ids[t, j])]
  rerouted = 0
  for t in range(num_tokens):
    if valid[t]:
      for j in range(top_k):
        if new_ids[t, j] != ids[t, j]:
          rerouted += 1
  stats = OracleStats(sere.stats.distinct_before, _distinct_valid(new_ids, valid),
                      len(kept), rerouted)
  return OracleResult(new_ids, weights.copy(), stats, frozenset(primary), target,
                      frozenset(kept))

"""The re-routing configuration: a frozen, validated dataclass."""

from __future__ import annotations

import dataclasses

from sere_jax.validation import check_int, check_unit

POLICIES = ("none", "sere", "sere_hybrid", "sere_ep", "topk_truncate", "keep_active",
            "oea", "random", "expert_pool", "oracle")
# Policies that read the layer's expert similarity matrix.
SIMILARITY_POLICIES = ("sere", "sere_hybrid", "sere_ep", "expert_pool")


@dataclasses.dataclass(frozen=True)
class RerouteConfig:
  """How an MoE layer re-routes its top-K experts in batched decoding.

  Attributes:
    policy: one of `POLICIES`. `none` keeps the original top-K routing; `sere` is
      similarity-based re-routing (docs/concepts.md); `sere_hybrid` is SERE whose substitute
      is chosen per token by `(1 - score_weight) * similarity + score_weight * router
      score` (critical experts as in `sere`); `sere_ep` is SERE for experts placed on
      `expert_devices` devices: a critical expert is kept only while its device stays
      within the most primaries any device holds, else it is re-routed like any other
      secondary (`policies.sere_ep_targets`); `topk_truncate` keeps only the top-S
      experts; `oea` lets slots past S take the token's best-scoring already-active
      experts; `keep_active` keeps the secondary slots whose expert is already a
      primary of the batch and drops the rest; `random` re-routes each secondary
      expert to a random primary expert (a fresh draw per step and layer);
      `expert_pool` keeps a per-batch pool of `pool_size` experts chosen by router
      mass and maps every other selected expert to its most similar pool member,
      rescaling that slot's weight; `oracle` gives each secondary slot the active
      expert whose output is closest to the original expert's output for that token
      (a diagnostic ceiling: it reads every expert's output).
    select_top_k: S, the number of primary experts per token that are never changed
      (not used by `none` and `expert_pool`). As in the paper, `reroute` and `moe_ffn`
      leave a top-K routing unchanged when `S <= 0` or `S >= K` (`is_active`); a
      `MoeBlock` rejects such a config for every other policy
      (`validation.check_layer_config`).
    threshold: rho in [0, 1]. Under `sere` and `sere_hybrid`, a secondary expert whose
      best similarity to the primary set is below rho is critical and kept. 0 disables
      the check.
    decode_only: apply the policy only to decode steps (prefill keeps top-K routing).
    min_batch: re-routing is off when fewer than this many tokens are valid.
    seed: seed of the `random` policy's draws.
    score_weight: lambda in [0, 1] of `sere_hybrid`: the weight of the token's router
      score against the similarity when ranking primaries. 0 gives `sere` exactly.
    renormalize: for `topk_truncate` and `keep_active`, whether the kept weights are
      renormalised to the original total; None follows the model's own top-K rule.
    pool_size: D of `expert_pool`, the experts kept per batch (0 for other policies;
      a `MoeBlock` rejects more than its number of experts).
    expert_devices: the number of devices the experts are placed on in contiguous
      blocks (`sere_jax.placement`; expert parallelism). 0: one device. `sere_ep`
      needs it; for every policy it sets what `RerouteStats.max_device_distinct`
      counts.
  """

  policy: str = "sere"
  select_top_k: int = 2
  threshold: float = 0.0
  decode_only: bool = True
  min_batch: int = 1
  seed: int = 0
  score_weight: float = 0.5
  renormalize: bool | None = None
  pool_size: int = 0
  expert_devices: int = 0

  def __post_init__(self):
    if self.policy not in POLICIES:
      raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
    check_int("select_top_k", self.select_top_k, low=0)
    check_unit("threshold", self.threshold)
    if not isinstance(self.decode_only, bool):
      raise ValueError(f"decode_only must be a bool, got {self.decode_only!r}")
    check_int("min_batch", self.min_batch, low=0)
    check_int("seed", self.seed, low=0, high=2**32 - 1)
    check_unit("score_weight", self.score_weight)
    if self.renormalize is not None and not isinstance(self.renormalize, bool):
      raise ValueError(f"renormalize must be None or a bool, got {self.renormalize!r}")
    check_int("pool_size", self.pool_size, low=0)
    if self.policy == "expert_pool" and self.pool_size < 1:
      raise ValueError("policy 'expert_pool' needs pool_size >= 1")
    check_int("expert_devices", self.expert_devices, low=0)
    if self.policy == "sere_ep" and self.expert_devices < 1:
      raise ValueError("policy 'sere_ep' needs the expert placement: expert_devices >= 1 "
                       "(spec option devN, e.g. sere_ep:2:0.3:dev8)")

  def is_active(self, top_k: int) -> bool:
    """Whether this config changes a top-`top_k` routing at all."""
    if self.policy == "expert_pool":
      return True
    return self.policy != "none" and 0 < self.select_top_k < top_k

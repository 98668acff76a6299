"""The one written form of a re-routing policy: parser, printer and JSON.

Every script flag, evaluation grid, benchmark and result file names a policy by a spec
string; `parse` reads it, `PolicySpec.text` prints it back (canonical form) and
`PolicySpec.config` lowers it to the per-layer `RerouteConfig` that the library runs.

    none
    topk_truncate:S[:renorm|:raw]     keep_active:S[:renorm|:raw]
    oea:S        random:S        oracle:S
    expert_pool:D[:METRIC]
    sere:S[:RHO][:METRIC]
    sere_hybrid:S[:RHO[:W]][:METRIC]
    sere_ep:S[:RHO][:METRIC]:devN

S is the number of primary experts per token, D the expert pool's size, RHO the
critical-expert threshold (a number in [0, 1], or `qX`: per layer, the X-quantile of
that layer's off-diagonal similarity) and W the `sere_hybrid` router-score weight
(default 0.5). Options after the positional fields, in any order: a similarity metric
of `similarity.METRICS` (policies that read a similarity; default: the model's stored
one), `minN` (no re-routing below N valid tokens), `seedN` (the `random` draws),
`renorm` / `raw` (truncating policies: renormalise the kept weights, or not; default:
as the model renormalises its top-K), `prefill` (re-route prefill steps too) and
`devN` (experts placed on N expert-parallel devices: `sere_ep` needs it; on any policy,
`none` included, it sets the devices `max_device_distinct` counts over).
Example: `sere:2:q0.5:cosine:min8`, `sere_ep:2:0.3:dev8`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Sequence

import numpy as np

from sere_jax.config import POLICIES, SIMILARITY_POLICIES, RerouteConfig
from sere_jax.similarity import METRICS

# Policies whose weights of dropped slots may be renormalised (`renorm` / `raw`).
TRUNCATING_POLICIES = ("topk_truncate", "keep_active")
# Policies whose positional integer is the pool size D rather than S.
POOL_POLICIES = ("expert_pool",)
# Policies with a critical-expert threshold RHO after S.
THRESHOLD_POLICIES = ("sere", "sere_hybrid", "sere_ep")


@dataclasses.dataclass(frozen=True)
class PolicySpec:
  """One re-routing policy as written (see the module docstring for the syntax).

  `quantile` replaces `threshold` when set: each layer's rho is that quantile of its
  off-diagonal similarity. `metric` None means the model's stored similarity;
  `renormalize` None means "as the model does".
  """

  policy: str
  select_top_k: int = 0
  threshold: float = 0.0
  quantile: float | None = None
  score_weight: float = 0.5
  metric: str | None = None
  min_batch: int = 1
  seed: int = 0
  renormalize: bool | None = None
  pool_size: int = 0
  decode_only: bool = True
  expert_devices: int = 0

  def __post_init__(self):
    if self.policy not in POLICIES:
      raise ValueError(f"unknown policy {self.policy!r}; one of {POLICIES}")
    if self.quantile is not None and not 0.0 <= self.quantile <= 1.0:
      raise ValueError(f"quantile must be in [0, 1], got {self.quantile}")
    if self.metric is not None and self.metric not in METRICS:
      raise ValueError(f"metric must be one of {METRICS}, got {self.metric!r}")
    self.config()  # RerouteConfig validates the rest

  @property
  def uses_similarity(self) -> bool:
    return self.policy in SIMILARITY_POLICIES

  def _fields(self) -> list[tuple[str, str, str]]:
    """`(label prefix, text prefix, value)` of each field after the policy name."""
    if self.policy in POOL_POLICIES:
      fields = [("D=", "", str(self.pool_size))]
    else:
      fields = [("S=", "", str(self.select_top_k))]
    if self.policy in THRESHOLD_POLICIES:
      fields.append(("rho=", "", f"q{_num(self.quantile)}" if self.quantile is not None
                     else _num(self.threshold)))
      if self.policy == "sere_hybrid":
        fields.append(("w=", "", _num(self.score_weight)))
    if self.metric is not None:
      fields.append(("", "", self.metric))
    if self.renormalize is not None:
      word = "renorm" if self.renormalize else "raw"
      fields.append(("", "", word))
    if self.min_batch != 1:
      fields.append(("min_batch=", "min", str(self.min_batch)))
    if self.seed:
      fields.append(("seed=", "seed", str(self.seed)))
    if not self.decode_only:
      fields.append(("", "", "prefill"))
    if self.expert_devices:
      fields.append(("devices=", "dev", str(self.expert_devices)))
    return fields

  @property
  def text(self) -> str:
    """The canonical spec string (parses back to this spec)."""
    if self.policy == "none":
      return ":".join(["none"] + [p + v for _, p, v in self._fields()[1:]])
    return ":".join([self.policy] + [prefix + value for _, prefix, value in self._fields()])

  @property
  def label(self) -> str:
    """A readable name, e.g. `sere S=2 rho=q0.5 cosine min_batch=8`."""
    if self.policy == "none":
      return " ".join(["none"] + [p + v for p, _, v in self._fields()[1:]])
    return " ".join([self.policy] + [prefix + value for prefix, _, value in self._fields()])

  def config(self, threshold: float | None = None) -> RerouteConfig:
    """The per-layer RerouteConfig (`threshold` overrides, for per-layer rho)."""
    return RerouteConfig(
        policy=self.policy, select_top_k=self.select_top_k,
        threshold=self.threshold if threshold is None else threshold,
        decode_only=self.decode_only, min_batch=self.min_batch, seed=self.seed,
        score_weight=self.score_weight, renormalize=self.renormalize,
        pool_size=self.pool_size, expert_devices=self.expert_devices)

  def to_json(self) -> dict[str, Any]:
    """The spec's fields as a JSON-ready dict (`from_json` reads it back)."""
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, data: dict[str, Any]) -> PolicySpec:
    unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f"policy spec JSON has unknown fields {sorted(unknown)}")
    return cls(**data)


def _num(x: float) -> str:
  return f"{x:g}"


def _unit(token: str, what: str, text: str) -> float:
  try:
    value = float(token)
  except ValueError:
    value = math.nan
  if not 0.0 <= value <= 1.0:  # NaN fails too
    raise ValueError(f"policy spec {text!r}: {what} {token!r} must be a number in [0, 1]")
  return value


def parse(text: str) -> PolicySpec:
  """Parses one policy spec; ValueError names the bad token."""
  tokens = [t.strip() for t in text.strip().split(":")]
  policy, rest = tokens[0], tokens[1:]
  if policy not in POLICIES:
    raise ValueError(f"policy spec {text!r}: unknown policy {policy!r}; one of {POLICIES}")
  if policy == "none":
    kw: dict[str, Any] = {}
    for token in rest:
      if not re.fullmatch(r"dev\d+", token):
        raise ValueError(f"policy spec {text!r}: 'none' takes no fields but devN, got "
                         f"{token!r}")
      _option(policy, token, text, kw)
    return PolicySpec("none", **kw)
  what = "D" if policy in POOL_POLICIES else "S"
  if not rest or not re.fullmatch(r"\d+", rest[0]) or int(rest[0]) < 1:
    bad = rest[0] if rest else "(missing)"
    raise ValueError(f"policy spec {text!r}: {what} {bad!r} must be an integer >= 1 "
                     f"(e.g. {policy}:2)")
  kw = {("pool_size" if what == "D" else "select_top_k"): int(rest[0])}
  rest = rest[1:]
  positional = {"sere_hybrid": ["threshold", "score_weight"]}.get(
      policy, ["threshold"] if policy in THRESHOLD_POLICIES else [])
  for name in positional:
    if not rest or not re.fullmatch(r"q?[\d.]+", rest[0]):
      break
    token, rest = rest[0], rest[1:]
    if name == "threshold" and token.startswith("q"):
      kw["quantile"] = _unit(token[1:], "quantile", text)
    elif token.startswith("q"):
      raise ValueError(f"policy spec {text!r}: score weight {token!r} must be a number "
                       "in [0, 1]")
    else:
      kw[name] = _unit(token, name.replace("_", " "), text)
  for token in rest:
    _option(policy, token, text, kw)
  try:
    return PolicySpec(policy, **kw)
  except ValueError as e:
    raise ValueError(f"policy spec {text!r}: {e}") from None


def _option(policy: str, token: str, text: str, kw: dict[str, Any]) -> None:
  """Reads one option token of `text` into `kw`."""
  def once(key, value):
    if key in kw:
      raise ValueError(f"policy spec {text!r}: {token!r} repeats an option")
    kw[key] = value

  if match := re.fullmatch(r"min(\d+)", token):
    once("min_batch", int(match.group(1)))
  elif match := re.fullmatch(r"seed(\d+)", token):
    once("seed", int(match.group(1)))
  elif token in ("renorm", "raw"):
    if policy not in TRUNCATING_POLICIES:
      raise ValueError(f"policy spec {text!r}: {token!r} only applies to "
                       f"{TRUNCATING_POLICIES}")
    once("renormalize", token == "renorm")
  elif token == "prefill":
    once("decode_only", False)
  elif match := re.fullmatch(r"dev(\d+)", token):
    once("expert_devices", int(match.group(1)))
  elif token in METRICS:
    if policy not in SIMILARITY_POLICIES:
      raise ValueError(f"policy spec {text!r}: metric {token!r} only applies to "
                       f"{SIMILARITY_POLICIES}")
    once("metric", token)
  else:
    raise ValueError(f"policy spec {text!r}: unknown token {token!r} (expected a metric "
                     f"of {METRICS}, minN, seedN, renorm, raw, prefill or devN)")


def parse_list(texts: Sequence[str]) -> list[PolicySpec]:
  """Parses specs, skipping blank ones; ValueError on a repeat (same canonical text)."""
  texts = [t for t in texts if t.strip()]
  specs = [parse(t) for t in texts]
  seen: dict[str, str] = {}
  for text, spec in zip(texts, specs):
    if spec.text in seen:
      raise ValueError(f"policy spec {text!r} repeats {seen[spec.text]!r}")
    seen[spec.text] = text
  return specs


def off_diagonal_quantile(matrix: Any, q: float) -> float:
  """The `q`-quantile of a square matrix's off-diagonal entries, clipped to [0, 1]."""
  m = np.asarray(matrix, np.float64)
  values = m[~np.eye(m.shape[0], dtype=bool)]
  if not np.all(np.isfinite(values)):
    raise ValueError("the similarity holds NaN or inf (not calibrated?)")
  return float(np.clip(np.quantile(values, q), 0.0, 1.0))


def layer_configs(spec: PolicySpec, matrices: Sequence[Any] | None, num_layers: int
                  ) -> list[RerouteConfig]:
  """One RerouteConfig per MoE layer (per-layer rho when `spec.quantile` is set)."""
  if spec.quantile is None:
    return [spec.config()] * num_layers
  if matrices is None or len(matrices) != num_layers:
    raise ValueError(f"{spec.text}: per-layer thresholds need one similarity matrix per "
                     f"MoE layer ({num_layers})")
  return [spec.config(off_diagonal_quantile(m, spec.quantile)) for m in matrices]

"""The decode step against its targets: a small summary of one decode-suite run.

`benchmark --suite=decode --targets_out=FILE` (with the bandwidth probe run in separate
processes first, and `--profile_dir` for the kernel counts) writes `decode_targets(result)`:

  bandwidth_tbps               the probe's copy bandwidth (median of the processes'
                               medians), the denominator of every roofline of the run
  bandwidth_spread_pct         half the spread of the processes' copy medians, in % (±)
  kernels_per_layer_b16        GPU kernels per decode step / layers, at B = 16 `none`
  non_expert_us_per_layer_b16  GPU busy time per step outside the grouped matmuls
                               (kernels named `sere_gmm*`) / layers, µs, at B = 16 `none`
  b1_none_ms                   ms per token at B = 1, `none`
  b1_none_x_roofline, b16_none_x_roofline, b16_sere2_x_roofline
                               ms per token over the step's own roofline
  b16_sere2_speedup, b64_sere2_speedup
                               `none`'s time / SERE S = 2 (ρ = 0)'s at the same B
  gmm_backend_default          the grouped-matmul backend the run's MoE op used

Kernel counts and busy time come from profiled steps, which launch kernels one by one
(no CUDA graphs), so they describe the work, not the step time.
"""

from __future__ import annotations

from typing import Any, Mapping

from sere_jax.benchmarking import layer_costs
from sere_jax.kernels import moe_ffn as moe_ffn_lib

KEYS = ("bandwidth_tbps", "bandwidth_spread_pct", "kernels_per_layer_b16",
        "non_expert_us_per_layer_b16", "b1_none_ms", "b1_none_x_roofline",
        "b16_none_x_roofline", "b16_sere2_x_roofline", "b16_sere2_speedup",
        "b64_sere2_speedup", "gmm_backend_default")
BATCHES = (1, 16, 64)
POLICIES = ("none", "sere:2:0")


def check_plan(batches, policies, profile_dir: str) -> None:
  """Raises ValueError, naming what is missing, unless a decode run of `batches` and
  `policies` (canonical spec texts) with `profile_dir` yields every key."""
  missing = ([f"batch size {b}" for b in BATCHES if b not in batches]
             + [f"policy {p}" for p in POLICIES if p not in policies]
             + ([] if profile_dir else ["--profile_dir (the B = 16 kernel counts)"]))
  if missing:
    raise ValueError("the decode targets need " + ", ".join(missing))


def _row(rows, batch: int, policy: str) -> Mapping[str, Any]:
  for row in rows:
    if row["batch"] == batch and row["label"] == policy:
      return row
  raise ValueError(f"the decode result has no row for B={batch} {policy}")


def decode_targets(result: Mapping[str, Any]) -> dict[str, Any]:
  """The summary (`KEYS`, in order) of a decode-suite `result` whose bandwidth comes
  from `bandwidth.across_processes` and whose B = 16 `none` row has a profile."""
  rows = result["rows"]
  layers = int(result["hf_config"]["num_hidden_layers"])
  probe = result["bandwidth"]["copy"]
  if "medians" not in probe:
    raise ValueError("the decode result's bandwidth was probed in one process; the "
                     "targets need it from separate processes (bandwidth.across_processes)")
  profile = _row(rows, 16, "none").get("profile")
  if not profile:
    raise ValueError("the B=16 none row has no profile: run with --profile_dir")
  kernels = moe_ffn_lib.BACKENDS.get(result["impl"])
  values = dict(
      bandwidth_tbps=probe["tbs"],
      bandwidth_spread_pct=probe["spread"] * 50,
      kernels_per_layer_b16=profile["gpu_events"] / layers,
      non_expert_us_per_layer_b16=(profile["gpu_busy_us"]
                                   - layer_costs.expert_us(profile)) / layers,
      b1_none_ms=_row(rows, 1, "none")["ms_per_token"],
      b1_none_x_roofline=_row(rows, 1, "none")["measured_over_roofline"],
      b16_none_x_roofline=_row(rows, 16, "none")["measured_over_roofline"],
      b16_sere2_x_roofline=_row(rows, 16, "sere:2:0")["measured_over_roofline"],
      b16_sere2_speedup=_row(rows, 16, "sere:2:0")["speedup_over_none"],
      b64_sere2_speedup=_row(rows, 64, "sere:2:0")["speedup_over_none"],
      gmm_backend_default=kernels.gmm if kernels else result["impl"])
  return {key: values[key] for key in KEYS}

"""Where a profiled decode step's time goes, per layer, against the bytes it reads.

`layer_costs(result)` reads the rows of a decode-suite result that carry a profile
(`benchmark --suite=decode --profile_dir=...`) and gives, per row:

  kernels_per_layer   GPU kernels per step / layers
  us_per_layer        µs per layer of each kernel launched in at least 3/4 of the
                      layers (per step / layers), largest first
  split               the step's GPU busy time per layer in two parts, each with the
                      time its bytes take at the run's read bandwidth (`floor_us`) and
                      the rest (`excess_us`): `experts`, the grouped matmuls (kernels
                      named `sere_gmm*`) against the distinct experts' weights, and
                      `other`, every other kernel of the step (the LM head and the
                      step's own kernels spread over the layers) against the dense
                      weights and the KV cache; `total` is their sum

and, per batch size with three or more profiled rows, a straight line through each
grouped matmul's µs per call (`us_per_expert_call`) against the row's distinct experts
per layer
(`gmm_fits`: `fixed_us`, `us_per_expert`, the rate `slope_tbs` at which the expert
weights it reads stream, and the largest residual). XLA names a kernel's later copies
`name__1`, `name__2`, ... in the order the program calls them, and the MoE op calls the
gate/up matmul before the down matmul, so the first grouped-matmul name is gate/up
(two thirds of an expert's bytes) and the second is down (one third).

Profiled steps launch kernels one by one (no CUDA graphs): the busy time is a
breakdown of the work, not the step time.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

# Kernel-name prefix of the grouped matmuls (the Triton and the Mosaic GPU kernel).
EXPERT_KERNELS = "sere_gmm"
# The grouped matmuls of a SwiGLU expert in call order, with their share of its bytes.
MATMULS = (("gate_up", 2 / 3), ("down", 1 / 3))
PER_LAYER_SHARE = 0.75  # a kernel launched in at least this share of the layers


def expert_us(profile: Mapping[str, Any]) -> float:
  """GPU µs per step of the grouped matmuls in a `profiling.summarize_trace` profile."""
  return sum(g["total_us"] for g in profile["groups"]
             if g["name"].startswith(EXPERT_KERNELS))


def _part(us: float, floor_us: float) -> dict[str, float]:
  return dict(us=us, floor_us=floor_us, excess_us=us - floor_us)


def _case(row: Mapping[str, Any], layers: int, read_bps: float) -> dict[str, Any]:
  profile = row["profile"]
  per_layer = {k["name"]: k["total_us"] / layers for k in profile["kernels"]
               if k["count"] >= PER_LAYER_SHARE * layers}
  busy = profile["gpu_busy_us"] / layers
  experts = expert_us(profile) / layers
  expert_floor = row["expert_gb"] * 1e9 / read_bps * 1e6 / layers
  other_floor = (row["dense_gb"] + row["kv_gb"]) * 1e9 / read_bps * 1e6 / layers
  return dict(
      batch=row["batch"], policy=row["label"], ms_per_token=row["ms_per_token"],
      distinct=row["distinct_experts"], busy_ms=profile["gpu_busy_us"] / 1e3,
      kernels_per_layer=profile["gpu_events"] / layers,
      us_per_layer=dict(sorted(per_layer.items(), key=lambda kv: -kv[1])),
      us_per_expert_call={k["name"]: k["mean_us"] for k in profile["kernels"]
                          if k["name"].startswith(EXPERT_KERNELS)},
      split=dict(experts=_part(experts, expert_floor),
                 other=_part(busy - experts, other_floor),
                 total=_part(busy, expert_floor + other_floor)))


def _fits(cases: list[dict[str, Any]], expert_bytes: float) -> list[dict[str, Any]]:
  names = sorted({n for c in cases for n in c["us_per_expert_call"]},
                 key=lambda n: (len(n), n))
  if len(names) > len(MATMULS):
    raise ValueError(f"expected at most {len(MATMULS)} grouped-matmul kernels per "
                     f"layer, found {names}")
  out = []
  for batch in sorted({c["batch"] for c in cases}):
    at_batch = [c for c in cases if c["batch"] == batch]
    for name, (matmul, share) in zip(names, MATMULS):
      points = np.array([(c["distinct"], c["us_per_expert_call"][name])
                         for c in at_batch if name in c["us_per_expert_call"]])
      if len(points) < 3:
        continue
      slope, intercept = np.polyfit(points[:, 0], points[:, 1], 1)
      residual = points[:, 1] - (intercept + slope * points[:, 0])
      out.append(dict(batch=batch, matmul=matmul, kernel=name, points=len(points),
                      fixed_us=float(intercept), us_per_expert=float(slope),
                      slope_tbs=(share * expert_bytes / (slope * 1e-6) / 1e12
                                 if slope > 0 else None),
                      max_residual_us=float(np.max(np.abs(residual)))))
  return out


def layer_costs(result: Mapping[str, Any]) -> dict[str, Any]:
  """The per-layer costs (see the module docstring) of a decode-suite `result`'s
  profiled rows. Raises ValueError for anything else than a decode-suite result, or
  when no row has a profile."""
  if result.get("suite") != "decode":
    raise ValueError(f"not a decode-suite result (suite {result.get('suite')!r}); "
                     "pass the JSON that benchmark --suite=decode wrote")
  layers = int(result["hf_config"]["num_hidden_layers"])
  read_bps = result["read_bandwidth_tbs"] * 1e12
  cases = [_case(r, layers, read_bps) for r in result["rows"] if r.get("profile")]
  if not cases:
    raise ValueError("the decode result has no profiled row: run the decode suite "
                     "with --profile_dir")
  # An MoE layer's experts; a dense layer (DeepSeek-V2's first) lists 0.
  expert_bytes = float(max(result["bytes"]["expert_bytes_per_layer"]))
  return dict(layers=layers, read_bandwidth_tbs=result["read_bandwidth_tbs"],
              cases=cases, gmm_fits=_fits(cases, expert_bytes))

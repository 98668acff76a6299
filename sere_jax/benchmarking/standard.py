"""The standard suite (`benchmark.py --suite=standard`): one command per machine, one
device-tagged result that `compare` merges with other machines' into one report.

On whatever device JAX finds, in parts (`Plan.parts`):
  * `bandwidth`: the read and copy bandwidth probe, with its spread over repeats
    (`bandwidth.probe`); every roofline of the run divides by its medians;
  * `kernels/B=<b>`: one MoE layer at Qwen3-30B-A3B shapes (`kernels.KernelSweep`),
    forced 8–128 distinct experts and natural routing under `none`, SERE S=1, S=2,
    with the reference `ragged_dot` beside it (and on a GPU the Mosaic GPU matmul);
  * `decode/<model>/B=<b>`: whole-model decoding (`decode.DecodeBench`) of
    Qwen3-30B-A3B, DeepSeek-V2-Lite and Qwen1.5-MoE under `none`, SERE S=1 and S=2,
    truncation to S=1 and S=2 and an expert pool.
A CPU runs the tiny scale (the same architectures shrunk; `Plan.for_platform`) and the
result says so (`scale`, `scale_note`). After every part the result so far is written to
a partial file; `StandardSuite.run` skips the parts a partial file of the same plan
already holds, so a run cut short resumes where it stopped. Before anything is measured,
`memory.check_fits` stops a plan whose models do not fit the device.

Result (`SUITE_VERSION` changes whenever the plan or this layout does):
  suite, suite_version, scale, scale_note, plan (`Plan.to_json`), env
  (`timing.environment` + `kernel_backends` + `memory_fraction`), memory (bytes limit and
  the bytes each decode part needs), bandwidth (`bandwidth.probe`), kernels
  (shape, impl, layers, expert_bytes, rows of `KernelSweep.run_batch`), decode
  (per model: `DecodeBench.header()` and rows of `DecodeBench.run_batch`), parts
  (measured part -> seconds), runs (one entry per process that measured parts),
  command, seconds; `partial: true` until every part is measured.
"""

from __future__ import annotations

import dataclasses
import gc
import re
import time
from typing import Any, Callable, Sequence

from sere_jax import policy_spec
from sere_jax.benchmarking import bandwidth
from sere_jax.benchmarking import decode as decode_lib
from sere_jax.benchmarking import decode_models
from sere_jax.benchmarking import kernels as kernels_lib
from sere_jax.benchmarking import memory
from sere_jax.kernels import moe_ffn as moe_ffn_lib
from sere_jax.models import layers

SUITE = "standard"
SUITE_VERSION = 3
MODELS = ("qwen3_30b_a3b", "deepseek_v2_lite", "qwen15_moe_a27b")
BATCHES = (1, 16, 64)
POLICIES = ("none", "sere:1:0", "sere:2:0", "topk_truncate:1", "topk_truncate:2",
            "expert_pool:16")
DISTINCT = kernels_lib.DEFAULT_DISTINCT
KERNEL_PEERS = ("ragged_dot",)
# On a GPU the MoE-layer sweep also times the Mosaic GPU grouped matmul beside the
# Triton one (`impl="mosaic_gpu"`), the comparison that decides `auto`'s backend.
GPU_KERNEL_PEERS = ("ragged_dot", "mosaic_gpu")
TINY_NOTE = ("tiny scale: the same architectures shrunk (sere_jax.benchmarking."
             "decode_models.TINY, kernels.SCALES['tiny']) because this device is a CPU; "
             "its times show the suite runs, they are not comparable with full-scale "
             "runs")


class PlanMismatchError(ValueError):
  """A partial result was measured with another plan, suite version or device."""


@dataclasses.dataclass(frozen=True)
class Plan:
  """What the suite measures. `for_platform` gives the defaults of a device."""

  scale: str = "full"
  models: tuple[str, ...] = MODELS
  batches: tuple[int, ...] = BATCHES
  policies: tuple[str, ...] = POLICIES
  distinct: tuple[int, ...] = DISTINCT
  prompt_len: int = 128
  new_tokens: int = 32
  repeats: int = 2
  kernel_layers: int = 8
  kernel_peers: tuple[str, ...] = KERNEL_PEERS
  min_seconds: float = 0.03
  impl: str = "auto"
  attention_impl: str = "auto"
  seed: int = 0

  def __post_init__(self):
    if self.scale not in ("full", "tiny"):
      raise ValueError(f"scale must be 'full' or 'tiny', got {self.scale!r}")
    for model in self.models:
      decode_models.hf_config(model, self.scale)  # names an unknown model
    # Canonical spec texts (names a bad spec), so that `sere:1` and `sere:1:0` agree.
    object.__setattr__(self, "policies",
                       tuple(p.text for p in policy_spec.parse_list(self.policies)))
    if not self.batches or min(self.batches) < 1:
      raise ValueError(f"batch sizes must be >= 1, got {self.batches}")
    if self.new_tokens < 2 or self.prompt_len < 1 or self.repeats < 1:
      raise ValueError("need prompt_len >= 1, new_tokens >= 2 and repeats >= 1")
    moe_ffn_lib.resolve_impl(self.impl)  # names an unknown implementation

  @classmethod
  def for_platform(cls, platform: str, **overrides: Any) -> Plan:
    """The plan of a `platform` (`jax.default_backend()`): a CPU gets the tiny scale
    with short prompts and few steps, a GPU the Mosaic GPU matmul among the kernel
    peers; `overrides` (None values ignored) replace fields."""
    defaults: dict[str, Any] = {}
    if platform == "cpu":
      defaults = dict(scale="tiny", prompt_len=16, new_tokens=4, repeats=1,
                      kernel_layers=2, min_seconds=0.001)
    elif platform == "gpu":
      defaults = dict(kernel_peers=GPU_KERNEL_PEERS)
    defaults.update({k: v for k, v in overrides.items() if v is not None})
    for key in ("models", "batches", "policies", "distinct", "kernel_peers"):
      if key in defaults:
        defaults[key] = tuple(defaults[key])
    return cls(**defaults)

  @property
  def bandwidth_bytes(self) -> int:
    """The bandwidth probe's buffer: 4 GiB at full scale, 64 MiB at tiny."""
    return kernels_lib.SCALES[self.scale]["bandwidth_bytes"]

  @property
  def kernel_shape(self) -> dict[str, int]:
    return kernels_lib.SCALES[self.scale]

  def parts(self) -> list[str]:
    """The suite's parts, in the order they run."""
    return (["bandwidth"] + [f"kernels/B={b}" for b in self.batches]
            + [f"decode/{m}/B={b}" for m in self.models for b in self.batches])

  def to_json(self) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v
            for k, v in dataclasses.asdict(self).items()}


def device_slug(env: dict[str, Any]) -> str:
  """The device part of a result's file name: `cpu`, `nvidia_h100_80gb_hbm3`, ..."""
  return re.sub(r"[^a-z0-9]+", "_", str(env["device_kind"]).lower()).strip("_") or "device"


def kernel_backends(impl: str, attention_impl: str, models: Sequence[str]) -> dict[str, Any]:
  """Which implementation each kernel op runs with the MoE op's `impl` (resolved on
  this device): the MoE op, its schedule and grouped matmul, the router, and per model
  the decode-step attention kernels (`attention_impl`)."""
  resolved = moe_ffn_lib.resolve_impl(impl)
  kernels = moe_ffn_lib.BACKENDS.get(resolved)
  return dict(
      moe_ffn=resolved, schedule=kernels.schedule if kernels else "xla",
      gmm=(kernels.gmm if kernels else resolved if resolved == "ragged_dot"
           else "none (dense einsum)"),
      router=(kernels.router if kernels else None) or "xla",
      decode_attention={m: layers.resolve_attention_impl(attention_impl) for m in models})


def new_result(plan: Plan, env: dict[str, Any], command: str) -> dict[str, Any]:
  """An empty result of `plan` on the device of `env`."""
  result = dict(suite=SUITE, suite_version=SUITE_VERSION, scale=plan.scale,
                plan=plan.to_json(), env=env, command=command, parts={}, runs=[],
                seconds=0.0)
  if plan.scale == "tiny":
    result["scale_note"] = TINY_NOTE
  return result


def check_resumable(partial: dict[str, Any], plan: Plan, env: dict[str, Any],
                    path: str) -> None:
  """Raises PlanMismatchError, naming `path` and what differs, unless the partial
  result `partial` is of this suite version, `plan` and device."""
  if partial.get("suite") != SUITE or partial.get("suite_version") != SUITE_VERSION:
    raise PlanMismatchError(
        f"{path} is a {partial.get('suite')!r} result of suite version "
        f"{partial.get('suite_version')}, not a {SUITE!r} one of version {SUITE_VERSION}")
  kind = (partial.get("env") or {}).get("device_kind")
  if kind != env["device_kind"]:
    raise PlanMismatchError(f"{path} was measured on {kind!r}, this device is "
                            f"{env['device_kind']!r}")
  old = partial.get("plan") or {}
  new = plan.to_json()
  differ = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
  if differ:
    raise PlanMismatchError(
        f"{path} was measured with another plan (" + ", ".join(
            f"{k}: {old.get(k)!r} there, {new.get(k)!r} now" for k in differ) + ")")


class StandardSuite:
  """Runs the parts of `plan` that `result` does not hold yet.

  `save(result)` is called after every part (with `partial: True`) and `progress(done,
  total, part)` before each and at the end. Parts are measured by the `measure_*`
  methods, which a test may replace."""

  def __init__(self, plan: Plan, result: dict[str, Any], *,
               save: Callable[[dict[str, Any]], None],
               progress: Callable[[int, int, str], None] | None = None):
    self.plan, self.result, self.save = plan, result, save
    self.progress = progress or (lambda done, total, part: None)
    self._sweep: kernels_lib.KernelSweep | None = None
    self._bench: decode_lib.DecodeBench | None = None

  def todo(self) -> list[str]:
    """The parts not measured yet, in order."""
    return [p for p in self.plan.parts() if p not in self.result["parts"]]

  def check_memory(self) -> dict[str, Any]:
    """The bytes every decode part left needs against the device's limit
    (`memory.check_fits`; raises `memory.DoesNotFitError`)."""
    left = {}
    for part in self.todo():
      if part.startswith("decode/"):
        _, model, b = part.split("/")
        left.setdefault(model, []).append(int(b[2:]))
    needs = {}
    for model, batches in left.items():
      needs.update(memory.decode_needs(model, self.plan.scale, batches,
                                       self.plan.prompt_len, self.plan.new_tokens))
    limit = memory.device_bytes_limit()
    memory.check_fits(needs, limit)
    return dict(bytes_limit=limit,
                needs={label: need["total_bytes"] for label, need in needs.items()})

  def run(self) -> dict[str, Any]:
    """Measures every part left and returns the complete result (no `partial`)."""
    parts = self.plan.parts()
    done = len(parts) - len(self.todo())
    run = dict(env={k: self.result["env"].get(k) for k in ("host", "git_commit")},
               started=time.strftime("%Y-%m-%d %H:%M:%S"), parts=[])
    self.result["runs"].append(run)
    for part in self.todo():
      self.progress(done, len(parts), part)
      tic = time.perf_counter()
      if part == "bandwidth":
        self.result["bandwidth"] = self.measure_bandwidth()
      elif part.startswith("kernels/"):
        self._add_kernels(self.measure_kernels(int(part.split("=")[1])))
      else:
        _, model, b = part.split("/")
        self._add_decode(model, *self.measure_decode(model, int(b[2:])))
      seconds = time.perf_counter() - tic
      self.result["parts"][part] = dict(seconds=seconds)
      self.result["seconds"] = sum(p["seconds"] for p in self.result["parts"].values())
      run["parts"].append(part)
      done += 1
      self.save(dict(self.result, partial=True))
    self._sweep = self._bench = None
    self.progress(done, len(parts), "done")
    self.result.pop("partial", None)
    return self.result

  # ------------------------------------------------------------------ parts

  def _bandwidth(self, key: str) -> float:
    """The probe's median bandwidth in bytes/s (measured first if it is not yet)."""
    if "bandwidth" not in self.result:
      self.result["bandwidth"] = self.measure_bandwidth()
    return self.result["bandwidth"][key]["tbs"] * 1e12

  def measure_bandwidth(self) -> dict[str, Any]:
    return bandwidth.probe(self.plan.bandwidth_bytes)

  def measure_kernels(self, batch: int) -> list[dict[str, Any]]:
    """The rows of one batch size of the MoE-layer sweep."""
    if self._sweep is None:
      self._sweep = kernels_lib.KernelSweep(
          self.plan.kernel_shape, layers=self.plan.kernel_layers, impl=self.plan.impl,
          min_seconds=self.plan.min_seconds, seed=self.plan.seed)
    rows, _ = self._sweep.run_batch(batch, distinct=self.plan.distinct,
                                    peers=self.plan.kernel_peers,
                                    read_bandwidth=self._bandwidth("read"))
    return rows

  def _add_kernels(self, rows: list[dict[str, Any]]) -> None:
    shape = self.plan.kernel_shape
    kernels = self.result.setdefault("kernels", dict(
        shape={k: v for k, v in shape.items() if k != "bandwidth_bytes"},
        impl=moe_ffn_lib.resolve_impl(self.plan.impl), layers=self.plan.kernel_layers,
        expert_bytes=3 * shape["dim"] * shape["ffn"] * 2, rows=[]))
    kernels["rows"] += rows

  def measure_decode(self, model: str, batch: int
                     ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """`(model header, rows)` of one model at one batch size; the model is built once
    for all its batch sizes (the previous model is dropped first)."""
    self._sweep = None  # the kernel sweep's weights leave the device
    if self._bench is None or self._bench.model != model:
      self._bench = None
      gc.collect()
      self._bench = decode_lib.DecodeBench(
          model=model, scale=self.plan.scale, impl=self.plan.impl,
          attention_impl=self.plan.attention_impl, seed=self.plan.seed)
    rows = self._bench.run_batch(
        batch, policies=policy_spec.parse_list(self.plan.policies),
        prompt_len=self.plan.prompt_len, new_tokens=self.plan.new_tokens,
        repeats=self.plan.repeats, copy_bandwidth=self._bandwidth("copy"),
        read_bandwidth=self._bandwidth("read"))
    return self._bench.header(), rows

  def _add_decode(self, model: str, header: dict[str, Any],
                  rows: list[dict[str, Any]]) -> None:
    entry = self.result.setdefault("decode", {}).setdefault(model, dict(header, rows=[]))
    entry["rows"] += rows

"""The device's memory bandwidth, the denominator of every roofline.

    result = probe()                    # read and copy bandwidth in this process
    result["read"]["tbs"]               # TB/s: the median of the timed calls
    checked = across_processes(5)       # the same probe in 5 separate processes

`probe` times looped passes over one large buffer: each timed call runs `iterations`
passes inside a `fori_loop`, as many as make the call last `min_call_s`, so launch and
host costs fade; before timing, calls run for `warmup_s` so the clocks settle. A read
pass reduces the buffer (three layouts are tried; the fastest by median is kept, the
tightest roofline), and each pass depends on the previous one's result so none is
hoisted out of the loop. A copy pass rewrites the buffer in place (bytes read plus
written). Each form reports the median of `repeats` calls (`tbs`), the best and worst,
and their spread. `spec_peak_tbs` is the datasheet figure of known accelerators, the
second denominator of a roofline ratio. `across_processes` repeats the probe in child
processes, one after another, and reports the spread of their medians.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

# Datasheet HBM bandwidth in TB/s, by a substring of `device_kind` (first match wins).
SPEC_PEAK_TBS = (("H200", 4.8), ("H100 NVL", 3.9), ("H100 PCIe", 2.0), ("H100", 3.35))
# How far the medians of separate processes may spread (max - min over their median)
# for the probe to count as steady: +-3 %.
STEADY_SPREAD = 0.06
_COLS = 8192
_LAYOUTS = {
    "rows": lambda x: jnp.sum(x, axis=1),
    "cols": lambda x: jnp.sum(x, axis=0),
    "tiles": lambda x: jnp.max(x.reshape(-1, 128, x.shape[1]), axis=1),
}


def spec_peak_tbs(device_kind: str) -> float | None:
  """The datasheet memory bandwidth (TB/s) of `device_kind`, or None if unknown."""
  for name, tbs in SPEC_PEAK_TBS:
    if name in device_kind:
      return tbs
  return None


def default_bytes() -> int:
  """The probe's buffer: 4 GiB on an accelerator, 64 MiB on a CPU."""
  return (64 << 20) if jax.default_backend() == "cpu" else (4 << 30)


def _read_loop(layout: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
  reduce = _LAYOUTS[layout]

  def run(buf, iterations):
    def one_pass(_, carry):
      # `buf + carry` ties the pass to the previous one; XLA fuses the add into the
      # reduction, so a pass reads the buffer once.
      return jnp.sum(reduce(buf + carry)) * 1e-30
    return jax.lax.fori_loop(0, iterations, one_pass, jnp.zeros((), buf.dtype))
  return jax.jit(run)


def _copy_loop(buf, iterations):
  return jax.lax.fori_loop(0, iterations, lambda _, x: x * 1.0001, buf)


# The buffer is donated and the result fed back, so no pass copies it out of the loop.
_COPY = jax.jit(_copy_loop, donate_argnums=0)


def _stats(rates: list[float]) -> dict[str, float]:
  rates = sorted(rates)
  median = statistics.median(rates)
  return dict(tbs=median, best_tbs=rates[-1], min_tbs=rates[0],
              spread=(rates[-1] - rates[0]) / median)


def _measure(call: Callable[[int], Any], pass_bytes: int, repeats: int,
             min_call_s: float, warmup_s: float) -> dict[str, Any]:
  """Rates (TB/s) of `repeats` timed calls of `call(iterations)`, each `iterations`
  passes of `pass_bytes`, after sizing the calls and warming up."""
  def timed(iterations):
    start = time.perf_counter()
    jax.block_until_ready(call(iterations))
    return time.perf_counter() - start

  timed(1)  # compiles
  iterations = max(1, math.ceil(min_call_s / max(timed(1), 1e-9)))
  end = time.perf_counter() + warmup_s
  while time.perf_counter() < end:
    timed(iterations)
  rates = [iterations * pass_bytes / timed(iterations) / 1e12 for _ in range(repeats)]
  return dict(_stats(rates), iterations=iterations)


def probe(num_bytes: int | None = None, repeats: int = 10, *, min_call_s: float = 0.02,
          warmup_s: float = 1.0) -> dict[str, Any]:
  """Read and copy bandwidth of the default device (module docstring): `{"read": {...,
  "layout"}, "copy": {...}, "bytes", "repeats", "min_call_s", "warmup_s",
  "device_kind", "spec_peak_tbs"}`, each form `{"tbs" (median), "best_tbs",
  "min_tbs", "spread", "iterations"}`. `num_bytes` defaults to `default_bytes()`."""
  if num_bytes is None:
    num_bytes = default_bytes()
  if num_bytes < 128 * 4 * _COLS or repeats < 1:
    raise ValueError(f"need num_bytes >= {128 * 4 * _COLS} and repeats >= 1, got "
                     f"{num_bytes} and {repeats}")
  rows = num_bytes // (4 * _COLS) // 128 * 128
  buf = jax.random.uniform(jax.random.PRNGKey(1), (rows, _COLS), jnp.float32)
  read = None
  for layout in _LAYOUTS:
    run = _read_loop(layout)
    stats = _measure(lambda n, run=run: run(buf, n), buf.nbytes, repeats, min_call_s,
                     warmup_s / len(_LAYOUTS))
    if read is None or stats["tbs"] > read["tbs"]:
      read = dict(stats, layout=layout)
  copy_buf = [buf[: rows // 2]]
  del buf

  def copy(iterations):
    copy_buf[0] = _COPY(copy_buf[0], iterations)
    return copy_buf[0]

  copy_stats = _measure(copy, 2 * copy_buf[0].nbytes, repeats, min_call_s, warmup_s)
  kind = jax.devices()[0].device_kind
  return dict(read=read, copy=copy_stats, bytes=rows * _COLS * 4, repeats=repeats,
              min_call_s=min_call_s, warmup_s=warmup_s, device_kind=kind,
              spec_peak_tbs=spec_peak_tbs(kind))


_CHILD = ("import json, sys\n"
          "from sere_jax.benchmarking import bandwidth\n"
          "n = int(sys.argv[1]) or None\n"
          "print('PROBE ' + json.dumps(bandwidth.probe(n, int(sys.argv[2]))))\n")


def across_processes(processes: int = 5, num_bytes: int | None = None, repeats: int = 10,
                     *, python: str = sys.executable,
                     progress: Callable[[int, int], None] = lambda done, total: None
                     ) -> dict[str, Any]:
  """`probe` in `processes` child processes, one after another (each its own JAX client,
  without preallocating the device's memory): `{"processes": [each probe], "read": ...,
  "copy": ..., "steady"}`, each form `{"tbs" (median of the processes' medians),
  "best_tbs", "min_tbs", "spread" (max - min over that median), "medians"}`; `steady`
  when both spreads are at most `STEADY_SPREAD`. A child that fails raises
  RuntimeError with its output."""
  if processes < 2:
    raise ValueError(f"need at least 2 processes to compare, got {processes}")
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
  runs = []
  for i in range(processes):
    proc = subprocess.run([python, "-c", _CHILD, str(num_bytes or 0), str(repeats)],
                          env=env, capture_output=True, text=True, check=False)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("PROBE ")]
    if proc.returncode != 0 or not lines:
      raise RuntimeError(f"bandwidth probe process {i + 1} failed (exit "
                         f"{proc.returncode}):\n{proc.stderr[-2000:]}")
    runs.append(json.loads(lines[-1][len("PROBE "):]))
    progress(i + 1, processes)
  result: dict[str, Any] = dict(processes=runs)
  for form in ("read", "copy"):
    medians = [r[form]["tbs"] for r in runs]
    result[form] = dict(_stats(medians), medians=medians)
  result["steady"] = all(result[f]["spread"] <= STEADY_SPREAD for f in ("read", "copy"))
  result["spec_peak_tbs"] = runs[0]["spec_peak_tbs"]
  result["device_kind"] = runs[0]["device_kind"]
  return result


def markdown(result: dict[str, Any], command: str) -> str:
  """`across_processes`'s result as a short report."""
  peak = result["spec_peak_tbs"]
  lines = [f"# Bandwidth probe on {result['device_kind']}", "", "```", command, "```", "",
           f"{len(result['processes'])} separate processes; each probe's median of "
           f"{result['processes'][0]['repeats']} timed calls over "
           f"{result['processes'][0]['bytes'] / 2**20:.0f} MiB. Steady (medians within "
           f"±{STEADY_SPREAD * 50:.0f} %): {'yes' if result['steady'] else 'no'}.", "",
           "| form | median TB/s | spread of medians | per process | of spec peak |",
           "|---|---|---|---|---|"]
  for form in ("read", "copy"):
    r = result[form]
    share = f"{r['tbs'] / peak:.2f} of {peak} TB/s" if peak else "unknown"
    lines.append(f"| {form} | {r['tbs']:.3f} | ±{r['spread'] * 50:.1f} % | "
                 + ", ".join(f"{m:.3f}" for m in r["medians"]) + f" | {share} |")
  return "\n".join(lines) + "\n"

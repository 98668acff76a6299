"""The kernels benchmark suite at tiny scale on this machine (interpret-mode kernels)."""

import json
import os
import subprocess
import sys

import jax
import pytest

from sere_jax import benchmarking
from sere_jax.benchmarking import gmm_sweep
from sere_jax.kernels.gmm import tiles


def _run_benchmark(tmp_path, name: str, *flags_: str) -> dict:
  """Runs the benchmark script at tiny scale on this machine; its JSON result."""
  out = tmp_path / name
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
  proc = subprocess.run(
      [sys.executable, "-m", "sere_jax.scripts.benchmark", "--scale=tiny", "--batch=4",
       "--layers=2", "--min_seconds=0.001", f"--out={out}", *flags_],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert os.path.getsize(f"{out}.md") > 0
  with open(f"{out}.json") as fh:
    return json.load(fh)


def test_kernels_suite_tiny(tmp_path):
  result = _run_benchmark(tmp_path, "kernels_cpu", "--suite=kernels", "--distinct=8",
                          "--peers=ragged_dot")
  assert result["suite"] == "kernels" and result["impl"] == "interpret"
  assert "partial" not in result and result["read_bandwidth_tbs"] > 0
  rows = result["rows"]
  # One forced case (8 distinct experts of 16, top-4) and the natural policies.
  assert [(r["mode"], r["policy"], r["select_top_k"]) for r in rows] == [
      ("forced", "none", 0), ("natural", "none", 0), ("natural", "sere", 1),
      ("natural", "sere", 2)]
  assert rows[0]["distinct"] == 8
  assert rows[2]["distinct"] <= 4  # S = 1: at most one expert per token
  for r in rows:
    for key in ("interpret_us", "ragged_dot_us", "routing_schedule_us", "roofline_us",
                "ours_over_roofline"):
      assert isinstance(r[key], float), (key, r)
    assert r["roofline_us"] > 0 and r["interpret_us"] > 0


def test_gmm_sweep_tiny(tmp_path):
  """The tile sweep, interpreted: one row per (distinct count, projection, tiling)."""
  result = _run_benchmark(tmp_path, "gmm_cpu", "--suite=gmm_sweep", "--distinct=4,16",
                          '--gmm_variants=[{}, {"row_tiles": [16, 32], "k_splits": 1}]')
  assert result["suite"] == "gmm_sweep" and result["impl"] == "interpret"
  rows = result["rows"]
  assert [(r["distinct"], r["matmul"], r["row_tiles"], r["k_splits"]) for r in rows] == [
      (n, m, tiles, splits) for n in (4, 16) for m in ("gate_up", "down")
      for tiles, splits in (([16, 32, 64], 2), ([16, 32], 1))]
  for r in rows:
    assert r["us"] > 0 and r["roofline_us"] > 0 and r["ratio"] > 0, r


def test_gmm_sweep_mosaic_gpu_interpret(monkeypatch):
  """The Mosaic GPU kernel's sweep, interpreted: its own table's tilings; a tiling the
  kernel cannot take (a contraction step that does not divide D) is a row with the
  error, not a time, and the sweep goes on."""
  monkeypatch.setitem(gmm_sweep.SCALES, "mosaic_tiny", dict(
      dim=64, ffn=64, experts=8, top_k=2, bandwidth_bytes=64 << 20))
  result = gmm_sweep.gmm_sweep(
      {}, impl="mosaic_gpu_interpret", scale="mosaic_tiny", batches=[4], distinct=[4],
      matmuls=["down"], variants=[{}, {"block_k": 48}], layers=2, min_seconds=0.001)
  good, bad = result["rows"]
  assert good == dict(good, **tiles.MOSAIC_GPU_TILES) and good["us"] > 0
  assert bad["block_k"] == 48 and "us" not in bad
  assert "multiple of block_k=48" in bad["error"], bad


def test_gmm_sweep_takes_only_the_grouped_matmul_kernels_that_run_here():
  with pytest.raises(ValueError, match="Triton or Mosaic GPU grouped matmul.*'xla_dense'"):
    gmm_sweep.kernel_table("xla_dense")
  if jax.default_backend() != "gpu":
    for impl in ("triton", "mosaic_gpu"):
      with pytest.raises(ValueError, match=f"{impl}' runs only on gpu devices"):
        gmm_sweep.gmm_sweep({}, impl=impl, scale="tiny", batches=[4], distinct=[4],
                            matmuls=["down"], variants=[{}], layers=1, min_seconds=0.001)


@pytest.mark.parametrize("kernel, table", [("triton", tiles.TILES),
                                           ("mosaic_gpu", tiles.MOSAIC_GPU_TILES)])
def test_tile_overrides(kernel, table):
  """`--gmm_variants`: JSON overrides of a kernel's tile table (lists become the tuples
  jit needs), its built-in list when empty, and an error naming the problem otherwise."""
  defaults = tiles.SWEPT[kernel][1]
  assert tiles.parse_overrides("", kernel) == [dict(v) for v in defaults]
  assert all(set(v) <= set(table) for v in defaults)
  assert tiles.parse_overrides('[{}, {"block_n": 64}, {"k_splits": 4}]', kernel) == [
      {}, {"block_n": 64}, {"k_splits": 4}]
  for bad, message in (("[{", "not JSON"), ('{"k_splits": 4}', "list of objects"),
                       ('[{"block_m": 16}]',
                        rf"unknown {kernel} tile options \['block_m'\]")):
    with pytest.raises(ValueError, match=message):
      tiles.parse_overrides(bad, kernel)
  assert tiles.parse_overrides('[{"row_tiles": [16, 32]}]') == [{"row_tiles": (16, 32)}]


def test_bad_tile_overrides_are_a_usage_error(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "sere_jax.scripts.benchmark", "--suite=gmm_sweep",
       "--scale=tiny", '--gmm_variants=[{"block_m": 16}]', f"--out={tmp_path / 'x'}"],
      cwd=tmp_path, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
      text=True, timeout=300, check=False)
  assert proc.returncode != 0
  assert "--gmm_variants: unknown triton tile options ['block_m']" in proc.stderr, proc.stderr


def test_layer_chain_times_a_step_and_compiles_with_the_options_given():
  x = jax.numpy.ones((2, 4))
  layers = [(jax.numpy.eye(4),)] * 2
  chain = benchmarking.LayerChain(lambda x, w: x @ w)
  assert chain.seconds_per_layer(x, layers, min_seconds=1e-3, repeats=1) > 0
  unknown = benchmarking.LayerChain(lambda x, w: x @ w, {"no_such_xla_option": True})
  with pytest.raises(jax.errors.JaxRuntimeError, match="no_such_xla_option"):
    unknown.seconds_per_layer(x, layers, min_seconds=1e-3, repeats=1)
  assert chain.layer_args is None  # nothing carried: the chain keeps no arguments


def test_layer_chain_carries_updated_layer_arguments():
  """A step that counts its calls in its layer argument (as a decode step writes its
  cache): every call of every layer is counted, in the arguments the chain hands back."""
  x = jax.numpy.ones((2, 4))
  counts = [(jax.numpy.zeros((), jax.numpy.int32),) for _ in range(3)]
  chain = benchmarking.LayerChain(lambda x, n: (x, (n + 1,)), carry_args=True)
  assert chain.seconds_per_layer(x, counts, min_seconds=1e-3, repeats=2) > 0
  calls = [int(n) for (n,) in chain.layer_args]
  # Warm-up, three single rounds, then two timed calls of the same number of rounds.
  assert len(set(calls)) == 1 and calls[0] >= 6 and (calls[0] - 4) % 2 == 0, calls

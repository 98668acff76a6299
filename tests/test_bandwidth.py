"""The bandwidth probe: its looped passes, its statistics, the datasheet table and the
check across separate processes, on this machine's CPU at a small buffer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sere_jax.benchmarking import bandwidth

SMALL = 8 << 20


def test_probe_reports_both_forms_with_their_spread():
  result = bandwidth.probe(SMALL, repeats=3, warmup_s=0.05)
  assert result["bytes"] == SMALL and result["repeats"] == 3
  assert result["read"]["layout"] in ("rows", "cols", "tiles")
  for form in ("read", "copy"):
    stats = result[form]
    assert 0 < stats["min_tbs"] <= stats["tbs"] <= stats["best_tbs"]
    assert stats["spread"] == pytest.approx(
        (stats["best_tbs"] - stats["min_tbs"]) / stats["tbs"])
    assert stats["iterations"] >= 1
  assert result["device_kind"] == jax.devices()[0].device_kind
  assert result["spec_peak_tbs"] is None


@pytest.mark.parametrize("layout", ["rows", "cols", "tiles"])
def test_read_loop_reads_the_whole_buffer_every_pass(layout):
  """Each pass reduces `buf + carry`: the result matches a plain loop of that."""
  buf = jax.random.uniform(jax.random.PRNGKey(0), (256, 8192), jnp.float32)
  got = bandwidth._read_loop(layout)(buf, 3)
  carry = np.float32(0)
  host = np.asarray(buf)
  reduce = {"rows": lambda x: x.sum(axis=1), "cols": lambda x: x.sum(axis=0),
            "tiles": lambda x: x.reshape(-1, 128, x.shape[1]).max(axis=1)}[layout]
  for _ in range(3):
    carry = np.float32(reduce(host + carry).sum() * 1e-30)
  np.testing.assert_allclose(float(got), float(carry), rtol=1e-4)


def test_copy_loop_rewrites_the_buffer_each_pass():
  buf = jnp.ones((1024,), jnp.float32)
  out = bandwidth._copy_loop(buf, 5)
  np.testing.assert_allclose(np.asarray(out), 1.0001 ** 5, rtol=1e-6)


def test_spec_peaks_of_known_devices():
  assert bandwidth.spec_peak_tbs("NVIDIA H200") == 4.8
  assert bandwidth.spec_peak_tbs("NVIDIA H100 80GB HBM3") == 3.35
  assert bandwidth.spec_peak_tbs("NVIDIA H100 NVL") == 3.9
  assert bandwidth.spec_peak_tbs("NVIDIA H100 PCIe") == 2.0
  assert bandwidth.spec_peak_tbs("cpu") is None


def test_bad_sizes_are_refused():
  with pytest.raises(ValueError, match="num_bytes >= 4194304"):
    bandwidth.probe(1 << 20)
  with pytest.raises(ValueError, match="repeats >= 1"):
    bandwidth.probe(SMALL, repeats=0)
  with pytest.raises(ValueError, match="at least 2 processes"):
    bandwidth.across_processes(1)


def test_across_processes_compares_the_medians_of_separate_runs():
  seen = []
  result = bandwidth.across_processes(2, SMALL, repeats=3,
                                      progress=lambda done, total: seen.append(done))
  assert seen == [1, 2] and len(result["processes"]) == 2
  for form in ("read", "copy"):
    medians = [p[form]["tbs"] for p in result["processes"]]
    assert result[form]["medians"] == medians
    assert result[form]["tbs"] == pytest.approx(np.median(medians))
    assert result[form]["spread"] == pytest.approx(
        (max(medians) - min(medians)) / np.median(medians))
  assert result["steady"] == all(result[f]["spread"] <= bandwidth.STEADY_SPREAD
                                 for f in ("read", "copy"))
  text = bandwidth.markdown(result, "cmd")
  assert "| read |" in text and "| copy |" in text and "unknown" in text


def test_a_failing_child_is_reported():
  with pytest.raises(RuntimeError, match="process 1 failed"):
    bandwidth.across_processes(2, SMALL, python="/bin/false")

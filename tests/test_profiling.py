"""`sere_jax.profiling`: kernel groups and per-step sums of a Perfetto trace."""

from __future__ import annotations

import gzip
import json
import os

import pytest

from sere_jax import profiling


def test_kernel_group_strips_numeric_suffixes():
  assert profiling.kernel_group("sort_141_1") == "sort"
  assert profiling.kernel_group("gemm_fusion_dot_914") == "gemm_fusion_dot"
  assert profiling.kernel_group("sere_gmm") == "sere_gmm"
  assert profiling.kernel_group("fusion_2v") == "fusion_2v"


def _write_trace(directory, events):
  path = os.path.join(directory, "plugins", "profile", "run")
  os.makedirs(path)
  with gzip.open(os.path.join(path, "host.trace.json.gz"), "wt") as fh:
    json.dump({"traceEvents": events}, fh)


def test_summarize_trace_sums_device_kernels_per_step(tmp_path):
  meta = [dict(ph="M", name="process_name", pid=1, args=dict(name="/device:GPU:0")),
          dict(ph="M", name="process_name", pid=2, args=dict(name="/host:CPU"))]
  kernels = [dict(ph="X", pid=1, name="sort_1_1", ts=0, dur=3),
             dict(ph="X", pid=1, name="sort_2_1", ts=10, dur=5),
             dict(ph="X", pid=1, name="sere_gmm", ts=20, dur=40),
             dict(ph="X", pid=2, name="host_work", ts=0, dur=1000),  # not a device
             dict(ph="i", pid=1, name="marker", ts=5)]               # not complete
  _write_trace(str(tmp_path), meta + kernels)
  summary = profiling.summarize_trace(str(tmp_path), steps=2)
  assert summary["gpu_events"] == 1.5
  assert summary["gpu_busy_us"] == 24.0
  assert summary["gpu_span_us"] == 30.0
  assert summary["groups"][0] == dict(name="sere_gmm", count=0.5, total_us=20.0,
                                      mean_us=40.0)
  assert summary["groups"][1] == dict(name="sort", count=1.0, total_us=4.0, mean_us=4.0)
  assert [k["name"] for k in summary["kernels"]] == ["sere_gmm", "sort_2_1", "sort_1_1"]


def test_summarize_trace_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="trace.json.gz"):
    profiling.summarize_trace(str(tmp_path))
  with pytest.raises(ValueError, match="steps"):
    profiling.summarize_trace(str(tmp_path), steps=0)

"""The decode benchmark at tiny scale on this machine, then the report over its JSON."""

import json
import os
import subprocess
import sys

import pytest

from sere_jax.benchmarking import layer_costs
from sere_jax.benchmarking import report
from sere_jax.benchmarking import targets

REQUIRED_ENV = ("device_kind", "backend", "jax", "jaxlib", "flax", "python")
REQUIRED_ROW = ("batch", "ms_per_token", "tokens_per_s", "distinct_experts",
                "roofline_ms", "measured_over_roofline", "speedup_over_none")


def _run(args, cwd):
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
  proc = subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc


def test_decode_suite_targets_and_report(tmp_path):
  """One tiny decode run with `--targets_out` (the bandwidth probe in 2 separate
  processes first; kernel counts are 0 here: a CPU trace has no GPU events), then the
  report over its JSON."""
  out, summary = tmp_path / "decode_cpu", tmp_path / "targets.json"
  _run(["sere_jax.scripts.benchmark", "--suite=decode", "--model=qwen3_30b_a3b",
        "--scale=tiny", "--prompt_len=8", "--new_tokens=4", "--batch=1,16,64",
        "--policies=none,sere:2", "--repeats=1", "--steps_per_check=3",
        f"--peer_python={sys.executable}", "--attention_impl=interpret",
        f"--profile_dir={tmp_path / 'profile'}", "--processes=2",
        f"--bandwidth_bytes={4 << 20}", f"--out={out}", f"--targets_out={summary}"],
       tmp_path)
  with open(f"{out}.json") as fh:
    result = json.load(fh)
  assert result["suite"] == "decode" and result["scale"] == "tiny"
  assert result["attention_impl"] == "interpret"  # the fused decode-attention kernel
  assert "partial" not in result
  for key in REQUIRED_ENV:
    assert result["env"][key], key
  assert result["model_config"]["architecture"] == "qwen3_moe"
  assert result["hf_config"]["model_type"] == "qwen3_moe"
  assert result["protocol"]["prompt_len"] == 8 and result["protocol"]["new_tokens"] == 4
  assert result["protocol"]["steps_per_check"] == 3  # the 3 steps between two checks
  assert result["protocol"]["min_decode_rows"] == 2  # B = 1 decodes beside a padding row
  assert result["copy_bandwidth_tbs"] > 0
  # No torch in this environment (or no CUDA): the peer is skipped with its reason.
  assert result["peer"].get("skipped") or result["peer"].get("env")
  rows = result["rows"]
  assert [(r["batch"], r["label"]) for r in rows] == [  # canonical spec texts
      (b, p) for b in (1, 16, 64) for p in ("none", "sere:2:0")]
  top_k = result["model_config"]["top_k"]
  for r in rows:
    for key in REQUIRED_ROW:
      assert isinstance(r[key], (int, float)), (key, r)
    assert r["ms_per_token"] > 0 and r["roofline_ms"] > 0
    assert r["measured_over_roofline"] > 0
    assert r["steps_timed"] == 3
    assert len(r["distinct_per_layer"]) == result["model_config"]["num_layers"]
    # SERE at ρ = 0 keeps S primaries per token and moves every other expert onto an
    # active one, so at most B * S distinct experts.
    per_token = 2 if r["label"] == "sere:2:0" else top_k
    limit = min(r["batch"] * per_token, result["model_config"]["num_experts"])
    assert 1 <= r["distinct_experts"] <= limit
  assert rows[0]["distinct_experts"] == top_k  # B=1 under none: exactly K experts
  for r in rows:  # --profile_dir: a kernel list (empty here: no GPU) and the loop's HLO
    assert set(r["profile"]) >= {"gpu_busy_us", "groups", "kernels"}
    hlo = tmp_path / "profile" / f"B{r['batch']}_{r['label'].replace(':', '_')}.hlo.txt"
    assert hlo.read_text().startswith("HloModule")
  assert rows[0]["speedup_over_none"] == 1.0
  assert os.path.getsize(f"{out}.md") > 0
  # The targets: from this run, its rooflines divided by the multi-process probe.
  assert len(result["bandwidth"]["processes"]) == 2
  got = json.loads(summary.read_text())
  assert list(got) == [*targets.KEYS, "command"]
  assert got["bandwidth_tbps"] == result["bandwidth"]["copy"]["tbs"]
  assert got["gmm_backend_default"] == "interpret"
  by_case = {(r["batch"], r["label"]): r for r in rows}
  assert got["b16_sere2_speedup"] == by_case[16, "sere:2:0"]["speedup_over_none"]
  assert got["b1_none_ms"] == by_case[1, "none"]["ms_per_token"]
  # The per-layer costs of the same profiles (no GPU events on a CPU: zero busy time,
  # so every part's excess is minus its floor).
  costs = layer_costs.layer_costs(result)
  assert [(c["batch"], c["policy"]) for c in costs["cases"]] == list(by_case)
  for case in costs["cases"]:
    split = case["split"]
    assert split["total"]["us"] == 0 and split["experts"]["floor_us"] > 0
    assert split["total"]["excess_us"] == pytest.approx(-split["total"]["floor_us"])
  assert costs["gmm_fits"] == []

  report_dir = tmp_path / "report"
  _run(["sere_jax.scripts.report", f"--inputs={out}.json", f"--out_dir={report_dir}"],
       tmp_path)
  readme = (report_dir / "README.md").read_text()
  assert "qwen3_30b_a3b (tiny)" in readme and "sere:2:0" in readme
  pngs = sorted(p.name for p in report_dir.glob("*.png"))
  assert pngs == ["decode_qwen3_30b_a3b_tiny_cpu_cpu.png"]
  assert (report_dir / pngs[0]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert not list(report_dir.glob("*.tmp"))


def test_attention_impl_reaches_every_model():
  """`attention_impl` builds DeepSeek-V2's latent-attention kernels as it does the Qwen
  models' decode attention; an unknown name is refused before any weight is made."""
  from sere_jax.benchmarking import decode_models  # pylint: disable=g-import-not-at-top
  chosen = {"deepseek_v2_lite": lambda layer: layer.attention_impl,
            "qwen3_30b_a3b": lambda layer: layer.attn.attention_impl}
  for model, impl in chosen.items():
    net, _, _ = decode_models.abstract_model(model, "tiny", attention_impl="interpret")
    assert impl(net.layers[0]) == "interpret", model
  with pytest.raises(ValueError, match="attention_impl must be one of"):
    decode_models.build_model("deepseek_v2_lite", "tiny", "auto", attention_impl="flash")


def test_peers_run_from_the_checkout(monkeypatch, tmp_path):
  """The torch peers are the checkout's tools/; elsewhere the decode peer is skipped and
  `tool_path` says where they live."""
  from sere_jax.benchmarking import peers  # pylint: disable=g-import-not-at-top
  for name in ("hf_peer.py", "torch_peer.py"):
    assert os.path.isfile(peers.tool_path(name))
  monkeypatch.setattr(peers, "TOOLS_DIR", str(tmp_path))
  with pytest.raises(FileNotFoundError, match="tools/.*run from a checkout"):
    peers.tool_path("torch_peer.py")
  peer = peers.run_hf_peer(sys.executable, "cpu", {}, [1], 4, 2, 1, timeout_s=10)
  assert "run from a checkout" in peer["skipped"]


def test_targets_need_their_cases_before_any_work(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "-m", "sere_jax.scripts.benchmark", "--suite=decode",
       "--scale=tiny", "--batch=1,16", "--policies=none", "--hf_peer=false",
       f"--out={tmp_path / 'd'}", f"--targets_out={tmp_path / 't.json'}"],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode != 0
  assert ("the decode targets need batch size 64, policy sere:2:0, --profile_dir"
          in proc.stderr), proc.stderr[-2000:]
  # The probe's own flags too, before the transformers peer or the probe runs.
  proc = subprocess.run(
      [sys.executable, "-m", "sere_jax.scripts.benchmark", "--suite=decode",
       "--scale=tiny", "--batch=1,16,64", "--policies=none,sere:2:0", "--processes=1",
       f"--profile_dir={tmp_path / 'p'}", f"--out={tmp_path / 'd'}",
       f"--targets_out={tmp_path / 't.json'}"],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode != 0
  assert "--processes must be >= 2" in proc.stderr, proc.stderr[-2000:]
  assert not list(tmp_path.iterdir())


def test_targets_summary_values():
  def row(batch, label, ms, ratio, speedup, profile=None):
    return dict(batch=batch, label=label, ms_per_token=ms, measured_over_roofline=ratio,
                speedup_over_none=speedup, profile=profile)
  profile = dict(gpu_events=480.0, gpu_busy_us=9600.0, groups=[
      dict(name="sere_gmm", total_us=5000.0), dict(name="sere_gmm_", total_us=2600.0),
      dict(name="gemm_fusion_dot", total_us=1000.0)])
  result = dict(impl="triton", hf_config=dict(num_hidden_layers=48), rows=[
      row(1, "none", 5.8, 3.5, 1.0), row(16, "none", 11.0, 1.14, 1.0, profile),
      row(16, "sere:2:0", 5.9, 1.57, 1.86), row(64, "none", 16.8, 1.09, 1.0),
      row(64, "sere:2:0", 11.7, 1.28, 1.43)],
      bandwidth=dict(copy=dict(tbs=4.1, medians=[4.0, 4.1, 4.2], spread=0.2 / 4.1)))
  got = targets.decode_targets(result)
  assert got == dict(
      bandwidth_tbps=4.1, bandwidth_spread_pct=pytest.approx(100 * 0.1 / 4.1),
      kernels_per_layer_b16=10.0, non_expert_us_per_layer_b16=pytest.approx(2000 / 48),
      b1_none_ms=5.8, b1_none_x_roofline=3.5, b16_none_x_roofline=1.14,
      b16_sere2_x_roofline=1.57, b16_sere2_speedup=1.86, b64_sere2_speedup=1.43,
      gmm_backend_default="triton")
  one_process = dict(result, bandwidth=dict(copy=dict(tbs=4.1, spread=0.01)))
  with pytest.raises(ValueError, match="probed in one process"):
    targets.decode_targets(one_process)
  with pytest.raises(ValueError, match="no row for B=64 sere:2:0"):
    targets.decode_targets(dict(result, rows=result["rows"][:3]))
  unprofiled = [dict(r, profile=None) for r in result["rows"]]
  with pytest.raises(ValueError, match="B=16 none row has no profile"):
    targets.decode_targets(dict(result, rows=unprofiled))


def _costs_result(layers=4, fixed=(6.0, 3.0), per_expert=(1.5, 0.8)):
  """A decode result of one B = 16 row per distinct count (4, 8, 16) whose grouped
  matmuls take exactly `fixed + per_expert * distinct` µs per call, and an unprofiled
  B = 1 row."""
  expert_bytes, read_tbs = 9e6, 4.0

  def profile(distinct):
    gmm = [f + s * distinct for f, s in zip(fixed, per_expert)]
    kernels = [dict(name="sere_gmm", count=layers, total_us=gmm[0] * layers,
                    mean_us=gmm[0]),
               dict(name="sere_gmm__1", count=layers, total_us=gmm[1] * layers,
                    mean_us=gmm[1]),
               dict(name="attention", count=layers, total_us=10.0 * layers,
                    mean_us=10.0),
               dict(name="residual_norm", count=layers - 1, total_us=2.0 * (layers - 1),
                    mean_us=2.0),
               dict(name="lm_head", count=1, total_us=30.0, mean_us=30.0)]
    groups = [dict(name="sere_gmm", total_us=kernels[0]["total_us"]),
              dict(name="sere_gmm_", total_us=kernels[1]["total_us"])]
    return dict(gpu_events=3.0 * layers + 1, kernels=kernels, groups=groups,
                gpu_busy_us=sum(k["total_us"] for k in kernels))

  def row(batch, distinct, profiled=True):
    return dict(batch=batch, label=f"d{distinct}", ms_per_token=1.0,
                distinct_experts=distinct, expert_gb=distinct * expert_bytes * layers / 1e9,
                dense_gb=0.4, kv_gb=0.1, profile=profile(distinct) if profiled else None)

  return dict(suite="decode", hf_config=dict(num_hidden_layers=layers),
              read_bandwidth_tbs=read_tbs,
              bytes=dict(expert_bytes_per_layer=[0.0] + [expert_bytes] * (layers - 1)),
              rows=[row(1, 8, profiled=False)] + [row(16, d) for d in (4, 8, 16)])


def test_layer_costs_split_each_step_against_its_bytes():
  result = _costs_result()
  costs = layer_costs.layer_costs(result)
  assert costs["layers"] == 4 and [c["distinct"] for c in costs["cases"]] == [4, 8, 16]
  case = costs["cases"][1]  # 8 experts: gate/up 18 µs, down 9.4 µs per call
  # Per-layer kernels (at least 3/4 of the layers) largest first; the LM head is not one.
  assert list(case["us_per_layer"]) == ["sere_gmm", "attention", "sere_gmm__1",
                                        "residual_norm"]
  assert case["us_per_layer"]["residual_norm"] == pytest.approx(2.0 * 3 / 4)
  assert case["kernels_per_layer"] == pytest.approx(13 / 4)
  split = case["split"]
  assert split["experts"]["us"] == pytest.approx(18.0 + 9.4)
  assert split["experts"]["floor_us"] == pytest.approx(8 * 9e6 / 4e12 * 1e6)  # 18 µs
  assert split["other"]["us"] == pytest.approx(10.0 + 1.5 + 30.0 / 4)
  assert split["other"]["floor_us"] == pytest.approx(0.5e9 / 4e12 * 1e6 / 4)
  for part in split.values():
    assert part["excess_us"] == pytest.approx(part["us"] - part["floor_us"])
  assert split["total"]["us"] == pytest.approx(split["experts"]["us"]
                                               + split["other"]["us"])
  # One line per grouped matmul through the three B = 16 rows, in call order.
  fits = costs["gmm_fits"]
  assert [(f["batch"], f["matmul"], f["kernel"]) for f in fits] == [
      (16, "gate_up", "sere_gmm"), (16, "down", "sere_gmm__1")]
  for fit, fixed, slope, share in zip(fits, (6.0, 3.0), (1.5, 0.8), (2 / 3, 1 / 3)):
    assert fit["fixed_us"] == pytest.approx(fixed)
    assert fit["us_per_expert"] == pytest.approx(slope)
    assert fit["max_residual_us"] == pytest.approx(0.0, abs=1e-9)
    assert fit["slope_tbs"] == pytest.approx(share * 9e6 / slope / 1e6)


def test_layer_costs_refuse_what_they_cannot_read():
  result = _costs_result()
  with pytest.raises(ValueError, match="not a decode-suite result"):
    layer_costs.layer_costs(dict(result, suite="kernels"))
  unprofiled = [dict(r, profile=None) for r in result["rows"]]
  with pytest.raises(ValueError, match="no profiled row"):
    layer_costs.layer_costs(dict(result, rows=unprofiled))
  third = result["rows"][1]["profile"]["kernels"][0]
  result["rows"][1]["profile"]["kernels"].append(dict(third, name="sere_gmm__2"))
  with pytest.raises(ValueError, match="at most 2 grouped-matmul kernels"):
    layer_costs.layer_costs(result)


def test_decode_report_adds_the_datasheet_ratio_where_the_device_has_one():
  row = dict(batch=16, label="none", ms_per_token=12.0, tokens_per_s=1333.3,
             distinct_experts=77.0, roofline_ms=10.0, measured_over_roofline=1.2,
             speedup_over_none=1.0)
  result = dict(suite="decode", env=dict(device_kind="NVIDIA H200", backend="gpu",
                                         jax="0.11.2"),
                model="qwen3_30b_a3b", scale="full", impl="triton",
                protocol=dict(prompt_len=128, new_tokens=32), bytes=dict(param_bytes=6e10),
                copy_bandwidth_tbs=4.0, read_bandwidth_tbs=4.4, rows=[row],
                bandwidth=dict(copy=dict(tbs=4.0), spec_peak_tbs=4.8))
  text = report.markdown(result, "cmd")
  assert "| measured_over_roofline | measured_over_spec | speedup_over_none |" in text
  assert "| 1.200 | 1.440 | 1.000 |" in text  # 12 ms over the roofline at 4.8 TB/s
  assert "datasheet 4800 GB/s" in text
  result["bandwidth"] = dict(copy=dict(tbs=4.0), spec_peak_tbs=None)  # e.g. a CPU
  assert "measured_over_spec" not in report.markdown(result, "cmd")

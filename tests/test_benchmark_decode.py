"""The decode benchmark at tiny scale on this machine, then the report over its JSON."""

import json
import os
import subprocess
import sys

import pytest

REQUIRED_ENV = ("device_kind", "backend", "jax", "jaxlib", "flax", "python")
REQUIRED_ROW = ("batch", "ms_per_token", "tokens_per_s", "distinct_experts",
                "roofline_ms", "measured_over_roofline", "speedup_over_none")


def _run(args, cwd):
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
  proc = subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc


def test_decode_suite_and_report(tmp_path):
  out = tmp_path / "decode_cpu"
  _run(["sere_jax.scripts.benchmark", "--suite=decode", "--model=qwen3_30b_a3b",
        "--scale=tiny", "--prompt_len=8", "--new_tokens=4", "--batch=1,4",
        "--policies=none,sere:1", "--repeats=1", f"--peer_python={sys.executable}",
        "--attention_impl=interpret", f"--profile_dir={tmp_path / 'profile'}",
        f"--out={out}"], tmp_path)
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
  assert result["copy_bandwidth_tbs"] > 0
  # No torch in this environment (or no CUDA): the peer is skipped with its reason.
  assert result["peer"].get("skipped") or result["peer"].get("env")
  rows = result["rows"]
  assert [(r["batch"], r["label"]) for r in rows] == [
      (1, "none"), (1, "sere:1:0"), (4, "none"), (4, "sere:1:0")]  # canonical spec text
  top_k = result["model_config"]["top_k"]
  for r in rows:
    for key in REQUIRED_ROW:
      assert isinstance(r[key], (int, float)), (key, r)
    assert r["ms_per_token"] > 0 and r["roofline_ms"] > 0
    assert r["measured_over_roofline"] > 0
    assert r["steps_timed"] == 3
    assert len(r["distinct_per_layer"]) == result["model_config"]["num_layers"]
    # S=1 under SERE: one primary expert per token, so at most B distinct experts.
    limit = r["batch"] * (1 if r["label"] == "sere:1:0" else top_k)
    assert 1 <= r["distinct_experts"] <= limit
  assert rows[0]["distinct_experts"] == top_k  # B=1 under none: exactly K experts
  for r in rows:  # --profile_dir: a kernel list (empty here: no GPU) and the loop's HLO
    assert set(r["profile"]) >= {"gpu_busy_us", "groups", "kernels"}
    hlo = tmp_path / "profile" / f"B{r['batch']}_{r['label'].replace(':', '_')}.hlo.txt"
    assert hlo.read_text().startswith("HloModule")
  assert rows[0]["speedup_over_none"] == 1.0
  assert os.path.getsize(f"{out}.md") > 0

  report_dir = tmp_path / "report"
  _run(["sere_jax.scripts.report", f"--inputs={out}.json", f"--out_dir={report_dir}"],
       tmp_path)
  readme = (report_dir / "README.md").read_text()
  assert "qwen3_30b_a3b (tiny)" in readme and "sere:1" in readme
  pngs = sorted(p.name for p in report_dir.glob("*.png"))
  assert pngs == ["decode_qwen3_30b_a3b_tiny_cpu_cpu.png"]
  assert (report_dir / pngs[0]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert not list(report_dir.glob("*.tmp"))


def test_attention_kernel_is_refused_for_deepseek():
  from sere_jax.benchmarking import decode_models  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="MLA attention has only the XLA path"):
    decode_models.build_model("deepseek_v2_lite", "tiny", "auto", attention_impl="triton")


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

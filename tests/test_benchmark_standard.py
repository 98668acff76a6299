"""The standard suite at tiny scale on this machine: one run, a run that resumes from a
partial file, and the cross-device report over both; the suite's resume and memory
logic and the report's refusals, in the library."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from sere_jax.benchmarking import compare
from sere_jax.benchmarking import decode_models
from sere_jax.benchmarking import memory
from sere_jax.benchmarking import standard

ENV = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
ENV.pop(memory.MEM_FRACTION_ENV, None)
# The suite shrunk to one model, one batch size and two policies (a few tens of seconds).
SMALL = ["--models=qwen3_30b_a3b", "--batch=4", "--policies=none,sere:1", "--distinct=8",
         "--peers=", "--prompt_len=4", "--new_tokens=3"]
PNG = b"\x89PNG\r\n\x1a\n"


def _script(name, *args, cwd, check=True):
  proc = subprocess.run([sys.executable, "-m", f"sere_jax.scripts.{name}", *args], cwd=cwd,
                        env=ENV, capture_output=True, text=True, timeout=600, check=False)
  if check:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc


def test_standard_suite_runs_resumes_and_merges(tmp_path):
  first, second = tmp_path / "first", tmp_path / "second"
  proc = _script("benchmark", "--suite=standard", f"--out={first}", *SMALL, cwd=tmp_path)
  assert f"{memory.MEM_FRACTION_ENV}=0.95 set by the benchmark" in proc.stdout
  assert "tiny scale" in proc.stdout  # a CPU says it runs the tiny scale
  assert "standard suite" in proc.stderr  # the progress bar
  assert sorted(os.listdir(first)) == ["standard_cpu.json", "standard_cpu.md"]
  result = json.loads((first / "standard_cpu.json").read_text())
  assert result["suite"] == "standard" and result["suite_version"] == standard.SUITE_VERSION
  assert result["scale"] == "tiny" and "tiny scale" in result["scale_note"]
  assert "partial" not in result
  env = result["env"]
  for key in ("device_kind", "backend", "jax", "jaxlib", "platform_version"):
    assert env[key], key
  assert env["kernel_backends"]["moe_ffn"] == "interpret"
  assert env["kernel_backends"]["decode_attention"] == {"qwen3_30b_a3b": "xla"}
  assert env["memory_fraction"] == "0.95"
  assert result["plan"]["batches"] == [4] and result["plan"]["policies"] == ["none",
                                                                            "sere:1:0"]
  assert list(result["parts"]) == ["bandwidth", "kernels/B=4", "decode/qwen3_30b_a3b/B=4"]
  for key in ("read", "copy"):
    probe = result["bandwidth"][key]
    assert probe["min_tbs"] <= probe["tbs"] <= probe["best_tbs"] and probe["spread"] >= 0
    assert probe["iterations"] >= 1
  assert result["bandwidth"]["spec_peak_tbs"] is None  # no datasheet figure for a CPU
  kernels = result["kernels"]
  assert [(r["mode"], r["policy"], r["select_top_k"]) for r in kernels["rows"]] == [
      ("forced", "none", 0), ("natural", "none", 0), ("natural", "sere", 1),
      ("natural", "sere", 2)]
  assert all(r["interpret_us"] > 0 and r["ours_over_roofline"] > 0 for r in kernels["rows"])
  rows = result["decode"]["qwen3_30b_a3b"]["rows"]
  assert [(r["batch"], r["label"]) for r in rows] == [(4, "none"), (4, "sere:1:0")]
  assert rows[0]["speedup_over_none"] == 1.0 and rows[1]["speedup_over_none"] > 0
  assert all(r["measured_over_roofline"] > 0 for r in rows)
  assert "cpu [tiny]" in (first / "standard_cpu.md").read_text()

  # The same command again refuses to replace the result.
  proc = _script("benchmark", "--suite=standard", f"--out={first}", *SMALL, cwd=tmp_path,
                 check=False)
  assert proc.returncode != 0 and "--overwrite" in proc.stderr

  # A run cut short after the kernel part: the same command measures the decode part only.
  partial = dict(result, partial=True, parts={k: v for k, v in result["parts"].items()
                                              if not k.startswith("decode/")})
  del partial["decode"]
  second.mkdir()
  (second / "standard_cpu.partial.json").write_text(json.dumps(partial))
  proc = _script("benchmark", "--suite=standard", f"--out={second}", *SMALL, cwd=tmp_path)
  assert "resuming" in proc.stdout and "2 of 3 parts measured" in proc.stdout
  resumed = json.loads((second / "standard_cpu.json").read_text())
  assert sorted(os.listdir(second)) == ["standard_cpu.json", "standard_cpu.md"]
  assert resumed["runs"][-1]["parts"] == ["decode/qwen3_30b_a3b/B=4"]
  assert resumed["bandwidth"] == result["bandwidth"]  # not measured again
  assert resumed["kernels"] == result["kernels"]
  assert len(resumed["decode"]["qwen3_30b_a3b"]["rows"]) == 2

  # Both outputs side by side.
  report = tmp_path / "report"
  proc = _script("report", str(first), str(second / "standard_cpu.json"),
                 f"--out_dir={report}", cwd=tmp_path)
  assert sorted(os.listdir(report)) == ["standard_kernels.png", "standard_report.md",
                                        "standard_speedup_qwen3_30b_a3b.png"]
  text = (report / "standard_report.md").read_text()
  assert "cpu [tiny] (first/standard_cpu.json) ms/token" in text
  assert "cpu [tiny] (second/standard_cpu.json) ms/token" in text
  assert "| 4 | sere:1:0 |" in text and "| 4 | forced 8 |" in text
  for name in ("standard_kernels.png", "standard_speedup_qwen3_30b_a3b.png"):
    assert (report / name).read_bytes()[:8] == PNG
  assert "× spec" not in text  # no device with a datasheet figure
  # A device with one gets its ratio to the datasheet roofline beside its own.
  spec = dict(result, _path="gpu.json",
              bandwidth=dict(result["bandwidth"], spec_peak_tbs=2 * result["bandwidth"][
                  "copy"]["tbs"]))
  text = compare.markdown([spec], title="spec")
  row = next(l for l in text.splitlines() if l.startswith("| 4 | none |"))
  cells = [c.strip() for c in row.strip("|").split("|")]
  assert float(cells[4]) == pytest.approx(2 * float(cells[3]), rel=0.02)

  # The per-suite README of a directory holding standard results opens with the
  # findings written beside them, then the cross-device table.
  (first / "summary.md").write_text("SERE gains most here.\n")
  _script("report", f"--inputs={first / 'standard_cpu.json'}", f"--out_dir={first}",
          cwd=tmp_path)
  readme = (first / "README.md").read_text()
  assert (readme.index("SERE gains most here.") < readme.index("## Across devices")
          < readme.index("| qwen3_30b_a3b | 4 |") < readme.index("## Inputs"))

  # Another suite version: refused, naming both files; nothing is written.
  other = tmp_path / "other"
  other.mkdir()
  (other / "standard_tpu_v5_lite.json").write_text(json.dumps(
      dict(result, suite_version=standard.SUITE_VERSION + 1)))
  proc = _script("report", str(first), str(other), f"--out_dir={tmp_path / 'no_report'}",
                 cwd=tmp_path, check=False)
  assert proc.returncode != 0
  assert "different standard-suite versions" in proc.stderr
  assert (f"standard_tpu_v5_lite.json (version {standard.SUITE_VERSION + 1})"
          in proc.stderr), proc.stderr
  assert not (tmp_path / "no_report").exists()


def test_bad_suite_and_missing_device_are_refused(tmp_path):
  proc = _script("benchmark", "--suite=fastest", f"--out={tmp_path}", cwd=tmp_path,
                 check=False)
  assert proc.returncode != 0 and "--suite=fastest" in proc.stderr, proc.stderr
  proc = _script("benchmark", "--suite=standard", "--device=gpu", f"--out={tmp_path / 'x'}",
                 cwd=tmp_path, check=False)
  assert proc.returncode != 0
  assert "--device=gpu: no gpu device here" in proc.stderr, proc.stderr
  assert "cpu (cpu)" in proc.stderr  # what is there
  proc = _script("benchmark", "--suite=standard", cwd=tmp_path, check=False)
  assert proc.returncode != 0 and "pass --out=DIR" in proc.stderr
  assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- library


class _CountingSuite(standard.StandardSuite):
  """Parts measured by stubs that count their calls."""

  calls: list[str]

  def measure_bandwidth(self):
    self.calls.append("bandwidth")
    probe = dict(tbs=1.0, median_tbs=1.0, min_tbs=1.0, spread=0.0)
    return dict(read=probe, copy=probe, bytes=1, repeats=1)

  def measure_kernels(self, batch):
    self.calls.append(f"kernels/B={batch}")
    return [dict(batch=batch, mode="forced", policy="none", select_top_k=0, distinct=8.0,
                 roofline_us=1.0, interpret_us=2.0, ours_over_roofline=2.0)]

  def measure_decode(self, model, batch):
    self.calls.append(f"decode/{model}/B={batch}")
    if batch == 16 and getattr(self, "fail_at_16", False):
      raise KeyboardInterrupt  # the run is cut short
    rows = [dict(batch=batch, label=p, ms_per_token=1.0, measured_over_roofline=1.5,
                 speedup_over_none=1.0) for p in self.plan.policies]
    return dict(model=model), rows


def _suite(plan, result, saved):
  suite = _CountingSuite(plan, result, save=lambda r: saved.append(json.loads(json.dumps(r))))
  suite.calls = []
  return suite


def test_resume_measures_only_the_parts_left():
  plan = standard.Plan.for_platform("cpu", models=["qwen3_30b_a3b"], batches=[1, 16])
  env = dict(device_kind="cpu", backend="cpu")
  saved = []
  suite = _suite(plan, standard.new_result(plan, env, "cmd"), saved)
  suite.fail_at_16 = True
  with pytest.raises(KeyboardInterrupt):
    suite.run()
  partial = saved[-1]
  assert partial["partial"] and list(partial["parts"]) == [
      "bandwidth", "kernels/B=1", "kernels/B=16", "decode/qwen3_30b_a3b/B=1"]
  standard.check_resumable(partial, plan, env, "p.json")
  suite = _suite(plan, partial, saved)
  result = suite.run()
  assert suite.calls == ["decode/qwen3_30b_a3b/B=16"]
  assert "partial" not in result and list(result["parts"]) == plan.parts()
  assert [r["batch"] for r in result["decode"]["qwen3_30b_a3b"]["rows"]] == [1] * 6 + [16] * 6
  assert len(result["runs"]) == 2

  other = standard.Plan.for_platform("cpu", models=["qwen3_30b_a3b"], batches=[1, 64])
  with pytest.raises(standard.PlanMismatchError,
                     match=r"p\.json was measured with another plan \(batches: \[1, 16\]"):
    standard.check_resumable(partial, other, env, "p.json")
  with pytest.raises(standard.PlanMismatchError, match="measured on 'cpu'"):
    standard.check_resumable(partial, plan, dict(env, device_kind="TPU v5 lite"), "p.json")
  with pytest.raises(standard.PlanMismatchError, match="suite version 0"):
    standard.check_resumable(dict(partial, suite_version=0), plan, env, "p.json")


def test_plan_defaults_per_platform():
  cpu, gpu = standard.Plan.for_platform("cpu"), standard.Plan.for_platform("gpu")
  assert cpu.scale == "tiny" and gpu.scale == "full"
  assert gpu.models == ("qwen3_30b_a3b", "deepseek_v2_lite", "qwen15_moe_a27b")
  assert gpu.batches == (1, 16, 64) and gpu.distinct == (8, 16, 32, 64, 128)
  assert gpu.policies == ("none", "sere:1:0", "sere:2:0", "topk_truncate:1",
                          "topk_truncate:2", "expert_pool:16")
  assert cpu.kernel_peers == ("ragged_dot",)
  assert gpu.kernel_peers == ("ragged_dot", "mosaic_gpu")  # beside the Triton kernels
  assert standard.Plan.for_platform("gpu", kernel_peers=[]).kernel_peers == ()
  assert standard.Plan.for_platform("cpu", scale="full").scale == "full"
  assert standard.Plan.for_platform("gpu", policies=["sere:1"]).policies == ("sere:1:0",)
  assert len(gpu.parts()) == 1 + 3 + 9
  with pytest.raises(ValueError, match="unknown model 'gpt'"):
    standard.Plan.for_platform("gpu", models=["gpt"])


def _write(path, result):
  path.write_text(json.dumps(result))
  return str(path)


def test_report_refuses_bad_inputs_and_writes_nothing(tmp_path):
  plan = standard.Plan.for_platform("cpu", models=["qwen3_30b_a3b"], batches=[1, 16])
  suite = _suite(plan, standard.new_result(plan, dict(device_kind="cpu"), "cmd"), [])
  good = _write(tmp_path / "standard_cpu.json", suite.run())
  truncated = tmp_path / "truncated.json"
  truncated.write_text(open(good).read()[:200])
  decode_result = _write(tmp_path / "decode.json", dict(suite="decode", rows=[]))
  newer = _write(tmp_path / "newer.json", dict(json.load(open(good)), suite_version=7))
  out = tmp_path / "report"
  (tmp_path / "report_in").mkdir()
  for bad, message in (([good, str(truncated)], "truncated.json is not valid JSON"),
                       ([good, decode_result], "decode.json is not a standard-suite result"),
                       ([good, newer], r"different standard-suite versions: .*"
                                       rf"standard_cpu.json \(version "
                                       rf"{standard.SUITE_VERSION}\), .*newer.json "
                                       r"\(version 7\)"),
                       ([str(tmp_path / "missing")], "no file or directory .*missing"),
                       ([str(tmp_path / "report_in")], "holds no standard-suite result")):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
      compare.write_report(bad, str(out), with_plots=False)
    assert not out.exists()
  # A directory stands for its results, partial files left out.
  (tmp_path / "standard_cpu.partial.json").write_text("{")
  assert compare.expand_inputs([str(tmp_path)]) == [good]
  text = compare.write_report([str(tmp_path)], str(out), with_plots=False)["report"]
  assert "| 16 | expert_pool:16 | 1 | 1.5 | 1 |" in open(text).read()


def test_summary_table_puts_each_devices_none_and_sere_speedups_side_by_side():
  def result(device, rows):
    return dict(env=dict(device_kind=device), _path=f"{device}.json", parts={}, decode=dict(
        qwen3_30b_a3b=dict(rows=[dict(batch=b, label=p, ms_per_token=ms,
                                      measured_over_roofline=x, speedup_over_none=s)
                                 for b, p, ms, x, s in rows])))
  gpu = result("gpu", [(16, "none", 10.0, 1.1, 1.0), (16, "sere:2:0", 5.0, 1.6, 2.0),
                       (16, "sere:1:0", 4.0, 2.0, 2.5), (64, "none", 16.0, 1.1, 1.0)])
  cpu = result("cpu", [(16, "none", 3.0, 300.0, 1.0), (16, "sere:2:0", 2.0, 280.0, 1.5)])
  lines = compare.summary_table([gpu, cpu])
  assert lines[0] == ("| model | B | gpu none ms | × roofline | sere:2:0 speedup | "
                      "sere:1:0 speedup | cpu none ms | × roofline | sere:2:0 speedup | "
                      "sere:1:0 speedup |")
  assert lines[2:] == ["| qwen3_30b_a3b | 16 | 10 | 1.1 | 2 | 2.5 | 3 | 300 | 1.5 |  |",
                       "| qwen3_30b_a3b | 64 | 16 | 1.1 |  |  |  |  |  |  |"]
  assert "\n".join(lines) in compare.markdown([gpu, cpu]).replace("\n## Devices", "")


def test_kernel_table_has_a_column_per_peer_of_each_device():
  def result(device, peers, row):
    return dict(env=dict(device_kind=device), _path=f"{device}.json", parts={},
                plan=dict(kernel_peers=peers),
                kernels=dict(impl="triton", shape={}, rows=[dict(
                    batch=16, mode="forced", policy="none", select_top_k=0, distinct=8.0,
                    triton_us=10.0, ours_over_roofline=1.25, **row)]))
  gpu = result("gpu", ["ragged_dot", "mosaic_gpu"], dict(ragged_dot_us=30.0,
                                                          mosaic_gpu_us=9.0))
  cpu = result("cpu", ["ragged_dot"], dict(ragged_dot_us=50.0))
  lines = compare.markdown([gpu, cpu]).splitlines()
  start = lines.index("## MoE layer: time per layer against distinct experts")
  header = next(l for l in lines[start:] if l.startswith("| B |"))
  assert header == ("| B | routing | gpu distinct | µs/layer | × roofline | ragged_dot µs | "
                    "mosaic_gpu µs | cpu distinct | µs/layer | × roofline | ragged_dot µs |")
  assert "| 16 | forced 8 | 8 | 10 | 1.25 | 30 | 9 | 8 | 10 | 1.25 | 50 |" in lines


# --------------------------------------------------------------------------- memory


def test_memory_fraction_is_set_only_when_the_user_did_not(monkeypatch):
  monkeypatch.setattr(memory, "_backends_initialized", lambda: False)
  environ = {}
  line = memory.set_memory_fraction(environ=environ)
  assert environ == {memory.MEM_FRACTION_ENV: "0.95"} and "set by the benchmark" in line
  environ = {memory.MEM_FRACTION_ENV: "0.8"}
  line = memory.set_memory_fraction(environ=environ)
  assert environ[memory.MEM_FRACTION_ENV] == "0.8" and "set by the user" in line
  # Too late once JAX has a backend: nothing is changed, and the line says so.
  monkeypatch.setattr(memory, "_backends_initialized", lambda: True)
  environ = {}
  assert "already initialised" in memory.set_memory_fraction(environ=environ)
  assert not environ


def test_qwen3_at_b64_does_not_fit_jaxs_default_share_of_an_80gb_card():
  needs = memory.decode_needs("qwen3_30b_a3b", "full", [1, 16, 64], 128, 32)
  need = needs["qwen3_30b_a3b B=64"]
  assert 56 * 2**30 < need["param_bytes"] < 58 * 2**30  # 57 GiB of bf16 weights
  h100 = int(79.2 * 2**30)  # what an H100 80 GB offers JAX
  with pytest.raises(memory.DoesNotFitError) as err:
    memory.check_fits(needs, int(0.75 * h100))  # JAX's default fraction
  message = str(err.value)
  assert "qwen3_30b_a3b B=64 needs" in message and f"{need['total_bytes']:,} bytes" in message
  assert f"{int(0.75 * h100):,} bytes" in message
  memory.check_fits(needs, int(0.95 * h100))  # the benchmark's fraction fits every B
  memory.check_fits(needs, None)  # a CPU: nothing to check


@pytest.mark.parametrize("model", ["qwen3_30b_a3b", "deepseek_v2_lite"])
def test_prefill_computes_the_last_positions_logits_only(model):
  """`last_only`: the logits a prefill samples from, without the [B, L, V] rest (at
  Qwen3-30B-A3B's vocabulary, B = 64 and 128 prompt tokens: 4.6 GiB in float32)."""
  net, _, hf = decode_models.build_model(model, "tiny", "xla_dense")
  batch, length = 2, 5
  tokens = jnp.asarray(np.random.default_rng(0).integers(3, hf["vocab_size"],
                                                         (batch, length)), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
  args = (tokens, positions, jnp.ones((batch, length), bool),
          net.init_cache(batch, length, jnp.bfloat16), jnp.ones((batch, length), bool),
          jnp.asarray(0, jnp.int32))
  full = net(*args).logits
  last = net(*args, last_only=True).logits
  assert full.shape == (batch, length, hf["vocab_size"])
  assert last.shape == (batch, 1, hf["vocab_size"])
  np.testing.assert_allclose(np.asarray(last[:, 0]), np.asarray(full[:, -1]), rtol=1e-5,
                             atol=1e-5)

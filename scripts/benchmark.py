r"""Benchmarks of the MoE kernels and of whole-model decoding.

  python -m sere_jax.scripts.benchmark --suite=standard --out=DIR
  python -m sere_jax.scripts.benchmark --suite=kernels --out=docs/benchmarks/kernels_h200
  python -m sere_jax.scripts.benchmark --suite=decode --model=qwen3_30b_a3b \
      --out=docs/benchmarks/decode_qwen3_30b_a3b_h200

Suite `standard` (`sere_jax.benchmarking.standard`): one command per machine. On the
device JAX finds (`--device` to insist on one), the bandwidth probe, the MoE-layer sweep
and the decode benchmark of Qwen3-30B-A3B, DeepSeek-V2-Lite and Qwen1.5-MoE at B = 1,
16, 64 under `none`, SERE S=1 and S=2, truncation and an expert pool; a CPU runs the
tiny scale. Writes `DIR/standard_<device>.json` and `.md`; after every part the result
so far goes to `DIR/standard_<device>.partial.json`, and the same command resumes from
it. `python -m sere_jax.scripts.report DIR...` puts several devices side by side. Flags
given (`--models`, `--batch`, `--policies`, `--distinct`, `--prompt_len`, ...) replace
the suite's defaults. Unless XLA_PYTHON_CLIENT_MEM_FRACTION is set, the `standard` and
`decode` suites set it to 0.95 (and say so); a model that does not fit the device stops
the run before anything is compiled, naming the bytes it needs and the device's.

Suite `bandwidth` (`sere_jax.benchmarking.bandwidth`): the memory-bandwidth probe that
every roofline divides by, run in `--processes` separate processes, with the spread of
their medians and the device's datasheet figure:

  python -m sere_jax.scripts.benchmark --suite=bandwidth --out=docs/benchmarks/bandwidth_h100

Suite `ep_model` (`sere_jax.benchmarking.ep_model`): no timing; the modelled
expert-parallel decode step of Qwen3-235B-A22B on `--expert_devices` H200s per batch
size and policy, from single-GPU measurements and stated assumptions:

  python -m sere_jax.scripts.benchmark --suite=ep_model --expert_devices=8 \
      --batch=16,64,256 --policies=none,sere:1:0,sere:2:0 --out=docs/benchmarks/decode_ep_model

Suite `decode` (`sere_jax.benchmarking.decode`): a whole model of a real configuration
with random bf16 weights, prefill + timed decode steps per batch size and policy, the
roofline of one step, and Hugging Face transformers' `generate()` as the peer
(`tools/hf_peer.py`, in a child process; a checkout is needed for it). With
`--targets_out=FILE` the bandwidth probe runs in `--processes` separate processes first
and FILE gets the step's summary against its targets (`sere_jax.benchmarking.targets`):

  python -m sere_jax.scripts.benchmark --suite=decode --model=qwen3_30b_a3b \
      --batch=1,16,64 --policies=none,sere:2:0,sere:1:0 --hf_peer=false \
      --profile_dir=/tmp/decode_profile --out=docs/benchmarks/decode_h200 \
      --targets_out=docs/benchmarks/decode_targets_h200.json

Suite `kernels`: one MoE layer at Qwen3-30B-A3B shapes, timed inside
one jit over a chain of layers with different weights. For every batch size, forced
distinct-expert counts and natural (uniform) routing under `none` and `sere`: our op
(`impl`), routing + schedule alone (the router `MoeBlock` runs with `impl`, then the
fused schedule kernel), `jax.lax.ragged_dot`, the dense
einsum, and the roofline from the read bandwidth measured in the same process.
Writes `<out>.json` and `<out>.md`. `--torch_peer` adds PyTorch's `torch._grouped_mm`
on the same routings (`tools/torch_peer.py`, in a child process from a checkout).

Suite `gmm_sweep`: a grouped-matmul kernel alone (gate+up and down) at forced
distinct-expert counts, once per tiling (`--gmm_variants`, JSON overrides of its table
in `sere_jax.kernels.gmm.tiles`): the Triton kernel (`--impl=auto`/`triton`;
interpreted on a CPU) or the Mosaic GPU one (`--impl=mosaic_gpu`, a Hopper GPU, or
`mosaic_gpu_interpret`).

One script for every suite on purpose (one `sere-benchmark` command whose flags the
suites share); each suite's work lives in its `sere_jax.benchmarking` module, and this
file only maps flags onto them.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app
from absl import flags
from absl import logging
import jax

from sere_jax import benchmarking
from sere_jax.benchmarking import bandwidth
from sere_jax.benchmarking import compare
from sere_jax.benchmarking import decode as decode_lib
from sere_jax.benchmarking import decode_models
from sere_jax.benchmarking import ep_model
from sere_jax.benchmarking import gmm_sweep as gmm_sweep_lib
from sere_jax.benchmarking import kernels as kernels_lib
from sere_jax.benchmarking import memory
from sere_jax.benchmarking import peers as peers_lib
from sere_jax.benchmarking import standard
from sere_jax.benchmarking import targets
from sere_jax.benchmarking.report import markdown, merge_results
from sere_jax import cli
from sere_jax import fileio
from sere_jax import policy_spec
from sere_jax.kernels import moe_ffn as moe_ffn_lib
from sere_jax.kernels.gmm import tiles
from sere_jax.models import layers

_SUITE = flags.DEFINE_enum("suite", "kernels",
                           ["kernels", "gmm_sweep", "decode", "standard", "ep_model",
                            "bandwidth"],
                           "What to run.")
_OUT = flags.DEFINE_string("out", "docs/benchmarks/kernels", "Output path prefix (.json/.md); "
                           "standard: the directory its result goes to (required).")
_DEVICE = flags.DEFINE_enum("device", "", ["", "cpu", "gpu", "tpu"],
                            "Run on these devices (empty: whatever JAX finds); a device "
                            "that is not there is an error.")
_MODELS = flags.DEFINE_list("models", list(standard.MODELS),
                            "standard: the decode part's models.")
_RESUME = flags.DEFINE_bool("resume", True, "standard: resume from the partial file of an "
                            "interrupted run of the same plan (--noresume: start over).")
_BATCHES = flags.DEFINE_list("batch", ["1", "8", "16", "32", "64", "128", "256"],
                             "Batch sizes (tokens per decode step; the decode suite's "
                             "default is 1,8,16,32,64,128).")
_DISTINCT = flags.DEFINE_list("distinct", ["8", "16", "32", "64", "128"],
                              "Forced distinct-expert counts.")
_SCALE = flags.DEFINE_enum("scale", "full", ["full", "qwen3_30b", "tiny"],
                           "Shapes: the real ones (`full`; `qwen3_30b` is its old name), or "
                           "tiny ones of the same architecture for CPU runs (standard: "
                           "tiny on a CPU, full elsewhere, unless given).")
_LAYERS = flags.DEFINE_integer("layers", 8, "Weight sets rotated through (defeats the L2).")
_IMPL = flags.DEFINE_string("impl", "auto", "Our op's implementation (see moe_ffn.IMPLS).")
_ATTENTION_IMPL = flags.DEFINE_enum(
    "attention_impl", "auto", list(layers.ATTENTION_IMPLS),
    "decode: a decode step's attention and residual-norm kernels: XLA, or the fused "
    "Pallas kernels (sere_jax.kernels.decode_attention for the Qwen models, "
    "latent_attention for DeepSeek-V2); auto: the kernels on GPUs, XLA elsewhere.")
_PROFILE_DIR = flags.DEFINE_string(
    "profile_dir", "", "decode: also trace one pass per case with jax.profiler into this "
    "directory, add its per-step kernel list to the row and write the compiled decode "
    "loop's HLO beside the trace.")
_PEERS = flags.DEFINE_list("peers", ["ragged_dot", "xla_dense"], "Reference impls timed too.")
_TORCH = flags.DEFINE_bool("torch_peer", False, "Also time torch._grouped_mm (child process).")
_MIN_SECONDS = flags.DEFINE_float("min_seconds", 0.03, "Minimum timed span per repeat.")
_MODEL = flags.DEFINE_enum("model", "qwen3_30b_a3b", list(decode_models.MODELS),
                           "decode: the model configuration.")
_POLICIES = flags.DEFINE_list("policies", list(decode_lib.DEFAULT_POLICIES),
                              "decode: policies as name[:S[:rho]].")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 128, "decode: prompt tokens.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 32, "decode: new tokens per sequence.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "decode: timed passes of new_tokens-1 steps.")
_STEPS_PER_CHECK = flags.DEFINE_integer(
    "steps_per_check", 1, "decode: steps between checks of the decode loop's condition "
    "(generation.decode_loop); pick new_tokens - 1 a multiple of it.", lower_bound=1)
_HF_PEER = flags.DEFINE_bool("hf_peer", True, "decode: time transformers generate() too "
                             "(child process; skipped, with the reason, without torch/CUDA).")
_PEER_PYTHON = flags.DEFINE_string("peer_python", sys.executable,
                                   "decode: the Python that has torch + transformers.")
_PEER_DEVICE = flags.DEFINE_string("peer_device", "cuda", "decode: torch device of the peer.")
_PEER_TIMEOUT = flags.DEFINE_float("peer_timeout", 1800, "decode: seconds for the peer.")
_GMM_MATMULS = flags.DEFINE_list("gmm_matmuls", ["gate_up", "down"],
                                  "gmm_sweep: the projections swept (gate_up, down).")
_GMM_VARIANTS = flags.DEFINE_string(
    "gmm_variants", "", "gmm_sweep: the tilings timed, as a JSON list of overrides of "
    "the kernel's table in sere_jax.kernels.gmm.tiles (e.g. '[{}, {\"k_splits\": 4}]'); "
    "empty: a built-in list.")
_MERGE = flags.DEFINE_list("merge", [], "Instead of running: merge these result JSON files "
                           "of one suite (e.g. runs over different batch sizes).")
_EXPERT_DEVICES = flags.DEFINE_integer(
    "expert_devices", 1, "decode: devices to shard the routed experts over (expert "
    "parallelism; rows add the most distinct experts one device reads). On a CPU, "
    "XLA_FLAGS=--xla_force_host_platform_device_count=N provides N host devices.")
_PROCESSES = flags.DEFINE_integer("processes", 5, "bandwidth (and decode with "
                                  "--targets_out): separate processes that each run "
                                  "the probe.")
_BANDWIDTH_BYTES = flags.DEFINE_integer("bandwidth_bytes", 0, "bandwidth: the probe's "
                                        "buffer (0: 4 GiB on an accelerator, 64 MiB on a "
                                        "CPU).")
_TARGETS_OUT = flags.DEFINE_string(
    "targets_out", "", "decode: also write the step's summary against its targets "
    "(sere_jax.benchmarking.targets.KEYS) to this JSON file; the bandwidth probe then "
    "runs in --processes separate processes first, and --profile_dir, batch sizes 1, "
    "16, 64 and policies none and sere:2:0 are required.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace existing <out>.json / <out>.md.")

SCALES = kernels_lib.SCALES


def kernels_suite(env):
  """The kernels suite (`kernels.kernels_suite`) as the flags say."""
  return kernels_lib.kernels_suite(
      env, SCALES[_SCALE.value], layers=_LAYERS.value, impl=_IMPL.value,
      min_seconds=_MIN_SECONDS.value, batches=[int(b) for b in _BATCHES.value],
      distinct=[int(v) for v in _DISTINCT.value], peers=_PEERS.value,
      torch_peer=_TORCH.value, write_partial=write_result)


def _gmm_variants(kernel: str) -> list[dict]:
  try:
    return tiles.parse_overrides(_GMM_VARIANTS.value, kernel)
  except ValueError as err:
    raise app.UsageError(f"--gmm_variants: {err}") from None


def gmm_sweep(env):
  """The tile sweep (`sere_jax.benchmarking.gmm_sweep`) as the flags say."""
  try:
    impl = moe_ffn_lib.resolve_impl(_IMPL.value)
    kernel = gmm_sweep_lib.kernel_table(impl)
  except ValueError as err:
    raise app.UsageError(f"--suite=gmm_sweep: {err}") from None
  variants = _gmm_variants(kernel)
  try:
    return gmm_sweep_lib.gmm_sweep(
        env, impl=impl, scale=_SCALE.value, batches=[int(b) for b in _BATCHES.value],
        distinct=[int(v) for v in _DISTINCT.value], matmuls=_GMM_MATMULS.value,
        variants=variants, layers=_LAYERS.value, min_seconds=_MIN_SECONDS.value)
  except ValueError as err:
    raise app.UsageError(f"--suite=gmm_sweep: {err}") from None


def main(argv: list[str]) -> None:
  del argv
  command = _command()
  if _SUITE.value == "standard" and not _MERGE.value:
    standard_suite(command)
    return
  cli.check_outputs([_OUT.value + ".json", _OUT.value + ".md"], overwrite=_OVERWRITE.value,
                    flag="--out")
  cli.check_outputs([_PROFILE_DIR.value], overwrite=True, directory=True)
  if _MERGE.value:
    result = merge_results(_MERGE.value)
  elif _SUITE.value == "ep_model":
    result = dict(suite="ep_model", command=command, **ep_model.ep_table(
        policy_spec.parse_list(_POLICIES.value), [int(b) for b in _BATCHES.value],
        _EXPERT_DEVICES.value))
    fileio.write_all_atomic({_OUT.value + ".json": fileio.compact_json(result),
                             _OUT.value + ".md": ep_model.markdown(result, command)})
    print(ep_model.markdown(result, command))
    return
  elif _SUITE.value == "bandwidth":
    bandwidth_suite(command)
    return
  elif _SUITE.value == "decode":
    if _TARGETS_OUT.value:
      cli.check_outputs([_TARGETS_OUT.value], overwrite=_OVERWRITE.value,
                        flag="--targets_out")
    print(memory.set_memory_fraction(), flush=True)
    start = time.time()
    result = decode(command)
    result["seconds"] = time.time() - start
    result["command"] = command
    if _TARGETS_OUT.value:
      summary = dict(targets.decode_targets(result), command=command)
      fileio.write_json_atomic(_TARGETS_OUT.value, summary)
      print(json.dumps(summary, indent=1))
  else:
    if _TORCH.value and _SUITE.value == "kernels":
      try:
        peers_lib.tool_path("torch_peer.py")  # before the suite, not after it
      except FileNotFoundError as err:
        raise app.UsageError(str(err)) from err
    _select_device()
    env = benchmarking.environment()
    logging.info("environment: %s", env)
    start = time.time()
    result = kernels_suite(env) if _SUITE.value == "kernels" else gmm_sweep(env)
    result["seconds"] = time.time() - start
    result["command"] = command
  write_result(result)
  print(markdown(result, result.get("command", command)))


def _check_probe_flags() -> None:
  if _PROCESSES.value < 2 or _BANDWIDTH_BYTES.value < 0:
    raise app.UsageError(f"--processes must be >= 2 and --bandwidth_bytes >= 0, got "
                         f"{_PROCESSES.value} and {_BANDWIDTH_BYTES.value}")


def _probe_across_processes() -> dict:
  """`bandwidth.across_processes` as the flags say (checked by `_check_probe_flags`
  first), with a progress bar; this process must not hold the device yet."""
  bar = cli.progress(total=_PROCESSES.value, desc="bandwidth probe", unit="process")
  try:
    return bandwidth.across_processes(
        _PROCESSES.value, _BANDWIDTH_BYTES.value or None,
        progress=lambda done, total: bar.update(done - bar.n))
  except RuntimeError as err:
    raise app.UsageError(str(err)) from None
  finally:
    bar.close()


def bandwidth_suite(command: str) -> None:
  """The bandwidth probe in `--processes` separate processes (`bandwidth.across_processes`;
  this process leaves the device to them) into `<out>.json` and `.md`."""
  _check_probe_flags()
  result = _probe_across_processes()
  result.update(suite="bandwidth", command=command)
  text = bandwidth.markdown(result, command)
  fileio.write_all_atomic({_OUT.value + ".json": fileio.compact_json(result),
                           _OUT.value + ".md": text})
  print(text)


def _select_device() -> None:
  try:
    benchmarking.select_platform(_DEVICE.value)
  except ValueError as err:
    raise app.UsageError(f"--device={_DEVICE.value}: {err}") from None


def decode(command):
  """The decode suite; the transformers peer runs first, before JAX takes the device."""
  batches = ([int(b) for b in _BATCHES.value] if flags.FLAGS["batch"].present
             else list(decode_lib.DEFAULT_BATCHES))
  scale = "tiny" if _SCALE.value == "tiny" else "full"
  hf = decode_models.hf_config(_MODEL.value, scale)
  policies = policy_spec.parse_list(_POLICIES.value)
  if _TARGETS_OUT.value:
    _check_probe_flags()
    try:
      targets.check_plan(batches, [p.text for p in policies], _PROFILE_DIR.value)
    except ValueError as err:
      raise app.UsageError(f"--targets_out: {err}") from None
  peer = None
  if _HF_PEER.value:
    start = time.time()
    peer = peers_lib.run_hf_peer(_PEER_PYTHON.value, _PEER_DEVICE.value, hf, batches,
                                 _PROMPT_LEN.value, _NEW_TOKENS.value, _REPEATS.value,
                                 _PEER_TIMEOUT.value)
    peer["seconds"] = time.time() - start
    logging.info("transformers peer: %s", peer.get("skipped") or peer.get("env"))
  probe = None
  if _TARGETS_OUT.value:  # in child processes, before this one takes the device
    probe = _probe_across_processes()
  _select_device()
  cli.expert_mesh(_EXPERT_DEVICES.value)  # a usage error when the devices are missing
  try:
    return decode_lib.decode_suite(
        model=_MODEL.value, scale=scale, batches=batches, policies=policies,
        prompt_len=_PROMPT_LEN.value, new_tokens=_NEW_TOKENS.value, impl=_IMPL.value,
        attention_impl=_ATTENTION_IMPL.value, profile_dir=_PROFILE_DIR.value,
        repeats=_REPEATS.value, steps_per_check=_STEPS_PER_CHECK.value,
        bandwidth_bytes=(64 << 20) if scale == "tiny" else (4 << 30), peer=peer,
        write_partial=lambda r: write_result(dict(r, command=command)),
        expert_devices=_EXPERT_DEVICES.value, bandwidth_probe=probe)
  except memory.DoesNotFitError as err:
    raise app.UsageError(str(err)) from None


def _standard_plan() -> standard.Plan:
  """The standard suite's plan on this device; flags given replace its defaults."""
  def given(name, value):
    return value if flags.FLAGS[name].present else None

  def ints(values):
    return [int(v) for v in values]

  try:
    return standard.Plan.for_platform(
        jax.default_backend(),
        scale=given("scale", "tiny" if _SCALE.value == "tiny" else "full"),
        models=given("models", _MODELS.value), batches=given("batch", ints(_BATCHES.value)),
        policies=given("policies", _POLICIES.value),
        distinct=given("distinct", ints(_DISTINCT.value)),
        prompt_len=given("prompt_len", _PROMPT_LEN.value),
        new_tokens=given("new_tokens", _NEW_TOKENS.value),
        repeats=given("repeats", _REPEATS.value),
        kernel_layers=given("layers", _LAYERS.value),
        kernel_peers=given("peers", _PEERS.value),
        min_seconds=given("min_seconds", _MIN_SECONDS.value),
        impl=given("impl", _IMPL.value),
        attention_impl=given("attention_impl", _ATTENTION_IMPL.value))
  except ValueError as err:
    raise app.UsageError(str(err)) from None


def standard_suite(command: str) -> None:
  """The standard suite (`sere_jax.benchmarking.standard`) into `--out` (a directory):
  `standard_<device>.json` and `.md`, through `standard_<device>.partial.json`."""
  if not flags.FLAGS["out"].present:
    raise app.UsageError("--suite=standard writes into a directory: pass --out=DIR")
  # Before JAX initialises its backend, which reads the variable.
  print(memory.set_memory_fraction(), flush=True)
  _select_device()
  plan = _standard_plan()
  env = benchmarking.environment()
  env["kernel_backends"] = standard.kernel_backends(plan.impl, plan.attention_impl,
                                                    plan.models)
  env["memory_fraction"] = os.environ.get(memory.MEM_FRACTION_ENV)
  stem = os.path.join(_OUT.value, f"standard_{standard.device_slug(env)}")
  final_json, final_md, partial = stem + ".json", stem + ".md", stem + ".partial.json"
  cli.check_outputs([final_json, final_md], overwrite=_OVERWRITE.value, flag="--out")
  cli.check_outputs([partial], overwrite=True)
  result = None
  if os.path.exists(partial) and _RESUME.value:
    try:
      result = fileio.read_json(partial)
      standard.check_resumable(result, plan, env, partial)
    except ValueError as err:
      raise app.UsageError(f"cannot resume: {err}; pass --noresume to start over, or "
                           "another --out") from None
    print(f"resuming {partial}: {len(result['parts'])} of {len(plan.parts())} parts "
          "measured already", flush=True)
  else:
    result = standard.new_result(plan, env, command)
  if plan.scale == "tiny":
    print(f"{env['device_kind']}: {standard.TINY_NOTE}", flush=True)
  bar = cli.progress(total=len(plan.parts()), desc="standard suite", unit="part")

  def progress(done, total, part):
    del total
    bar.update(done - bar.n)
    bar.set_postfix_str(part)

  suite = standard.StandardSuite(plan, result, progress=progress,
                                 save=lambda r: fileio.write_json_atomic(partial, r))
  try:
    result["memory"] = suite.check_memory()
  except memory.DoesNotFitError as err:
    bar.close()
    raise app.UsageError(str(err)) from None
  result = suite.run()
  bar.close()
  text = compare.markdown([dict(result, _path=final_json)],
                          title=f"Standard suite on {env['device_kind']}")
  fileio.write_all_atomic({final_json: fileio.compact_json(result), final_md: text})
  if os.path.exists(partial):
    os.remove(partial)
  print(text)
  print(f"wrote {final_json} and {final_md}", flush=True)


def _command():
  return "python -m sere_jax.scripts.benchmark " + " ".join(sys.argv[1:])


def write_result(result):
  """Writes `<out>.json` and `<out>.md`."""
  result.setdefault("command", _command())
  command = result["command"]
  fileio.write_all_atomic({_OUT.value + ".json": fileio.compact_json(result),
                           _OUT.value + ".md": markdown(result, command)})


def run() -> None:
  """Console-script entry point (`sere-benchmark`)."""
  cli.run(main)


if __name__ == "__main__":
  run()

r"""Benchmarks of the MoE kernels and of whole-model decoding.

  python -m sere_jax.scripts.benchmark --suite=kernels --out=docs/benchmarks/kernels_h200
  python -m sere_jax.scripts.benchmark --suite=decode --model=qwen3_30b_a3b \
      --out=docs/benchmarks/decode_qwen3_30b_a3b_h200

Suite `decode` (`sere_jax.benchmarking.decode`): a whole model of a real configuration
with random bf16 weights, prefill + timed decode steps per batch size and policy, the
roofline of one step, and Hugging Face transformers' `generate()` as the peer
(`tools/hf_peer.py`, in a child process; a checkout is needed for it).

Suite `kernels`: one MoE layer at Qwen3-30B-A3B shapes, timed inside
one jit over a chain of layers with different weights. For every batch size, forced
distinct-expert counts and natural (uniform) routing under `none` and `sere`: our op
(`impl`), routing + schedule alone (the router `MoeBlock` runs with `impl`, then the
fused schedule kernel), `jax.lax.ragged_dot`, the dense
einsum, and the roofline from the read bandwidth measured in the same process.
Writes `<out>.json` and `<out>.md`. `--torch_peer` adds PyTorch's `torch._grouped_mm`
on the same routings (`tools/torch_peer.py`, in a child process from a checkout).

Suite `gmm_sweep`: the Triton grouped matmul alone (gate+up and down) at forced
distinct-expert counts, once per tiling (`--gmm_variants`, JSON overrides of
`sere_jax.kernels.gmm.tiles.TILES`; interpreted on a CPU).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from sere_jax import benchmarking
from sere_jax.benchmarking import decode as decode_lib
from sere_jax.benchmarking import decode_models
from sere_jax.benchmarking import peers as peers_lib
from sere_jax.benchmarking.report import markdown, merge_results
from sere_jax import cli
from sere_jax import fileio
from sere_jax import moe
from sere_jax import policies
from sere_jax import policy_spec
from sere_jax import routing
from sere_jax.config import RerouteConfig
from sere_jax.kernels import moe_ffn as moe_ffn_lib
from sere_jax.kernels.gmm import tiles
from sere_jax.kernels.gmm.triton import gmm_triton
from sere_jax.kernels.schedule import reference as schedule_lib

_SUITE = flags.DEFINE_enum("suite", "kernels", ["kernels", "gmm_sweep", "decode"],
                           "What to run.")
_OUT = flags.DEFINE_string("out", "docs/benchmarks/kernels", "Output path prefix (.json/.md).")
_BATCHES = flags.DEFINE_list("batch", ["1", "8", "16", "32", "64", "128", "256"],
                             "Batch sizes (tokens per decode step; the decode suite's "
                             "default is 1,8,16,32,64,128).")
_DISTINCT = flags.DEFINE_list("distinct", ["8", "16", "32", "64", "128"],
                              "Forced distinct-expert counts.")
_SCALE = flags.DEFINE_enum("scale", "full", ["full", "qwen3_30b", "tiny"],
                           "Shapes: the real ones (`full`; `qwen3_30b` is its old name), or "
                           "tiny ones of the same architecture for CPU runs.")
_LAYERS = flags.DEFINE_integer("layers", 8, "Weight sets rotated through (defeats the L2).")
_IMPL = flags.DEFINE_string("impl", "auto", "Our op's implementation (see moe_ffn.IMPLS).")
_ATTENTION_IMPL = flags.DEFINE_enum(
    "attention_impl", "auto", ["auto", "xla", "triton", "interpret"],
    "decode: how Qwen models attend in a decode step: XLA, or the fused Pallas kernel "
    "(sere_jax.kernels.decode_attention); auto: the kernel on GPUs, XLA elsewhere.")
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
    "sere_jax.kernels.gmm.tiles.TILES (e.g. '[{}, {\"k_splits\": 4}]'); empty: a built-in list.")
_MERGE = flags.DEFINE_list("merge", [], "Instead of running: merge these result JSON files "
                           "of one suite (e.g. runs over different batch sizes).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace existing <out>.json / <out>.md.")

SCALES = {
    "qwen3_30b": dict(dim=2048, ffn=768, experts=128, top_k=8, bandwidth_bytes=4 << 30),
    "tiny": dict(dim=64, ffn=48, experts=16, top_k=4, bandwidth_bytes=64 << 20),
}
SCALES["full"] = SCALES["qwen3_30b"]
NATURAL = (("none", 0), ("sere", 1), ("sere", 2))


def forced_ids(rng, batch, top_k, experts, distinct):
  """`[B, K]` ids using exactly `distinct` experts (each token K distinct ones)."""
  subset = rng.permutation(experts)[:distinct]
  slots = (np.arange(batch)[:, None] * top_k + np.arange(top_k)[None, :]) % distinct
  return subset[slots].astype(np.int32)


def synthetic_similarity(rng, experts):
  sim = rng.random((experts, experts)).astype(np.float32)
  sim = (sim + sim.T) / 2
  np.fill_diagonal(sim, 1.0)
  return sim


def make_weights(shape, layers, dtype=jnp.bfloat16):
  keys = jax.random.split(jax.random.PRNGKey(0), 2 * layers)
  d, f, e = shape["dim"], shape["ffn"], shape["experts"]
  return [(jax.random.normal(keys[2 * i], (e, d, 2 * f), dtype) * d ** -0.5,
           jax.random.normal(keys[2 * i + 1], (e, f, d), dtype) * f ** -0.5)
          for i in range(layers)]


def kernels_suite(env):
  shape = SCALES[_SCALE.value]
  d, f, e, k = shape["dim"], shape["ffn"], shape["experts"], shape["top_k"]
  expert_bytes = 3 * d * f * 2
  layers = _LAYERS.value
  read_bw = benchmarking.read_bandwidth(shape["bandwidth_bytes"])
  copy_bw = benchmarking.copy_bandwidth(shape["bandwidth_bytes"] // 2)
  logging.info("read %.2f TB/s, copy %.2f TB/s", read_bw / 1e12, copy_bw / 1e12)
  weights = make_weights(shape, layers)
  rng = np.random.default_rng(0)
  sims = [jnp.asarray(synthetic_similarity(rng, e)) for _ in range(layers)]
  impl = moe_ffn_lib.resolve_impl(_IMPL.value)
  route = moe.softmax_router(k, normalize=False, impl=impl)  # what MoeBlock runs
  chains = {}

  def op_chain(name, config):
    key = (name, config)
    if key not in chains:
      if name == "schedule":
        def step(x, logits, sim):
          ids, _, _ = route(logits)
          sched = moe_ffn_lib.kernel_schedule(impl, ids, jnp.ones(ids.shape[:1], bool),
                                              sim, config, e)
          return jnp.broadcast_to(sched.stats[1].astype(x.dtype) * 1e-9, x.shape)
      else:
        def step(x, ids, w, wg, wd, sim):
          return moe_ffn_lib.moe_ffn(x, ids, w, wg, wd, similarity=sim, config=config,
                                     impl=name).y
      chains[key] = benchmarking.LayerChain(step)
    return chains[key]

  rows = []
  torch_cases = []
  for batch in [int(b) for b in _BATCHES.value]:
    x = jax.random.normal(jax.random.PRNGKey(batch), (batch, d), jnp.bfloat16)
    overhead = benchmarking.chain_overhead(x, layers, min_seconds=_MIN_SECONDS.value)
    cases = [("forced", "none", 0, n) for n in (int(v) for v in _DISTINCT.value)
             if k <= n <= min(e, batch * k)]
    cases += [("natural", p, s, None) for p, s in NATURAL]
    for mode, policy, s, n in cases:
      config = RerouteConfig(policy=policy, select_top_k=s) if policy != "none" \
          else RerouteConfig(policy="none")
      logits = [jnp.asarray(rng.normal(size=(batch, e)), jnp.float32) for _ in range(layers)]
      routed = [routing.route(lg, k) for lg in logits]
      if mode == "forced":
        routed = [(jnp.asarray(forced_ids(rng, batch, k, e, n)), w) for _, w in routed]
      valid = jnp.ones((batch,), bool)
      final_ids, distinct = [], []
      for (ids, w), sim in zip(routed, sims):
        new_ids, _, st = policies.reroute(ids, w, valid, sim, config, num_experts=e)
        final_ids.append(np.asarray(new_ids))
        distinct.append(int(st.distinct_after))
      mean_distinct = float(np.mean(distinct))
      roofline = mean_distinct * expert_bytes / read_bw
      layer_args = [(ids, w, wg, wd, sim) for (ids, w), (wg, wd), sim
                    in zip(routed, weights, sims)]
      row = dict(batch=batch, mode=mode, policy=policy, select_top_k=s,
                 distinct=mean_distinct, roofline_us=roofline * 1e6,
                 chain_overhead_us=overhead * 1e6)
      # The dense einsum's time does not depend on routing: timed for `none` only.
      peers = [p for p in _PEERS.value if p != "xla_dense" or policy == "none"]
      for name in [impl] + peers:
        t = op_chain(name, config).seconds_per_layer(x, layer_args,
                                                     min_seconds=_MIN_SECONDS.value)
        row[f"{name}_us"] = (t - overhead) * 1e6
      t = op_chain("schedule", config).seconds_per_layer(
          x, [(lg, sim) for lg, sim in zip(logits, sims)], min_seconds=_MIN_SECONDS.value)
      row["routing_schedule_us"] = (t - overhead) * 1e6
      row["ours_over_roofline"] = row[f"{impl}_us"] / row["roofline_us"]
      rows.append(row)
      torch_cases.append(dict(row_index=len(rows) - 1, batch=batch,
                              ids=[i.tolist() for i in final_ids],
                              weights=[np.asarray(w).tolist() for _, w in routed]))
      logging.info("B=%d %s %s S=%d distinct=%.1f roofline=%.1fus ours=%.1fus", batch,
                   mode, policy, s, mean_distinct, row["roofline_us"], row[f"{impl}_us"])
    result = dict(suite="kernels", env=env, shape=shape, impl=impl, layers=layers,
                  read_bandwidth_tbs=read_bw / 1e12, copy_bandwidth_tbs=copy_bw / 1e12,
                  expert_bytes=expert_bytes, rows=rows)
    write_result(dict(result, partial=True))  # a long run keeps what it measured
  if _TORCH.value:
    try:
      torch_times, torch_env = peers_lib.run_torch_peer(sys.executable, shape, layers,
                                                        torch_cases, _MIN_SECONDS.value)
    except subprocess.CalledProcessError as err:  # keep the JAX results; say why
      logging.error("torch peer failed: %s", err)
      result["torch_error"] = str(err)
    else:
      result["torch_env"] = torch_env
      for case, t in zip(torch_cases, torch_times):
        rows[case["row_index"]]["torch_grouped_mm_us"] = t
  return result



def _gmm_variants() -> list[dict]:
  try:
    return tiles.parse_overrides(_GMM_VARIANTS.value)
  except ValueError as err:
    raise app.UsageError(f"--gmm_variants: {err}") from None


def gmm_sweep(env):
  """Tile configurations of the Triton grouped matmul, on the gate+up projection
  (tokens gathered in-kernel) and on the down projection (expert-sorted rows)."""
  impl = moe_ffn_lib.resolve_impl(_IMPL.value)
  if impl not in ("triton", "interpret"):
    raise app.UsageError("--suite=gmm_sweep times the Triton grouped matmul: run it on a "
                         f"GPU, or interpreted on a CPU (--impl resolved to {impl!r})")
  configs = [dict(tiles.TILES, **v) for v in _gmm_variants()]
  shape = SCALES[_SCALE.value]
  d, f, e, k = shape["dim"], shape["ffn"], shape["experts"], shape["top_k"]
  layers = _LAYERS.value
  read_bw = benchmarking.read_bandwidth(shape["bandwidth_bytes"])
  weights = make_weights(shape, layers)
  rng = np.random.default_rng(0)
  rows = []
  for batch in [int(b) for b in _BATCHES.value]:
    x = jax.random.normal(jax.random.PRNGKey(batch), (batch, d), jnp.bfloat16)
    hidden = jax.random.normal(jax.random.PRNGKey(batch + 1), (batch * k, f), jnp.bfloat16)
    overhead = benchmarking.chain_overhead(x, layers, min_seconds=_MIN_SECONDS.value)
    for n in [int(v) for v in _DISTINCT.value]:
      if not k <= n <= min(e, batch * k):
        continue
      scheds = [schedule_lib.build_schedule(jnp.asarray(forced_ids(rng, batch, k, e, n)),
                                            jnp.ones((batch,), bool), e)
                for _ in weights]
      for matmul in _GMM_MATMULS.value:
        if matmul == "gate_up":
          layer_args = [(s.group_offsets, s.row_token, wg, x)
                        for s, (wg, _) in zip(scheds, weights)]
          roofline = n * d * 2 * f * 2 / read_bw
        else:
          layer_args = [(s.group_offsets, None, wd, hidden)
                        for s, (_, wd) in zip(scheds, weights)]
          roofline = n * f * d * 2 / read_bw
        for cfg in configs:
          def step(x, offsets, row_token, w, lhs, cfg=cfg):
            out = gmm_triton(lhs, w, offsets, row_token, interpret=impl == "interpret",
                             **cfg)
            return x + jnp.sum(out[:1, :1]).astype(x.dtype) * 0
          t = benchmarking.LayerChain(step).seconds_per_layer(
              x, layer_args, min_seconds=_MIN_SECONDS.value) - overhead
          rows.append(dict(batch=batch, distinct=n, matmul=matmul,
                           roofline_us=roofline * 1e6, us=t * 1e6, ratio=t / roofline,
                           **cfg))
          logging.info("%s", rows[-1])
  return dict(suite="gmm_sweep", env=env, shape=shape, impl=impl,
              read_bandwidth_tbs=read_bw / 1e12, rows=rows)


def main(argv: list[str]) -> None:
  del argv
  cli.check_outputs([_OUT.value + ".json", _OUT.value + ".md"], overwrite=_OVERWRITE.value,
                    flag="--out")
  cli.check_outputs([_PROFILE_DIR.value], overwrite=True, directory=True)
  command = _command()
  if _MERGE.value:
    result = merge_results(_MERGE.value)
  elif _SUITE.value == "decode":
    start = time.time()
    result = decode(command)
    result["seconds"] = time.time() - start
    result["command"] = command
  else:
    if _TORCH.value and _SUITE.value == "kernels":
      try:
        peers_lib.tool_path("torch_peer.py")  # before the suite, not after it
      except FileNotFoundError as err:
        raise app.UsageError(str(err)) from err
    env = benchmarking.environment()
    logging.info("environment: %s", env)
    start = time.time()
    result = kernels_suite(env) if _SUITE.value == "kernels" else gmm_sweep(env)
    result["seconds"] = time.time() - start
    result["command"] = command
  write_result(result)
  print(markdown(result, result.get("command", command)))


def decode(command):
  """The decode suite; the transformers peer runs first, before JAX takes the device."""
  batches = ([int(b) for b in _BATCHES.value] if flags.FLAGS["batch"].present
             else list(decode_lib.DEFAULT_BATCHES))
  scale = "tiny" if _SCALE.value == "tiny" else "full"
  hf = decode_models.hf_config(_MODEL.value, scale)
  peer = None
  if _HF_PEER.value:
    start = time.time()
    peer = peers_lib.run_hf_peer(_PEER_PYTHON.value, _PEER_DEVICE.value, hf, batches,
                                 _PROMPT_LEN.value, _NEW_TOKENS.value, _REPEATS.value,
                                 _PEER_TIMEOUT.value)
    peer["seconds"] = time.time() - start
    logging.info("transformers peer: %s", peer.get("skipped") or peer.get("env"))
  return decode_lib.decode_suite(
      model=_MODEL.value, scale=scale, batches=batches,
      policies=policy_spec.parse_list(_POLICIES.value),
      prompt_len=_PROMPT_LEN.value, new_tokens=_NEW_TOKENS.value, impl=_IMPL.value,
      attention_impl=_ATTENTION_IMPL.value, profile_dir=_PROFILE_DIR.value,
      repeats=_REPEATS.value,
      bandwidth_bytes=(64 << 20) if scale == "tiny" else (4 << 30), peer=peer,
      write_partial=lambda r: write_result(dict(r, command=command)))


def _command():
  return "python -m sere_jax.scripts.benchmark " + " ".join(sys.argv[1:])


def write_result(result):
  """Writes `<out>.json` and `<out>.md`."""
  result.setdefault("command", _command())
  command = result["command"]
  fileio.write_all_atomic({_OUT.value + ".json": json.dumps(result, indent=1),
                           _OUT.value + ".md": markdown(result, command)})


def run() -> None:
  """Console-script entry point (`sere-benchmark`)."""
  cli.run(main)


if __name__ == "__main__":
  run()

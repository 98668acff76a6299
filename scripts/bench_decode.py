r"""End-to-end decode benchmark (`benchmark.py --suite=decode`), DESIGN.md §7.

  python -m sere_jax.scripts.benchmark --suite=decode --model=qwen3_30b_a3b \
      --out=docs/benchmarks/decode_qwen3_30b_a3b_h200
  python -m sere_jax.scripts.benchmark --suite=decode --model=qwen3_30b_a3b --scale=tiny \
      --prompt_len=16 --new_tokens=8 --batch=1,8 --out=/tmp/decode_cpu      # CPU smoke run

A model of the real configuration (`HF_CONFIGS`, written in Hugging Face's names and
mapped to ours by `from_hf`, so the transformers peer and our model are the same
network) gets random bf16 weights made on the device one parameter at a time, and a
synthetic symmetric similarity per MoE layer (uniform in [0, 1), diagonal 1). Per
batch size: one prefill of `prompt_len` random tokens (prefill never re-routes:
`decode_only`), then per policy `repeats` timed runs (after one warm-up run) of the
`new_tokens - 1` decode steps as `generate` runs them: one call of
`sere_jax.generation._decode_loop` (a device-side `while_loop`), timed on the host
until its tokens are ready. Time per output token = that time / steps (the steps of
one call cannot be timed one by one from the host); the median over repeats is reported.
Per case: seconds per step (= time per output token), tokens/s, mean distinct
experts per MoE layer (the steps' RerouteStats), and the roofline of one step: every
byte a step must read (non-expert weights incl. LM head and router, the distinct
experts' weights, shared experts, the KV cache at the mean context length) over the
copy bandwidth measured in the same process.

The transformers peer (`python scripts/bench_decode.py SPEC OUT` runs `peer_main`; this
file imports neither JAX nor sere_jax at the top, so a torch-only Python can run it) builds the same model from the
same HF config with random bf16 weights and times `generate()`; it runs in a child
process BEFORE this process touches the accelerator, so the two never hold a copy of
the weights at the same time.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

# ---------------------------------------------------------------------------------------
# Configurations (Hugging Face names; the peer consumes them as they are).

HF_CONFIGS: dict[str, dict[str, Any]] = {
    # Qwen/Qwen3-30B-A3B config.json
    "qwen3_30b_a3b": dict(
        model_type="qwen3_moe", vocab_size=151936, hidden_size=2048,
        intermediate_size=6144, num_hidden_layers=48, num_attention_heads=32,
        num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
        moe_intermediate_size=768, norm_topk_prob=True, rms_norm_eps=1e-6,
        rope_theta=1000000.0, rope_scaling=None, max_position_embeddings=40960,
        tie_word_embeddings=False, attention_bias=False, decoder_sparse_step=1,
        mlp_only_layers=[], hidden_act="silu", use_sliding_window=False),
    # Qwen/Qwen1.5-MoE-A2.7B config.json (q/k/v biases, sigmoid-gated shared expert)
    "qwen15_moe_a27b": dict(
        model_type="qwen2_moe", vocab_size=151936, hidden_size=2048,
        intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
        num_key_value_heads=16, num_experts=60, num_experts_per_tok=4,
        moe_intermediate_size=1408, shared_expert_intermediate_size=5632,
        norm_topk_prob=False, rms_norm_eps=1e-6, rope_theta=1000000.0, rope_scaling=None,
        max_position_embeddings=8192, tie_word_embeddings=False, decoder_sparse_step=1,
        mlp_only_layers=[], hidden_act="silu", use_sliding_window=False),
    # deepseek-ai/DeepSeek-V2-Lite config.json (MLA without q LoRA, YaRN x40)
    "deepseek_v2_lite": dict(
        model_type="deepseek_v2", vocab_size=102400, hidden_size=2048,
        intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=27,
        num_attention_heads=16, num_key_value_heads=16, kv_lora_rank=512,
        q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=2,
        first_k_dense_replace=1, moe_layer_freq=1, routed_scaling_factor=1.0,
        norm_topk_prob=False, topk_method="greedy", n_group=1, topk_group=1,
        scoring_func="softmax", rms_norm_eps=1e-6, max_position_embeddings=163840,
        rope_theta=10000.0,
        rope_scaling=dict(type="yarn", factor=40, original_max_position_embeddings=4096,
                          beta_fast=32, beta_slow=1, mscale=0.707, mscale_all_dim=0.707),
        tie_word_embeddings=False, attention_bias=False, hidden_act="silu"),
}

# The same architectures shrunk so that one CPU case takes about a second.
TINY: dict[str, dict[str, Any]] = {
    "qwen3_30b_a3b": dict(vocab_size=512, hidden_size=64, intermediate_size=128,
                          num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, num_experts=32,
                          moe_intermediate_size=32),
    "qwen15_moe_a27b": dict(vocab_size=512, hidden_size=64, intermediate_size=128,
                            num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=4, num_experts=16,
                            moe_intermediate_size=32, shared_expert_intermediate_size=64),
    "deepseek_v2_lite": dict(vocab_size=512, hidden_size=64, intermediate_size=128,
                             moe_intermediate_size=32, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=4,
                             kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                             v_head_dim=16, n_routed_experts=24),
}
MODELS = tuple(HF_CONFIGS)
DEFAULT_POLICIES = ("none", "sere:1:0", "sere:1:0.3", "sere:2:0", "sere:2:0.3",
                    "topk_truncate:1", "topk_truncate:2")
DEFAULT_BATCHES = (1, 8, 16, 32, 64, 128)


def hf_config(model: str, scale: str) -> dict[str, Any]:
  """The Hugging Face config dict of `model` at `scale` ("full" or "tiny")."""
  if model not in HF_CONFIGS:
    raise ValueError(f"unknown model {model!r}; expected one of {MODELS}")
  config = copy.deepcopy(HF_CONFIGS[model])
  if scale == "tiny":
    config.update(TINY[model])
  elif scale not in ("full", "qwen3_30b"):
    raise ValueError(f"unknown scale {scale!r}")
  return config


# ---------------------------------------------------------------------------------------
# The transformers peer (child process; imports torch, never JAX).

def _hf_config_object(transformers, hf: dict[str, Any]):
  """A transformers config from our dict (transformers 4.x or 5.x spelling of RoPE)."""
  kwargs = dict(hf)
  model_type = kwargs.pop("model_type")
  cls = transformers.AutoConfig.for_model(model_type).__class__
  import dataclasses  # pylint: disable=g-import-not-at-top
  import inspect  # pylint: disable=g-import-not-at-top
  declared = ({f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls)
              else set(inspect.signature(cls.__init__).parameters))
  if "rope_parameters" in declared:  # transformers 5
    rope = dict(kwargs.pop("rope_scaling") or {})
    rope_type = rope.pop("type", rope.pop("rope_type", "default"))
    kwargs["rope_parameters"] = dict(rope, rope_type=rope_type,
                                     rope_theta=kwargs.pop("rope_theta"))
  return cls(**kwargs)


def peer_main(spec_path: str, out_path: str) -> None:
  """Times HF `generate()` per output token for every batch size in SPEC."""
  with open(spec_path) as fh:
    spec = json.load(fh)
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  device = torch.device(spec["device"])
  if device.type == "cuda" and not torch.cuda.is_available():
    raise RuntimeError("CUDA is not available to torch")
  torch.manual_seed(spec["seed"])
  config = _hf_config_object(transformers, spec["hf_config"])
  dtype = torch.bfloat16
  with torch.device(device):
    try:
      model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    except TypeError:  # transformers 4.x
      model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=dtype)
  model.to(device=device, dtype=dtype).eval()

  def sync():
    if device.type == "cuda":
      torch.cuda.synchronize()

  class StepClock(transformers.StoppingCriteria):
    """Called by generate() after every step: the time each step's token is ready."""

    def __init__(self):
      self.stamps = []

    def __call__(self, input_ids, scores, **kwargs):
      sync()
      self.stamps.append(time.perf_counter())
      return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

  def timed_generate(ids, new):
    clock = StepClock()
    sync()
    start = time.perf_counter()
    with torch.no_grad():
      out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                           min_new_tokens=new, do_sample=False, eos_token_id=None,
                           pad_token_id=0,
                           stopping_criteria=transformers.StoppingCriteriaList([clock]))
    sync()
    assert out.shape[1] == ids.shape[1] + new, out.shape
    # The first stamp follows the prefill (and its token); then one per decode step.
    steps = [b - a for a, b in zip(clock.stamps, clock.stamps[1:])]
    return time.perf_counter() - start, clock.stamps[0] - start, steps

  env = dict(torch=torch.__version__, transformers=transformers.__version__,
             device=(torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"),
             attn_implementation=getattr(model.config, "_attn_implementation", None),
             param_count=sum(p.numel() for p in model.parameters()))
  rows = []
  prompt_len, new = spec["prompt_len"], spec["new_tokens"]
  for batch in spec["batches"]:
    ids = torch.randint(3, config.vocab_size, (batch, prompt_len), device=device)
    timed_generate(ids, min(new, 2))  # warm-up
    totals, prefills, steps = [], [], []
    for _ in range(spec["repeats"]):
      total, prefill, step_times = timed_generate(ids, new)
      totals.append(total)
      prefills.append(prefill)
      steps += step_times
    # Time per output token: the median decode step, as on our side.
    per_token = statistics.median(steps)
    rows.append(dict(batch=batch, hf_ms_per_token=per_token * 1e3,
                     hf_ms_per_token_mean=statistics.fmean(steps) * 1e3,
                     hf_steps_timed=len(steps), hf_generate_s=statistics.median(totals),
                     hf_prefill_s=statistics.median(prefills)))
    print(f"transformers B={batch}: {per_token * 1e3:.2f} ms/token", flush=True)
    # After every batch, so a peer stopped by the timeout still reports what it did.
    with open(out_path + ".tmp", "w") as fh:
      json.dump(dict(rows=rows, env=env), fh)
    os.replace(out_path + ".tmp", out_path)


def run_peer(python: str, device: str, hf: dict, batches, prompt_len: int, new_tokens: int,
             repeats: int, timeout_s: float) -> dict[str, Any]:
  """Runs `peer_main` in a child process; returns its result or `{"skipped": reason}`."""
  with tempfile.TemporaryDirectory() as tmp:
    spec_path, out_path = os.path.join(tmp, "spec.json"), os.path.join(tmp, "out.json")
    with open(spec_path, "w") as fh:
      json.dump(dict(hf_config=hf, batches=list(batches), prompt_len=prompt_len,
                     new_tokens=new_tokens, repeats=repeats, device=device, seed=0), fh)
    probe = subprocess.run(
        [python, "-c", "import torch, transformers; print(torch.cuda.is_available())"],
        capture_output=True, text=True, check=False)
    if probe.returncode != 0:
      return dict(skipped=f"torch/transformers not importable by {python}: "
                          f"{probe.stderr.strip().splitlines()[-1:]}")
    if device == "cuda" and probe.stdout.strip() != "True":
      return dict(skipped="torch sees no CUDA device")
    try:
      # Run as a file, not `-m sere_jax...`: the package's __init__ imports JAX.
      proc = subprocess.run([python, os.path.abspath(__file__), spec_path, out_path],
                            capture_output=True, text=True, check=False, timeout=timeout_s)
    except subprocess.TimeoutExpired:
      reason = f"transformers peer ran past {timeout_s:.0f} s"
      if not os.path.isfile(out_path):
        return dict(skipped=reason)
      with open(out_path) as fh:
        done = json.load(fh)
      return dict(done, partial=f"{reason}; batches after the last row not timed")
    sys.stderr.write(proc.stdout[-4000:])
    if proc.returncode != 0:
      return dict(skipped="transformers peer failed: "
                          + " | ".join(proc.stderr.strip().splitlines()[-3:]))
    with open(out_path) as fh:
      return json.load(fh)


# ---------------------------------------------------------------------------------------
# The JAX side.

def resolve_attention_impl(model_type: str, attention_impl: str) -> str:
  """The attention a decode step of `model_type` runs: DeepSeek-V2's MLA has only the
  XLA path (and takes `auto` or `xla`); the Qwen models resolve `auto` themselves."""
  from sere_jax.models import qwen_moe  # pylint: disable=g-import-not-at-top
  if model_type != "deepseek_v2":
    return qwen_moe.resolve_attention_impl(attention_impl)
  if attention_impl not in ("auto", "xla"):
    raise ValueError(f"attention_impl={attention_impl!r} is for the Qwen models; "
                     "DeepSeek-V2's MLA attention has only the XLA path")
  return "xla"


def build_model(model: str, scale: str, impl: str, seed: int = 0,
                attention_impl: str = "auto"):
  """The model with random bf16 weights and synthetic similarities, made on the device.

  `attention_impl` (`qwen_moe.ATTENTION_IMPLS`): how the Qwen models attend in a decode
  step; DeepSeek-V2 (MLA) has only the XLA path and takes `auto` or `xla`.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from sere_jax.models import deepseek_v2  # pylint: disable=g-import-not-at-top
  from sere_jax.models import qwen_moe  # pylint: disable=g-import-not-at-top
  from sere_jax import moe  # pylint: disable=g-import-not-at-top

  hf = hf_config(model, scale)
  options = dict(impl=impl, param_dtype=jnp.bfloat16)
  resolve_attention_impl(hf["model_type"], attention_impl)  # rejects what cannot run
  if hf["model_type"] == "deepseek_v2":
    config, cls = deepseek_v2.DeepseekV2Config.from_hf(hf), deepseek_v2.DeepseekV2ForCausalLM
  else:
    config, cls = qwen_moe.QwenMoeConfig.from_hf(hf), qwen_moe.QwenMoeForCausalLM
    options["attention_impl"] = attention_impl
  net = nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0), **options))

  @functools.partial(jax.jit, static_argnums=(2, 3))
  def _normal(key, std, shape, dtype):  # one parameter at a time, straight in its dtype
    return jax.random.normal(key, shape, dtype) * std.astype(dtype)

  def normal(key, std, like):
    return _normal(key, std, tuple(like.shape), jnp.dtype(like.dtype))

  def similarity(key, experts):
    sim = jax.random.uniform(key, (experts, experts), jnp.float32)
    sim = (sim + sim.T) / 2
    return jnp.where(jnp.eye(experts, dtype=bool), 1.0, sim)

  key = jax.random.PRNGKey(seed)
  for i, (path, var) in enumerate(
      [(p, v) for p, v in nnx.iter_graph(net) if isinstance(v, nnx.Variable)]):
    like = var.get_value()
    k = jax.random.fold_in(key, i)
    name = path[-1]
    if isinstance(var, moe.ExpertSimilarity):
      value = similarity(k, like.shape[0])
    elif name == "weight" and len(like.shape) == 1:  # RMSNorm scales
      value = jnp.ones(like.shape, like.dtype)
    elif name == "bias":
      value = normal(k, jnp.float32(0.02), jax.ShapeDtypeStruct(like.shape, like.dtype))
    elif name in ("embed", "embed_tokens"):
      value = normal(k, jnp.float32(0.02), jax.ShapeDtypeStruct(like.shape, like.dtype))
    else:  # kernels [.., in, out]: std 1/sqrt(in), as layers.linear_param
      value = normal(k, jnp.float32(like.shape[-2] ** -0.5),
                     jax.ShapeDtypeStruct(like.shape, like.dtype))
    var.set_value(value)
  jax.block_until_ready(jax.tree.leaves(nnx.state(net)))
  return net, config, hf


def byte_budget(net) -> dict[str, Any]:
  """Bytes of the model's parameters by role (experts per layer kept apart)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from sere_jax import moe  # pylint: disable=g-import-not-at-top
  blocks = moe.moe_blocks(net)
  expert_bytes = [int(b.w_gate_up.get_value().nbytes + b.w_down.get_value().nbytes)
                  // b.num_experts for b in blocks]
  total = sum(int(v.get_value().nbytes) for _, v in nnx.iter_graph(net)
              if isinstance(v, nnx.Param))
  experts_total = sum(e * b.num_experts for e, b in zip(expert_bytes, blocks))
  embed = net.embed if hasattr(net, "embed") else net.embed_tokens
  embed_bytes = int(embed.get_value().nbytes)
  tied = getattr(net, "lm_head", None) is None
  # Every non-expert parameter is read once per step; the embedding table only for
  # the B rows looked up (unless it is also the LM head).
  dense = total - experts_total - (0 if tied else embed_bytes)
  similarity = sum(int(b.similarity.get_value().nbytes) for b in blocks)
  count = sum(int(v.get_value().size) for _, v in nnx.iter_graph(net)
              if isinstance(v, nnx.Param))
  return dict(param_bytes=total, param_count=count, expert_bytes_per_layer=expert_bytes,
              dense_bytes=dense, embed_row_bytes=embed_bytes // embed.get_value().shape[0],
              similarity_bytes=similarity, routed_expert_bytes=experts_total)


def _kv_bytes_per_token(cache) -> int:
  """Bytes of keys + values one cached token holds, summed over layers."""
  return sum(int(c.k[0, 0].nbytes + c.v[0, 0].nbytes) for c in cache)


def decode_suite(*, model: str, scale: str, batches, policies, prompt_len: int,
                 new_tokens: int, impl: str, repeats: int, bandwidth_bytes: int,
                 peer: dict[str, Any] | None, write_partial, seed: int = 0,
                 attention_impl: str = "auto", profile_dir: str = "") -> dict[str, Any]:
  """Runs the protocol; `write_partial(result)` is called after every case.

  With `profile_dir`, one more pass per case runs under `jax.profiler` (trace in
  `profile_dir/B<batch>_<policy>`), the row gets its per-step kernel list (`profile`,
  see `sere_jax.profiling`), and the compiled decode loop's optimised HLO is written
  next to the trace (`B<batch>_<policy>.hlo.txt`: which ops each profiled fusion holds)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from sere_jax import benchmarking  # pylint: disable=g-import-not-at-top
  from sere_jax import generation  # pylint: disable=g-import-not-at-top
  from sere_jax import fileio  # pylint: disable=g-import-not-at-top
  from sere_jax import profiling  # pylint: disable=g-import-not-at-top
  from sere_jax.kernels import moe_ffn as moe_ffn_lib  # pylint: disable=g-import-not-at-top

  env = benchmarking.environment()
  copy_bw = benchmarking.copy_bandwidth(bandwidth_bytes)
  read_bw = benchmarking.read_bandwidth(bandwidth_bytes)
  start = time.time()
  net, config, hf = build_model(model, scale, impl, seed, attention_impl)
  build_s = time.time() - start
  budget = byte_budget(net)
  resolved_impl = moe_ffn_lib.resolve_impl(impl)
  sampling = generation.SamplingConfig()  # greedy
  total = prompt_len + new_tokens - 1  # cache slots, as generate() allocates them
  import dataclasses  # pylint: disable=g-import-not-at-top
  result = dict(suite="decode", env=env, model=model, scale=scale,
                model_config=dataclasses.asdict(config), hf_config=hf, impl=resolved_impl,
                attention_impl=resolve_attention_impl(hf["model_type"], attention_impl),
                protocol=dict(prompt_len=prompt_len, new_tokens=new_tokens,
                              batches=list(batches), policies=[p.text for p in policies],
                              repeats=repeats, sampling="greedy", dtype="bfloat16",
                              seed=seed),
                copy_bandwidth_tbs=copy_bw / 1e12, read_bandwidth_tbs=read_bw / 1e12,
                build_seconds=build_s, bytes=budget, rows=[])
  if peer is not None:
    result["peer"] = {k: v for k, v in peer.items() if k != "rows"}
  peer_rows = {r["batch"]: r for r in (peer or {}).get("rows", [])}
  rng = np.random.default_rng(seed)
  for batch in batches:
    prompts = rng.integers(3, hf["vocab_size"], (batch, prompt_len)).astype(np.int32)
    cache0 = net.init_cache(batch, total, jnp.bfloat16)
    kv_token_bytes = _kv_bytes_per_token(cache0)
    valid0 = jnp.zeros((batch, total), jnp.bool_)
    positions = np.broadcast_to(np.arange(prompt_len, dtype=np.int32), (batch, prompt_len))
    prefill_args = (jnp.asarray(prompts), jnp.asarray(positions),
                    jnp.ones((batch, prompt_len), bool), cache0, valid0,
                    jnp.asarray(0, jnp.int32), jax.random.PRNGKey(0))
    lengths = jnp.full((batch,), prompt_len, jnp.int32)
    first_slot, loop_key = jnp.asarray(prompt_len, jnp.int32), jax.random.PRNGKey(1)
    # The loops' first argument is the prefill's token: lowered from its shape.
    loop_args = (jax.ShapeDtypeStruct((batch,), jnp.int32), lengths, cache0, valid0,
                 first_slot, loop_key)
    tic = time.perf_counter()
    (prefill_state, prefill), loops = _compile_programs(net, policies, prefill_args,
                                                        loop_args, sampling, new_tokens)
    compile_s = time.perf_counter() - tic
    print(f"{model} B={batch}: compiled the prefill and {len(policies)} decode loops in "
          f"{compile_s:.0f} s", flush=True)
    first, cache0, valid0, _ = prefill(prefill_state, *prefill_args)
    jax.block_until_ready(first)
    for pol, (state, decode_loop) in zip(policies, loops):

      def one_pass():
        """Seconds for the `new_tokens - 1` decode steps (one `_decode_loop` call, as
        `generate` runs them) and their stats."""
        cache, cache_valid = jax.tree.map(jnp.copy, (cache0, valid0))
        jax.block_until_ready((cache, cache_valid))
        tic = time.perf_counter()
        acc, steps, stats, _, _ = decode_loop(state, first, lengths, cache, cache_valid,
                                              first_slot, loop_key)
        jax.block_until_ready(acc)
        seconds = time.perf_counter() - tic
        assert int(steps) == new_tokens - 1, int(steps)
        return seconds, np.asarray(stats, np.float64)

      one_pass()  # warm up
      step_times, decode_stats = [], None
      for _ in range(repeats):
        seconds, decode_stats = one_pass()
        step_times.append(seconds / (new_tokens - 1))
      summary = generation.summarize_stats(decode_stats)
      distinct_per_layer = summary["distinct_after"]
      step_s = statistics.median(step_times)
      steps = new_tokens - 1
      mean_context = prompt_len + 1 + (steps - 1) / 2  # slots attended, averaged
      expert_bytes = sum(d * e for d, e in zip(distinct_per_layer,
                                               budget["expert_bytes_per_layer"]))
      kv_bytes = batch * mean_context * kv_token_bytes
      sim_bytes = budget["similarity_bytes"] if pol.uses_similarity else 0
      step_bytes = (budget["dense_bytes"] + batch * budget["embed_row_bytes"]
                    + expert_bytes + kv_bytes + sim_bytes)
      roofline_s = step_bytes / copy_bw
      row = dict(
          batch=batch, policy=pol.policy, select_top_k=pol.select_top_k,
          threshold=pol.threshold, label=pol.text, compile_batch_s=compile_s,
          ms_per_token=step_s * 1e3, ms_per_token_mean=statistics.fmean(step_times) * 1e3,
          tokens_per_s=batch / step_s, steps_timed=steps * repeats,
          distinct_experts=float(np.mean(distinct_per_layer)) if distinct_per_layer else 0.0,
          distinct_before=(float(np.mean(summary["distinct_before"]))
                           if distinct_per_layer else 0.0),
          distinct_per_layer=distinct_per_layer,
          step_gb=step_bytes / 1e9, expert_gb=expert_bytes / 1e9, kv_gb=kv_bytes / 1e9,
          dense_gb=budget["dense_bytes"] / 1e9,
          roofline_ms=roofline_s * 1e3, measured_over_roofline=step_s / roofline_s,
          roofline_read_ms=step_bytes / read_bw * 1e3)
      if profile_dir:
        trace_dir = os.path.join(profile_dir, f"B{batch}_{pol.text.replace(':', '_')}")
        with profiling.trace(trace_dir):
          one_pass()
        row["profile"] = profiling.summarize_trace(trace_dir, steps=new_tokens - 1)
        fileio.write_atomic(trace_dir + ".hlo.txt", decode_loop.as_text())
      if batch in peer_rows:
        row["hf_ms_per_token"] = peer_rows[batch]["hf_ms_per_token"]
        row["speedup_over_hf"] = row["hf_ms_per_token"] / row["ms_per_token"]
      result["rows"].append(row)
      write_partial(dict(result, partial=True))
      print(f"{model} B={batch} {pol.text}: {row['ms_per_token']:.3f} ms/token, "
            f"distinct {row['distinct_experts']:.1f}, roofline {row['roofline_ms']:.3f} ms "
            f"(x{row['measured_over_roofline']:.2f})", flush=True)
  add_speedups(result["rows"])
  return result


def _compile_programs(net, policies, prefill_args, loop_args, sampling, new_tokens):
  """The prefill (policy `none`) and one `_decode_loop` per policy, each as `(state,
  compiled)`: traced one after another, compiled in parallel threads (XLA compilation
  releases the GIL; a 48-layer model's loop takes tens of seconds to compile). A
  compiled program takes its function's arguments without the static ones."""
  import concurrent.futures  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from sere_jax import generation  # pylint: disable=g-import-not-at-top
  from sere_jax import moe  # pylint: disable=g-import-not-at-top
  from sere_jax import policy_spec  # pylint: disable=g-import-not-at-top

  def split(spec=policy_spec.PolicySpec("none")):
    moe.set_reroute(net, spec.config())
    moe.check_calibrated(net)
    return nnx.split(net)

  graphdef, state = split()
  lowered = [(state, generation._model_step.lower(  # pylint: disable=protected-access
      graphdef, state, *prefill_args, sampling=sampling, decode=False))]
  for pol in policies:
    graphdef, state = split(pol)
    lowered.append((state, generation._decode_loop.lower(  # pylint: disable=protected-access
        graphdef, state, *loop_args, sampling=sampling, max_new_tokens=new_tokens,
        eos_ids=(), stop_sequences=(), pad_id=0)))
  with concurrent.futures.ThreadPoolExecutor(len(lowered)) as pool:
    compiled = list(pool.map(lambda item: item[1].compile(), lowered))
  programs = [(state, fn) for (state, _), fn in zip(lowered, compiled)]
  return programs[0], programs[1:]


def add_speedups(rows) -> None:
  """`speedup_over_none` per row: time per token of `none` at its batch / its own."""
  base = {r["batch"]: r["ms_per_token"] for r in rows if r["label"] == "none"}
  for r in rows:
    if r["batch"] in base:
      r["speedup_over_none"] = base[r["batch"]] / r["ms_per_token"]


def markdown_rows(result) -> list[str]:
  """The decode table for `benchmark.markdown`."""
  cols = ["batch", "label", "ms_per_token", "tokens_per_s", "distinct_experts",
          "roofline_ms", "measured_over_roofline", "speedup_over_none"]
  if any("hf_ms_per_token" in r for r in result["rows"]):
    cols += ["hf_ms_per_token", "speedup_over_hf"]
  proto = result["protocol"]
  peer = result.get("peer") or {}
  lines = [f"- model: {result['model']} ({result['scale']}), impl {result['impl']}, "
           f"attention {result.get('attention_impl', 'xla')}, "
           f"prompt {proto['prompt_len']}, new tokens {proto['new_tokens']}, "
           f"{result['bytes']['param_bytes'] / 1e9:.2f} GB of bf16 parameters",
           f"- bandwidth measured in this run: copy {result['copy_bandwidth_tbs'] * 1e3:.1f} "
           f"GB/s, read {result['read_bandwidth_tbs'] * 1e3:.1f} GB/s",
           "- transformers peer: " + (peer.get("skipped") or json.dumps(peer.get("env"))),
           "", "Time per output token is a decode loop's time / its steps (median over repeats; "
           "the transformers peer: its median step); the roofline is the bytes "
           "a step must read over the copy bandwidth.", "",
           "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  for r in result["rows"]:
    cells = [f"{r[c]:.3f}" if isinstance(r.get(c), float) else str(r.get(c, ""))
             for c in cols]
    lines.append("| " + " | ".join(cells) + " |")
  return lines


if __name__ == "__main__":
  peer_main(*sys.argv[1:3])

r"""Batched generation with SERE re-routing over a model directory.

  python -m sere_jax.scripts.generate --model_dir=/path/to/model \
      --prompts=prompts.txt --batch_size=16 --max_new_tokens=64 \
      --policy=sere:2:0.3 \
      --output=generations.jsonl --stats_output=stats.json

`--model_dir` is a sere-jax checkpoint (`sere_jax.checkpoint.save`; it keeps the
calibrated expert similarity that `--policy=sere` needs) or a Hugging Face directory
(Qwen1.5/2-MoE, Qwen3-MoE, DeepSeek-V2).

`--prompts` is either a text file (one prompt per non-empty line) or JSONL (`*.jsonl`,
or a file whose first line is a JSON object) with a "prompt" (text) or "tokens" (list
of token ids) field per line. Text is tokenised with the model directory's
`tokenizer.json` (needs the `tokenizers` package); without one, give "tokens".

Prompts are decoded in consecutive batches of `--batch_size` (SERE's choices depend on
a token's batch neighbours, so the batching is part of the result). The output JSONL
has one line per prompt, in input order; `--stats_output` gets per-layer means over
decode steps of the distinct experts before/after re-routing, critical experts kept,
slots re-routed and the most distinct experts one expert-parallel device reads.
`--expert_devices=N` shards the routed experts over N devices (the tokens are the same
as on one device; with `--policy=sere_ep:2:0.3:devN` re-routing keeps each device's
distinct experts within its budget). Both paths are checked before the model loads (an existing file
is replaced only with `--overwrite`) and written to temporary names, renamed into place
together at the end.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

from absl import app
from absl import flags
from absl import logging
import jax.numpy as jnp
import numpy as np

from sere_jax import checkpoint
from sere_jax import cli
from sere_jax import fileio
from sere_jax import generation
from sere_jax import moe
from sere_jax import policy_spec
from sere_jax import textio
from sere_jax.models import hf_import

_MODEL_DIR = flags.DEFINE_string("model_dir", None, "sere-jax checkpoint or HF directory.",
                                 required=True)
_PROMPTS = flags.DEFINE_string("prompts", None, "Text lines or JSONL of prompts.",
                               required=True)
_BATCH = flags.DEFINE_integer("batch_size", 8, "Prompts decoded together.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "New tokens per prompt at most.")
_LENGTH_MULTIPLE = flags.DEFINE_integer(
    "length_multiple", 64, "Batches are left-padded to a multiple of this many prompt "
    "tokens, so batches of different prompt lengths share compiled prefills.")
_PREFILL_CHUNK = flags.DEFINE_integer(
    "prefill_chunk", generation.DEFAULT_PREFILL_CHUNK, "Longer prompts are prefilled in "
    "chunks of this many positions (less memory for attention scores); 0 = whole.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Top-k sampling (0 = off).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass in (0, 1].")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed (batch i uses seed + i).")
_POLICY = flags.DEFINE_string("policy", "sere:2", "Re-routing policy spec, e.g. `none`, "
                              "`sere:2:0.3`, `sere:1:0:min8`, `topk_truncate:2` (grammar: "
                              "sere_jax.policy_spec).")
_IMPL = flags.DEFINE_string("impl", "auto", "MoE op implementation.")
_PARAM_DTYPE = flags.DEFINE_enum("param_dtype", "float32", ["float32", "bfloat16"],
                                 "Parameter dtype.")
_EOS = flags.DEFINE_list("eos_ids", None, "EOS token ids (default: from config.json / "
                         "generation_config.json).")
_OUTPUT = flags.DEFINE_string("output", None, "JSONL of generations.")
_STATS_OUTPUT = flags.DEFINE_string("stats_output", None, "JSON of routing statistics.")
_EXPERT_DEVICES = flags.DEFINE_integer(
    "expert_devices", 1, "Devices to shard the routed experts over (expert parallelism, "
    "sere_jax.expert_parallel; 1: one device). On a CPU, XLA_FLAGS="
    "--xla_force_host_platform_device_count=N provides N host devices.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace existing --output / "
                               "--stats_output files.")


def main(argv: list[str]) -> None:
  del argv
  model_dir = _MODEL_DIR.value
  if _BATCH.value < 1:
    raise app.UsageError("--batch_size must be >= 1")
  if _LENGTH_MULTIPLE.value < 1:
    raise app.UsageError("--length_multiple must be >= 1")
  if _PREFILL_CHUNK.value < 0:
    raise app.UsageError("--prefill_chunk must be >= 0 (0: the whole prompt at once)")
  if _OUTPUT.value and _OUTPUT.value == _STATS_OUTPUT.value:
    raise app.UsageError("--output and --stats_output name the same file")
  cli.check_outputs([_OUTPUT.value], overwrite=_OVERWRITE.value, flag="--output")
  cli.check_outputs([_STATS_OUTPUT.value], overwrite=_OVERWRITE.value,
                    flag="--stats_output")
  sampling = generation.SamplingConfig(temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
                                       top_p=_TOP_P.value, seed=_SEED.value)
  try:
    spec = policy_spec.parse(_POLICY.value)
  except ValueError as e:
    raise app.UsageError(f"--policy: {e}") from None
  if spec.quantile is not None or spec.metric is not None:
    raise app.UsageError(f"--policy {spec.text}: generation uses the model's stored "
                         "similarity and one threshold (no metric, no qX)")
  mesh = cli.expert_mesh(_EXPERT_DEVICES.value)
  reroute = spec.config()
  param_dtype = jnp.dtype(_PARAM_DTYPE.value)

  rows = textio.read_records(_PROMPTS.value, "prompt")
  tokenizer = hf_import.load_tokenizer(model_dir)
  prompts = textio.tokenize_records(rows, "prompt", tokenizer)
  eos_ids = (tuple(int(i) for i in _EOS.value) if _EOS.value is not None
             else hf_import.eos_token_ids(model_dir))

  t0 = time.time()
  model = checkpoint.load_model(model_dir, param_dtype=param_dtype, reroute=reroute,
                                impl=_IMPL.value)
  if mesh is not None:
    moe.set_expert_parallel(model, mesh)
  logging.info("loaded %s (%s) in %.1f s", model_dir, model.config.architecture,
               time.time() - t0)
  # One cache length for all batches, so the decode loop compiles once.
  cache_length = (generation.padded_prompt_length(prompts, _LENGTH_MULTIPLE.value,
                                                  _PREFILL_CHUNK.value)
                  + _MAX_NEW.value - 1)

  results: list[dict[str, Any]] = []
  all_steps: list[np.ndarray] = []
  prefill: list[np.ndarray] = []
  new_tokens = 0
  t_start = time.time()
  num_batches = (len(prompts) + _BATCH.value - 1) // _BATCH.value
  bar = cli.progress(total=len(prompts), desc="generating", unit="prompt")
  for b in range(num_batches):
    lo, hi = b * _BATCH.value, min(len(prompts), (b + 1) * _BATCH.value)
    res = generation.generate(
        model, prompts[lo:hi], max_new_tokens=_MAX_NEW.value,
        sampling=dataclasses.replace(sampling, seed=(sampling.seed + b) % 2**32),
        eos_ids=eos_ids, cache_length=cache_length,
        length_multiple=_LENGTH_MULTIPLE.value, prefill_chunk=_PREFILL_CHUNK.value)
    for i, (toks, reason) in enumerate(zip(res.tokens, res.finish_reason)):
      row = {"index": lo + i, "prompt_tokens": prompts[lo + i], "tokens": toks,
             "finish_reason": reason}
      if "prompt" in rows[lo + i]:
        row["prompt"] = rows[lo + i]["prompt"]
      if tokenizer is not None:
        row["text"] = tokenizer.decode(toks)
      results.append(row)
      new_tokens += len(toks)
    all_steps.append(res.decode_stats)
    prefill.append(res.prefill_stats)
    bar.update(hi - lo)
    if res.decode_stats.size:
      step_mean = res.decode_stats.mean(axis=(0, 1))
      bar.set_postfix_str(f"distinct experts/layer {step_mean[0]:.1f} -> "
                          f"{step_mean[1]:.1f}")
  bar.close()
  elapsed = time.time() - t_start

  steps = (np.concatenate(all_steps) if all_steps
           else np.zeros((0, 0, len(generation.STAT_FIELDS)), np.int64))
  per_layer = generation.summarize_stats(steps)
  num_layers = steps.shape[1]
  stats = {
      "model_dir": model_dir,
      "architecture": model.config.architecture,
      "policy": spec.text,
      "reroute": dataclasses.asdict(reroute),
      "sampling": dataclasses.asdict(sampling),
      "batch_size": _BATCH.value,
      "max_new_tokens": _MAX_NEW.value,
      "num_prompts": len(prompts),
      "new_tokens": new_tokens,
      "decode_steps": int(steps.shape[0]),
      "seconds": elapsed,
      "num_moe_layers": num_layers,
      "per_layer_mean": {f"{k}": v for k, v in per_layer.items()},
      "mean": {k: (float(np.mean(v)) if v else None) for k, v in per_layer.items()},
      "prefill_per_layer_mean": {
          f: [float(x) for x in np.mean(np.stack(prefill), axis=0)[:, j]]
          for j, f in enumerate(generation.STAT_FIELDS)} if prefill else {},
      "finish_reasons": {r: sum(1 for row in results if row["finish_reason"] == r)
                         for r in generation.FINISH_REASONS},
  }
  files = {}
  if _OUTPUT.value:
    files[_OUTPUT.value] = "".join(json.dumps(r) + "\n" for r in results)
  if _STATS_OUTPUT.value:
    files[_STATS_OUTPUT.value] = json.dumps(stats, indent=2) + "\n"
  fileio.write_all_atomic(files)

  mean = stats["mean"]
  print(f"{len(prompts)} prompts in {num_batches} batches, {new_tokens} new tokens in "
        f"{elapsed:.1f} s (including compilation); finish reasons "
        f"{stats['finish_reasons']}")
  print(f"policy {spec.text}; "
        f"{num_layers} MoE layers, {steps.shape[0]} decode steps")
  if mean["distinct_before"] is not None:
    print(f"mean distinct experts per layer and step: {mean['distinct_before']:.2f} -> "
          f"{mean['distinct_after']:.2f}; critical kept {mean['critical_kept']:.2f}; "
          f"slots re-routed {mean['slots_rerouted']:.2f}")
    if reroute.expert_devices > 1 or mesh is not None:
      print(f"most distinct experts on one expert-parallel device: "
            f"{mean['max_device_distinct']:.2f}")
  if _OUTPUT.value:
    print(f"generations: {_OUTPUT.value}")
  if _STATS_OUTPUT.value:
    print(f"stats: {_STATS_OUTPUT.value}")


def run() -> None:
  """Console-script entry point (`sere-generate`)."""
  cli.run(main)


if __name__ == "__main__":
  run()

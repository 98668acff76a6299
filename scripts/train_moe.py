r"""Trains a quality-study MoE on the mixed corpus and exports it in the HF layout.

    python -m sere_jax.scripts.build_corpus --out_dir=/tmp/corpus --vocab_size=4096
    python -m sere_jax.scripts.train_moe --recipe=fine_grained --corpus_dir=/tmp/corpus \
        --workdir=/tmp/wd_fg --out_dir=checkpoints/fine_grained_moe --steps=4000

Recipes (`sere_jax.models.quality`): `fine_grained` (64 experts, top-6, from scratch)
and `upcycled` (a dense model trained for `--dense_steps`, then split into 32 experts,
top-4, and trained for `--steps`); `smoke_*` are CPU-sized. Batches mix the corpus's
domains by `--mixture` weights. Each phase keeps an Orbax `CheckpointManager` under
`--workdir` (the same command resumes). At the end: held-out NLL per domain
(validation and test), expert load per domain, each expert's cosine to its initial
weights, the expert similarity calibrated on the validation split (`--metric` stored;
every metric's spread reported) and the `expert_pool` statistics, and `--out_dir` receives, written to a temporary
directory and renamed: the Hugging Face checkpoint in bf16 (`--max_shard_mb` per
file), `tokenizer.json`, `sere_similarity.safetensors`, `sere_pool_stats.safetensors`,
`training_summary.json`, the
loss curve `loss.png` and `MODEL_CARD.md`.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from absl import app
from absl import flags
from flax import nnx
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import tokenizers

from sere_jax import calibration
from sere_jax import cli
from sere_jax import corpus as corpus_lib
from sere_jax import model_card
from sere_jax import moe
from sere_jax import similarity
from sere_jax import training
from sere_jax import upcycling
from sere_jax.models import hf_export
from sere_jax.models import quality
from sere_jax.models.qwen_moe import QwenMoeForCausalLM


_RECIPE = flags.DEFINE_enum("recipe", "fine_grained", sorted(quality.recipes(256)),
                            "Model recipe.")
_CORPUS = flags.DEFINE_string("corpus_dir", None, "build_corpus output.", required=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Training checkpoints (resumable).",
                               required=True)
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Export directory.", required=True)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --out_dir.")
_STEPS = flags.DEFINE_integer("steps", 4000, "MoE optimiser steps; 0: as many as "
                              "--time_budget_s allows at the speed a short probe measures.")
_DENSE_STEPS = flags.DEFINE_integer("dense_steps", 1500, "Dense steps before upcycling; "
                                    "0: as many as --dense_time_budget_s allows.")
_DENSE_BUDGET = flags.DEFINE_float("dense_time_budget_s", 0.0, "Seconds of dense training "
                                   "(as --time_budget_s for the MoE phase).")
_BATCH = flags.DEFINE_integer("batch_size", 128, "Sequences per step.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 256, "Tokens per sequence.")
_LR = flags.DEFINE_float("learning_rate", 3e-3, "Peak learning rate.")
_WARMUP = flags.DEFINE_integer("warmup_steps", 200, "Linear warm-up steps per phase.")
_AUX = flags.DEFINE_float("aux_loss_weight", 0.01, "Load-balancing loss weight.")
_MIXTURE = flags.DEFINE_list("mixture", ["python=0.45", "shakespeare=0.25", "tasks=0.3"],
                             "Domain weights of the training batches.")
_PRECISION = flags.DEFINE_enum("matmul_precision", "default",
                               ["default", "bfloat16", "tensorfloat32", "float32"],
                               "jax_default_matmul_precision for training.")
_SEED = flags.DEFINE_integer("seed", 0, "Initialisation and data seed.")
_METRIC = flags.DEFINE_enum("metric", "cosine", similarity.METRICS,
                            "Similarity stored with the model.")
_CAL_TOKENS = flags.DEFINE_integer("calibration_tokens", 400 * 128,
                                   "Validation tokens for calibration.")
_EVAL_WINDOWS = flags.DEFINE_integer("eval_windows", 128, "Held-out windows per domain.")
_LOG_EVERY = flags.DEFINE_integer("log_every", 100, "History entry every N steps.")
_CKPT_EVERY = flags.DEFINE_integer("checkpoint_every", 1000, "Checkpoint every N steps.")
_BUDGET = flags.DEFINE_float("time_budget_s", 0.0, "Seconds of MoE-phase training: with "
                             "--steps=0 the steps are planned to fill it; otherwise the "
                             "phase stops when it runs out (0: no limit). The summary "
                             "records the steps run.")
_PROBE_STEPS = 30  # steps timed (after compilation) to plan --steps=0
_MAX_SHARD_MB = flags.DEFINE_integer("max_shard_mb", 16, "Largest safetensors file (MiB).")


def _mixture() -> dict[str, float]:
  weights = {}
  for item in _MIXTURE.value:
    name, _, value = item.partition("=")
    if name not in corpus_lib.DOMAINS:
      raise app.UsageError(f"--mixture: unknown domain {name!r}; one of {corpus_lib.DOMAINS}")
    try:
      weights[name] = float(value)
    except ValueError:
      raise app.UsageError(f"--mixture: {item!r} is not DOMAIN=WEIGHT") from None
  return weights


def _streams(corpus: corpus_lib.Corpus, tokenizer, split: str) -> dict[str, np.ndarray]:
  return {d: corpus_lib.encode_stream(tokenizer, corpus.documents[split][d])
          for d in corpus_lib.DOMAINS}


def _windows(stream: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
  return training.tiled_windows(stream.astype(np.int32), _SEQ_LEN.value, count)


def _planned_steps(model, train: dict[str, np.ndarray], budget_s: float) -> int:
  """Steps that fit `budget_s`, from the time of `_PROBE_STEPS` steps of a copy."""
  tx = training.make_optimizer(peak_lr=_LR.value, warmup_steps=0, total_steps=10)
  copy = nnx.clone(model)
  nnx.update(copy, jax.tree.map(jnp.copy, nnx.state(copy)))  # the probe donates its own
  probe = training.Trainer(copy, tx, aux_loss_weight=_AUX.value)
  mixture = _mixture()
  batches = [corpus_lib.mixture_windows(train, mixture, _BATCH.value, _SEQ_LEN.value,
                                        _SEED.value, i) for i in range(_PROBE_STEPS + 1)]
  jax.block_until_ready(probe.step(*batches[0]))  # compile
  tic = time.time()
  for batch in batches[1:]:
    metrics = probe.step(*batch)
  jax.block_until_ready(metrics)
  per_step = (time.time() - tic) / _PROBE_STEPS
  steps = max(int(budget_s / per_step), _WARMUP.value + 1)
  print(f"probe: {per_step * 1e3:.1f} ms per step; planning {steps} steps for "
        f"{budget_s:.0f} s", flush=True)
  return steps


def _train_phase(model, name: str, steps: int, train: dict[str, np.ndarray],
                 val: dict[str, np.ndarray], budget_s: float = 0.0
                 ) -> tuple[Any, list[dict[str, float]]]:
  if steps == 0:
    if budget_s <= 0:
      raise app.UsageError("--steps=0 needs --time_budget_s")
    steps = _planned_steps(model, train, budget_s)
  tx = training.make_optimizer(peak_lr=_LR.value, warmup_steps=min(_WARMUP.value, steps - 1),
                               total_steps=steps)
  trainer = training.Trainer(model, tx, aux_loss_weight=_AUX.value)
  mixture = _mixture()
  val_in, val_tg = zip(*(_windows(val[d], 16) for d in corpus_lib.DOMAINS))
  val_in, val_tg = np.concatenate(val_in), np.concatenate(val_tg)
  history = training.fit(
      trainer, lambda step: corpus_lib.mixture_windows(
          train, mixture, _BATCH.value, _SEQ_LEN.value, _SEED.value, step),
      steps=steps, manager=training.checkpoint_manager(
          os.path.join(_WORKDIR.value, name)),
      history_path=os.path.join(_WORKDIR.value, f"{name}_history.json"),
      log_every=_LOG_EVERY.value, checkpoint_every=_CKPT_EVERY.value,
      eval_every=_LOG_EVERY.value * 5,
      eval_fn=lambda: training.mean_nll(trainer, val_in, val_tg, _BATCH.value), desc=name,
      time_budget_s=budget_s or None)
  return trainer, history


def _heldout(trainer, streams: dict[str, dict[str, np.ndarray]]) -> dict[str, Any]:
  out = {}
  for split, by_domain in streams.items():
    for domain, stream in by_domain.items():
      inputs, targets = _windows(stream, _EVAL_WINDOWS.value)
      out[f"{split}/{domain}"] = {"nll": training.mean_nll(trainer, inputs, targets,
                                                           _BATCH.value),
                                  "windows": int(inputs.shape[0])}
  return out


def _routing(model, val: dict[str, np.ndarray]) -> dict[str, Any]:
  per_domain = {}
  for domain, stream in val.items():
    inputs, _ = _windows(stream, 32)
    per_domain[domain] = training.routing_statistics(model, inputs, group_size=16)
  loads = np.mean([np.asarray(r["load"]) for r in per_domain.values()], axis=0)
  uniform = 1.0 / loads.shape[1]
  return {"per_domain": per_domain, "min_load_over_uniform":
          [float(x) for x in loads.min(axis=1) / uniform]}


def _calibrate(model, val: dict[str, np.ndarray]
               ) -> tuple[dict[str, list], dict[str, Any], list]:
  """Every metric's similarity, its spread, and the `expert_pool` statistics."""
  inputs = np.concatenate([_windows(val[d], 64)[0] for d in corpus_lib.DOMAINS])
  batches = [inputs[i:i + 32] for i in range(0, inputs.shape[0], 32)]
  matrices, spread = {}, {}
  for metric in similarity.METRICS:
    mats = [np.asarray(m) for m in calibration.calibrate(
        model, batches, metric, token_budget=_CAL_TOKENS.value)]
    matrices[metric] = mats
    spread[metric] = calibration.layer_statistics(mats)
  pool = calibration.calibrate_pool(model, batches, token_budget=_CAL_TOKENS.value)
  return matrices, spread, pool


def _fresh(config) -> QwenMoeForCausalLM:
  """A new model; the (tied) embedding is drawn with std `hidden_size ** -0.5`, so the
  initial logits are O(1) (the model class draws std 1, the scale of imported ones)."""
  model = QwenMoeForCausalLM(config, impl="xla_dense", rngs=nnx.Rngs(_SEED.value))
  model.embed.set_value(model.embed[...] * config.hidden_size ** -0.5)
  return model


def _cast(model, dtype):
  state = nnx.state(model, nnx.Param)
  nnx.update(model, jax.tree.map(lambda a: a.astype(dtype), state))


def main(argv):
  del argv
  if os.path.exists(_OUT_DIR.value) and not _OVERWRITE.value:
    raise app.UsageError(f"--out_dir {_OUT_DIR.value} exists; pass --overwrite to replace it")
  os.makedirs(_WORKDIR.value, exist_ok=True)
  if _PRECISION.value != "default":
    jax.config.update("jax_default_matmul_precision", _PRECISION.value)
  corpus = corpus_lib.read_corpus(_CORPUS.value)
  tok_path = os.path.join(_CORPUS.value, "tokenizer.json")
  if not os.path.isfile(tok_path):
    raise FileNotFoundError(f"{tok_path} is missing (run build_corpus)")
  tokenizer = tokenizers.Tokenizer.from_file(tok_path)
  recipe = quality.recipes(tokenizer.get_vocab_size())[_RECIPE.value]
  t0 = time.time()
  streams = {s: _streams(corpus, tokenizer, s) for s in corpus_lib.SPLITS}
  print(f"tokenized the corpus in {time.time() - t0:.0f} s: " + ", ".join(
      f"{s}/{d} {len(a):,}" for s, by in streams.items() for d, a in by.items()))
  train, val = streams["train"], streams["validation"]

  phases, histories = [], {}
  if recipe.dense is not None:
    dense = _fresh(recipe.dense)
    trainer, histories["dense"] = _train_phase(dense, "dense", _DENSE_STEPS.value, train,
                                               val, _DENSE_BUDGET.value)
    model = upcycling.upcycle(trainer.model, recipe.moe, seed=_SEED.value,
                              impl="xla_dense")
    phases.append({"phase": "dense", "steps": histories["dense"][-1]["step"]})
  else:
    model = _fresh(recipe.moe)
  init = [(np.asarray(b.w_gate_up[...]), np.asarray(b.w_down[...]))
          for b in moe.moe_blocks(model)]
  tic = time.time()
  trainer, histories["moe"] = _train_phase(model, "moe", _STEPS.value, train, val,
                                           _BUDGET.value)
  phases.append({"phase": "moe", "steps": histories["moe"][-1]["step"]})
  train_seconds = time.time() - tic
  model = trainer.model

  cosine = [upcycling.expert_cosine_to(b, *w).tolist()
            for b, w in zip(moe.moe_blocks(model), init)]
  params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  tokens_seen = sum(p["steps"] for p in phases) * _BATCH.value * _SEQ_LEN.value
  summary = {
      "recipe": recipe.name, "command": model_card.command_line(),
      "model_config": hf_export.qwen_hf_config(recipe.moe), "parameters": int(params),
      "phases": phases, "tokens_seen": tokens_seen,
      "tokens_per_parameter": tokens_seen / params, "train_seconds": train_seconds,
      "device": jax.devices()[0].device_kind, "mixture": _mixture(),
      "batch_size": _BATCH.value, "seq_len": _SEQ_LEN.value,
      "learning_rate": _LR.value, "aux_loss_weight": _AUX.value, "seed": _SEED.value,
      "heldout_nll": _heldout(trainer, {"validation": val, "test": streams["test"]}),
      "routing": _routing(model, val),
      "expert_cosine_to_init": {"per_layer_median": [float(np.median(c)) for c in cosine],
                                "median": float(np.median(cosine))},
      "history": histories,
  }
  matrices, spread, pool = _calibrate(model, val)
  summary["similarity"] = {"stored_metric": _METRIC.value, "tokens": _CAL_TOKENS.value,
                           "spread": spread}
  _cast(model, np.dtype(ml_dtypes.bfloat16))
  staging = _OUT_DIR.value.rstrip("/") + ".staging"
  calibration.save_similarity(staging, matrices[_METRIC.value], {
      "metric": _METRIC.value, "tokens": _CAL_TOKENS.value,
      "data_source": "mixed corpus, validation split"})
  calibration.save_pool_stats(staging, pool, {
      "tokens": _CAL_TOKENS.value, "data_source": "mixed corpus, validation split"})
  with open(os.path.join(staging, "training_summary.json"), "w") as fh:
    json.dump(summary, fh, indent=1)
  model_card.write(staging, summary)
  extra = {name: os.path.join(staging, name) for name in os.listdir(staging)}
  extra["tokenizer.json"] = tok_path
  hf_export.save_qwen(model, _OUT_DIR.value, dtype=ml_dtypes.bfloat16,
                      max_shard_bytes=_MAX_SHARD_MB.value << 20, extra_files=extra,
                      overwrite=_OVERWRITE.value)
  for name in os.listdir(staging):
    os.remove(os.path.join(staging, name))
  os.rmdir(staging)
  print(model_card.headline(summary))


def run() -> None:
  """Entry point of `python -m sere_jax.scripts.train_moe`."""
  cli.run(main)


if __name__ == "__main__":
  run()

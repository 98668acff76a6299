r"""Per-layer advice on re-routing a calibrated model, from its own routing.

    python -m sere_jax.scripts.diagnose --model_dir=checkpoints/fine_grained_moe \
        --text=checkpoints/quality_heldout/python.txt.xz --batch_size=16 --out=diagnosis.json

Reads held-out text (plain text, or documents separated by `<|endoftext|>`), takes
`--num_sequences` windows of `--seq_len` tokens, and prints per MoE layer the spread of
its stored similarity, the distinct experts per decode batch before and after SERE at
each S of `--select_top_k` and `--threshold`, the share of secondary slots that find a
substitute above rho, the layer output's relative error under SERE and under the
per-token oracle, and a recommended S or "do not re-route" (`sere_jax.diagnosis`).
Writes the same as JSON to `--out` (checked before the model loads; an existing file is
replaced only with `--overwrite`).
"""

from __future__ import annotations

import os

from absl import flags
import numpy as np

from sere_jax import checkpoint
from sere_jax import cli
from sere_jax import diagnosis
from sere_jax import fileio
from sere_jax.evaluation.data import token_windows
from sere_jax.models import hf_import

_MODEL_DIR = flags.DEFINE_string("model_dir", None, "Calibrated model directory.",
                                 required=True)
_TEXT = flags.DEFINE_list("text", None, "Held-out text files.", required=True)
_BATCH = flags.DEFINE_integer("batch_size", 16, "Decode batch size B.")
_SELECT = flags.DEFINE_list("select_top_k", ["1", "2", "3"], "S values to try.")
_THRESHOLD = flags.DEFINE_float("threshold", 0.0, "SERE's rho.")
_TOLERANCE = flags.DEFINE_float("tolerance", 0.15, "Largest acceptable relative error of "
                                "a layer's output under SERE.")
_NUM = flags.DEFINE_integer("num_sequences", 64, "Windows (a multiple of --batch_size).")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 128, "Tokens per window.")
_OUT = flags.DEFINE_string("out", None, "JSON output path.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --out file.")
_EOT = "<|endoftext|>"


def _tokens(model_dir: str) -> np.ndarray:
  path = os.path.join(model_dir, "tokenizer.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} is missing: the model directory needs its tokenizer")
  tokenizer = hf_import.load_tokenizer(model_dir)
  docs = []
  for name in _TEXT.value:
    docs += [d for d in fileio.read_text(name).split(_EOT) if d.strip()]
  streams = [np.asarray(e.ids, np.int32)
             for e in tokenizer.encode_batch(docs, add_special_tokens=False)]
  tokens = token_windows(streams, _SEQ_LEN.value, _NUM.value)
  count = tokens.shape[0] // _BATCH.value * _BATCH.value
  if count == 0:
    raise ValueError(f"{_TEXT.value} give {tokens.shape[0]} windows of {_SEQ_LEN.value} "
                     f"tokens, fewer than one batch of {_BATCH.value}")
  return tokens[:count]


def main(argv: list[str]) -> None:
  del argv
  cli.check_outputs([_OUT.value], overwrite=_OVERWRITE.value, flag="--out")
  model = checkpoint.load_model(_MODEL_DIR.value, impl="xla_dense")
  report = diagnosis.diagnose(model, _tokens(_MODEL_DIR.value), batch_size=_BATCH.value,
                              select_top_k=[int(s) for s in _SELECT.value],
                              threshold=_THRESHOLD.value, tolerance=_TOLERANCE.value)
  report["model_dir"] = _MODEL_DIR.value
  print(f"{'layer':>5} {'sim std':>8} {'S':>2} {'distinct':>14} {'moved':>6} "
        f"{'err sere':>9} {'err oracle':>10}  advice")
  for layer in report["layers"]:
    advice = layer["recommendation"]
    text = (f"S={advice['select_top_k']} rho={advice['threshold']:g}" if advice["reroute"]
            else "do not re-route")
    for s, m in layer["per_select_top_k"].items():
      print(f"{layer['layer']:>5} {layer['similarity']['std']:>8.3f} {s:>2} "
            f"{m['distinct_none']:>6.1f} -> {m['distinct_sere']:>5.1f} "
            f"{m['substitute_share']:>6.2f} {m['error_sere']:>9.3f} "
            f"{m['error_oracle']:>10.3f}  {text}")
  if _OUT.value:
    fileio.write_json_atomic(_OUT.value, report)


def run() -> None:
  """Entry point of `python -m sere_jax.scripts.diagnose`."""
  cli.run(main)


if __name__ == "__main__":
  run()

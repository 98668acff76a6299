"""Calibrates a Qwen3-30B-A3B-shaped model (random bf16 weights) on the paper's
400 x 128 tokens and records time and peak device memory per metric (issue 5).

    python tools/calibration_scale_check.py --out=docs/benchmarks/calibration_h200.json

Random weights and random token ids: this checks that calibration fits and how long
it takes at full size, not the similarities themselves.
"""

from __future__ import annotations

import json
import os
import time

from absl import app
from absl import flags
import jax
import numpy as np

from sere_jax import benchmarking
from sere_jax import calibration
from sere_jax.benchmarking import decode_models

_OUT = flags.DEFINE_string("out", None, "JSON output path.", required=True)
_METRICS = flags.DEFINE_list("metrics", ["cosine", "frobenius", "cka_linear"], "Metrics.")
_SEQUENCES = flags.DEFINE_integer("sequences", 400, "Calibration sequences.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 128, "Tokens per sequence.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Sequences per prefill.")
_GRAM = flags.DEFINE_integer("gram_tokens", 256, "CKA Gram-matrix tokens per layer.")
_MODEL = flags.DEFINE_string("model", "qwen3_30b_a3b", "A model of sere_jax.benchmarking.decode_models.")


def _peak_bytes() -> int | None:
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def main(argv):
  del argv
  tic = time.time()
  model, config, _ = decode_models.build_model(_MODEL.value, "full", "auto")
  build_s = time.time() - tic
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, config.vocab_size, (_SEQUENCES.value, _SEQ_LEN.value)
                        ).astype(np.int32)
  batches = [tokens[i:i + _BATCH.value] for i in range(0, len(tokens), _BATCH.value)]
  result = {"environment": benchmarking.environment(), "model": _MODEL.value,
            "tokens": int(tokens.size), "batch_size": _BATCH.value,
            "gram_tokens": _GRAM.value, "build_seconds": build_s,
            "peak_bytes_after_build": _peak_bytes(), "metrics": {}}
  for metric in _METRICS.value:
    tic = time.time()
    matrices = calibration.calibrate(model, batches, metric, token_budget=tokens.size,
                                     gram_tokens=_GRAM.value)
    jax.block_until_ready(matrices)
    result["metrics"][metric] = {
        "seconds": time.time() - tic, "peak_bytes_in_use": _peak_bytes(),
        "layers": len(matrices), "finite": bool(all(np.isfinite(np.asarray(m)).all()
                                                    for m in matrices))}
    print(metric, result["metrics"][metric], flush=True)
    tmp = _OUT.value + ".tmp"
    with open(tmp, "w") as fh:
      json.dump(result, fh, indent=2)
    os.replace(tmp, _OUT.value)


if __name__ == "__main__":
  app.run(main)

r"""Distinct experts per decode batch under trained routing vs random weights.

    python -m sere_jax.scripts.routing_realism \
        --model_dir=checkpoints/fine_grained_moe,checkpoints/upcycled_moe \
        --heldout_dir=checkpoints/quality_heldout --out=docs/results/routing_realism

Decode-speed benchmarks at full model shapes use random weights, whose routing is
close to uniform; a trained model's routing is skewed and correlated across the tokens
of a batch. For each model and batch size B this measures the mean distinct experts per
layer per decode step (teacher forced, no re-routing) over held-out windows under the
trained weights and under random weights of the same shapes (the model class's
initialisation), beside the uniform expectation `E (1 - (1 - K/E)^B)`. Writes
`--out`.json and `--out`.md (checked first; existing files are replaced only with
`--overwrite`).
"""

from __future__ import annotations

import json
import os

from absl import flags
from flax import nnx
import numpy as np
import tokenizers

from sere_jax import checkpoint
from sere_jax import cli
from sere_jax import corpus
from sere_jax import fileio
from sere_jax import model_card
from sere_jax import moe
from sere_jax import training
from sere_jax.evaluation import study

_MODELS = flags.DEFINE_list("model_dir", None, "Model directories.", required=True)
_HELDOUT = flags.DEFINE_string("heldout_dir", None, "<domain>.txt (or <domain>.txt.xz) "
                               "held-out documents.",
                               required=True)
_BATCHES = flags.DEFINE_list("batch_sizes", ["1", "8", "16", "32", "64"], "Batch sizes.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 64, "Tokens per window.")
_PER_DOMAIN = flags.DEFINE_integer("per_domain", 64, "Windows per domain.")
_OUT = flags.DEFINE_string("out", "docs/results/routing_realism", "Output path prefix.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace existing output files.")


def _distinct(model, tokens: np.ndarray, group: int) -> float:
  return float(np.mean(training.routing_statistics(model, tokens, group)[
      "distinct_per_step"]))


def main(argv: list[str]) -> None:
  del argv
  cli.check_outputs([_OUT.value + ".json", _OUT.value + ".md"], overwrite=_OVERWRITE.value,
                    flag="--out")
  documents = corpus.read_documents(_HELDOUT.value)
  rows = []
  for model_dir in _MODELS.value:
    model = checkpoint.load_model(model_dir, impl="xla_dense")
    tokenizer = tokenizers.Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    tokens = study.study_data(tokenizer, documents, seq_len=_SEQ_LEN.value,
                              per_domain=_PER_DOMAIN.value).tokens
    random = type(model)(model.config, impl="xla_dense", rngs=nnx.Rngs(1))
    block = moe.moe_blocks(model)[0]
    e, k = block.num_experts, block.top_k
    for group in [int(b) for b in _BATCHES.value]:
      rows.append({"model": os.path.basename(os.path.normpath(model_dir)),
                   "batch_size": group, "num_experts": e, "top_k": k,
                   "trained": _distinct(model, tokens, group),
                   "random_weights": _distinct(random, tokens, group),
                   "uniform": e * (1 - (1 - k / e) ** group)})
      print(rows[-1])
  lines = ["# Distinct experts per decode step: trained routing vs random weights", "",
           "Mean distinct experts per MoE layer per decode step, teacher forced over "
           "held-out windows of every domain (no re-routing), under the trained weights, "
           "under random weights of the same shapes, and under uniform routing.", "",
           "```", model_card.command_line(), "```", "",
           "| model | E | K | B | trained | random weights | uniform |",
           "|---|---|---|---|---|---|---|"]
  lines += [f"| {r['model']} | {r['num_experts']} | {r['top_k']} | {r['batch_size']} | "
            f"{r['trained']:.1f} | {r['random_weights']:.1f} | {r['uniform']:.1f} |"
            for r in rows]
  fileio.write_all_atomic({
      _OUT.value + ".json": json.dumps({"command": model_card.command_line(), "rows": rows},
                                       indent=2) + "\n",
      _OUT.value + ".md": "\n".join(lines) + "\n"})


def run() -> None:
  """Entry point of `python -m sere_jax.scripts.routing_realism`."""
  cli.run(main)


if __name__ == "__main__":
  run()

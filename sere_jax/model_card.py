"""The model card and loss curve of a trained quality-study model."""

from __future__ import annotations

import os
import shlex
import sys
from typing import Any


def command_line() -> str:
  """The running command as a shell line, with the module name instead of its path."""
  argv = list(sys.argv)
  main = sys.modules.get("__main__")
  spec = getattr(main, "__spec__", None)
  head = ["python", "-m", spec.name] if spec is not None else ["python", argv[0]]
  return " ".join(shlex.quote(a) for a in head + argv[1:])


def headline(summary: dict[str, Any]) -> str:
  """One line: recipe, parameters, tokens per parameter, test NLL per domain."""
  test = {k.split("/")[1]: v["nll"] for k, v in summary["heldout_nll"].items()
          if k.startswith("test/")}
  return (f"{summary['recipe']}: {summary['parameters'] / 1e6:.2f} M parameters, "
          f"{summary['tokens_per_parameter']:.1f} tokens/parameter, test NLL "
          + ", ".join(f"{d} {v:.3f}" for d, v in test.items())
          + f"; expert cosine to init (median) {summary['expert_cosine_to_init']['median']:.3f}")


def _plot(directory: str, history: dict[str, list[dict[str, float]]]) -> str | None:
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  fig, ax = plt.subplots(figsize=(6, 3.5))
  offset = 0
  for phase, entries in history.items():
    steps = [offset + e["step"] for e in entries]
    ax.plot(steps, [e["nll"] for e in entries], label=f"{phase} train")
    val = [(offset + e["step"], e["val_nll"]) for e in entries if "val_nll" in e]
    if val:
      ax.plot(*zip(*val), "o--", label=f"{phase} validation")
    offset = steps[-1] if steps else offset
  ax.set_xlabel("step")
  ax.set_ylabel("next-token NLL (nats)")
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  path = os.path.join(directory, "loss.png")
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def write(directory: str, summary: dict[str, Any]) -> None:
  """Writes `MODEL_CARD.md` (and `loss.png` where matplotlib is installed)."""
  os.makedirs(directory, exist_ok=True)
  plotted = _plot(directory, summary["history"])
  c = summary["model_config"]
  lines = [
      f"# {summary['recipe']} MoE (quality study)", "",
      "A Qwen3-MoE language model trained by `scripts/train_moe.py` on the mixed corpus "
      "(Python source, Shakespeare, synthetic tasks with exact answers) to test whether "
      "expert re-routing keeps quality on a model whose experts were trained. It loads "
      "through the Hugging Face import path (`sere_jax.checkpoint.load_model`).", "",
      "## Model",
      f"- {summary['parameters'] / 1e6:.2f} M parameters (bf16 safetensors); "
      f"{c['num_hidden_layers']} layers, width {c['hidden_size']}, "
      f"{c['num_attention_heads']} heads of {c['head_dim']} ({c['num_key_value_heads']} KV), "
      f"vocabulary {c['vocab_size']} (byte-level BPE, `tokenizer.json`), tied embeddings.",
      f"- Every layer: {c['num_experts']} routed experts of width "
      f"{c['moe_intermediate_size']}, top-{c['num_experts_per_tok']} (renormalised).", "",
      "## Training",
      "- Phases: " + ", ".join(f"{p['phase']} {p['steps']} steps" for p in summary["phases"])
      + f" of {summary['batch_size']} x {summary['seq_len']} tokens; "
      f"{summary['tokens_seen'] / 1e6:.1f} M tokens, "
      f"**{summary['tokens_per_parameter']:.1f} tokens per parameter**.",
      f"- Mixture {summary['mixture']}; AdamW peak lr {summary['learning_rate']}, "
      f"load-balancing weight {summary['aux_loss_weight']}, seed {summary['seed']}; "
      f"{summary['device']}, {summary['train_seconds']:.0f} s for the MoE phase.", "",
  ]
  if plotted:
    lines += ["![loss](loss.png)", ""]
  lines += ["## Held-out next-token NLL (nats)", "| split/domain | NLL | windows |",
            "|---|---|---|"]
  lines += [f"| {k} | {v['nll']:.4f} | {v['windows']} |"
            for k, v in summary["heldout_nll"].items()]
  cos = summary["expert_cosine_to_init"]
  routing = summary["routing"]
  lines += ["", "## Experts and routing",
            f"- Cosine of each expert's weights to its initial weights: median "
            f"{cos['median']:.3f}; per layer " + ", ".join(f"{x:.3f}" for x in
                                                           cos["per_layer_median"]) + ".",
            "- Least-used expert's share over the uniform share (validation, all domains), "
            "per layer: " + ", ".join(f"{x:.2f}" for x in routing["min_load_over_uniform"])
            + ".", "- Distinct experts per decode step at batch 16, per domain and layer:"]
  for domain, stats in routing["per_domain"].items():
    lines.append(f"  - {domain}: " + ", ".join(f"{x:.1f}" for x in
                                                stats["distinct_per_step"]))
  lines += ["", "## Expert similarity (validation split)",
            f"`sere_similarity.safetensors` holds the `{summary['similarity']['stored_metric']}`"
            " metric. Off-diagonal spread (std) and range per layer, per metric:", "",
            "| metric | std per layer | min..max per layer |", "|---|---|---|"]
  for metric, layers in summary["similarity"]["spread"].items():
    lines.append(f"| {metric} | " + ", ".join(f"{s['std']:.3f}" for s in layers) + " | "
                 + ", ".join(f"{s['min']:.2f}..{s['max']:.2f}" for s in layers) + " |")
  lines += ["", "## Reproduce", "```", summary["command"], "```", ""]
  with open(os.path.join(directory, "MODEL_CARD.md"), "w") as fh:
    fh.write("\n".join(lines))


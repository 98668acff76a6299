r"""Batch quality evaluation of SERE against its baselines over a model directory.

  python -m sere_jax.scripts.evaluate --model_dir=/path/to/model \
      --text=data/test.txt --metrics_text=data/valid.txt \
      --batch_sizes=1,4,16,64 --impl=xla_dense --out=results/eval --plot

For every batch size g and policy spec (`--policies`; syntax in `sere_jax.policy_spec`,
e.g. `none`, `topk_truncate:2`, `sere:2:0.3`, `sere:2:0:cosine`, `sere:2:q0.5`,
`sere_hybrid:2:0:0.5`, `sere:2:0:min8`):
  * teacher-forced perplexity over `--num_sequences` windows of `--seq_len` tokens of
    the `--text` files (re-routing every position among g sequences, as decoding
    them together would), with top-1 agreement and KL(none || policy) per token, and
    the mean distinct experts per layer per decode step;
  * greedy exact match against `none`: `--greedy_tokens` new tokens after the first
    `--prompt_len` tokens of `--greedy_prompts` windows, decoded g at a time;
  * with `--task_file` (JSONL with "prompt" (or "tokens") and "answer"), greedy
    accuracy in batches of g, scored by `--task_scoring`.

`--text` files are plain text (tokenised whole with the model's `tokenizer.json`) or
JSONL with "text" or "tokens" per line (concatenated); windows are taken round-robin
over the files. Specs that name a metric other than `weights` calibrate it on the fly
on `--metrics_text` (`--calibration_tokens` tokens). On CPU, `--impl=auto` means
Pallas interpret mode (slow): use `--impl=xla_dense` or `--impl=ragged_dot` there.

Writes `<out>.json` (settings, environment, one row per (batch size, spec) and the
computed `comparisons`), `<out>.md` (tables) and with `--plot` `<out>_pareto.png`
(perplexity increase in percent against distinct experts, one panel per batch size),
each to a temporary name then renamed. The paths are checked before the model loads;
existing files are replaced only with `--overwrite`. A progress bar counts the
(batch size, spec) configurations.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import sys
from typing import Any

from absl import app
from absl import flags
from absl import logging
import jax.numpy as jnp
import numpy as np

from sere_jax import benchmarking
from sere_jax import calibration
from sere_jax import checkpoint
from sere_jax import cli
from sere_jax import evaluation
from sere_jax import fileio
from sere_jax import moe
from sere_jax import policy_spec
from sere_jax.models import hf_import

DEFAULT_POLICIES = [
    "none",
    "topk_truncate:1", "topk_truncate:2", "topk_truncate:3",
    "sere:1", "sere:2", "sere:3",
    "sere:1:0.3", "sere:2:0.3", "sere:1:0.5", "sere:2:0.5",
    "sere:2:0:cosine", "sere:2:0:frobenius", "sere:2:0:cka_linear", "sere:2:0:weights",
    "oea:1", "oea:2", "oea:3",
    "random:1", "random:2", "random:3",
    "sere_hybrid:1:0:0.5", "sere_hybrid:2:0:0.5",
    "sere:2:q0.5",
    "sere:2:0:min8",
]
FAMILIES = ("sere", "topk_truncate", "random", "oea", "sere_hybrid")

_MODEL_DIR = flags.DEFINE_string("model_dir", None, "sere-jax checkpoint or HF directory.",
                                 required=True)
_TEXT = flags.DEFINE_list("text", None, "Held-out text files (plain text or JSONL) for "
                          "perplexity and greedy prompts, comma separated.", required=True)
_SEQ_LEN = flags.DEFINE_integer("seq_len", 256, "Tokens per perplexity window.")
_NUM_SEQ = flags.DEFINE_integer("num_sequences", 64, "Perplexity windows (rounded down "
                                "to a multiple of every batch size).")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "4", "16", "64"],
                                 "Decode batch sizes g (sequences re-routing together).")
_POLICIES = flags.DEFINE_list("policies", DEFAULT_POLICIES,
                              "Policy specs (see sere_jax.policy_spec), comma separated.")
_METRICS_TEXT = flags.DEFINE_string(
    "metrics_text", None, "Text to calibrate the metrics that specs name (e.g. the "
    "validation split); needed unless every named metric is `weights`.")
_CALIB_TOKENS = flags.DEFINE_integer("calibration_tokens", 32768,
                                     "Token budget of each on-the-fly calibration.")
_GREEDY_PROMPTS = flags.DEFINE_integer("greedy_prompts", 64, "Greedy exact-match prompts "
                                       "(0 = skip; rounded like --num_sequences).")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 64, "Tokens per greedy prompt.")
_GREEDY_TOKENS = flags.DEFINE_integer("greedy_tokens", 32, "New tokens per greedy prompt.")
_TASK_FILE = flags.DEFINE_string("task_file", None,
                                 "JSONL task with \"prompt\" (or \"tokens\") and \"answer\".")
_TASK_SCORING = flags.DEFINE_enum("task_scoring", "gsm8k", evaluation.TASK_SCORING,
                                  "gsm8k: last number; exact: answer prefixes the output.")
_TASK_MAX_TOKENS = flags.DEFINE_integer("task_max_tokens", 256, "New tokens per task answer.")
_TASK_STOP = flags.DEFINE_list("task_stop", [], "Strings that end a task answer.")
_MAX_TOKENS = flags.DEFINE_integer(
    "max_tokens", 8192, "Tokens per forward at most: device memory is about "
    "4 x max_tokens x vocab x 4 bytes of log-probs beside the model.")
_IMPL = flags.DEFINE_string("impl", "auto", "MoE op implementation (on CPU: xla_dense or "
                            "ragged_dot; auto is Pallas interpret mode, slow).")
_PARAM_DTYPE = flags.DEFINE_enum("param_dtype", "float32", ["float32", "bfloat16"],
                                 "Parameter dtype.")
_OUT = flags.DEFINE_string("out", "evaluation", "Output prefix: <out>.json, <out>.md, "
                           "<out>_pareto.png.")
_PLOT = flags.DEFINE_bool("plot", False, "Also write <out>_pareto.png (needs matplotlib).")
_COMMAND = flags.DEFINE_string("command", None, "Command recorded in the outputs "
                               "(default: this process's argv).")
_EXPERT_DEVICES = flags.DEFINE_integer(
    "expert_devices", 1, "Devices to shard the routed experts over (expert parallelism, "
    "sere_jax.expert_parallel; 1: one device). On a CPU, XLA_FLAGS="
    "--xla_force_host_platform_device_count=N provides N host devices.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace existing output files.")


def _windows(paths: list[str], tokenizer, length: int, count: int, batch_sizes: list[int],
             vocab_size: int, what: str) -> np.ndarray:
  streams = [evaluation.read_stream(p, tokenizer) for p in paths]
  windows = evaluation.token_windows(streams, length, count)
  windows = windows[:evaluation.divisible_count(len(windows), batch_sizes)]
  if len(windows) == 0:
    raise app.UsageError(f"{','.join(paths)} hold too few tokens for {what}: need "
                         f"{math.lcm(*batch_sizes)} windows of {length}")
  if windows.min() < 0 or windows.max() >= vocab_size:
    raise ValueError(f"{what}: token ids outside [0, {vocab_size})")
  if len(windows) < count:
    logging.warning("%s: %d windows of %d tokens (asked for %d)", what, len(windows),
                    length, count)
  return windows


def _task(tokenizer, model_dir: str) -> evaluation.Task | None:
  if not _TASK_FILE.value:
    return None
  return evaluation.load_task(_TASK_FILE.value, tokenizer, scoring=_TASK_SCORING.value,
                              max_new_tokens=_TASK_MAX_TOKENS.value,
                              eos_ids=hf_import.eos_token_ids(model_dir),
                              stop=_TASK_STOP.value)


def _calibrator(model, tokenizer):
  """`similarity_for(metric)`: calibrates `metric` on --metrics_text (weights: no data)."""
  def similarity_for(metric: str):
    if metric == "weights":
      return calibration.calibrate(model, [], metric, token_budget=1)
    stream = evaluation.read_stream(_METRICS_TEXT.value, tokenizer)
    windows = evaluation.token_windows([stream], _SEQ_LEN.value, 1 << 30)
    if len(windows) == 0:
      raise ValueError(f"{_METRICS_TEXT.value} holds fewer than {_SEQ_LEN.value} tokens")
    batches = (windows[i:i + 8] for i in range(0, len(windows), 8))
    return calibration.calibrate(model, batches, metric,
                                 token_budget=_CALIB_TOKENS.value)
  return similarity_for


def _model_summary(model, model_dir: str) -> dict[str, Any]:
  config = dataclasses.asdict(model.config)
  blocks = moe.moe_blocks(model)
  summary = {"model_dir": model_dir, "architecture": model.config.architecture,
             "moe_layers": len(blocks),
             "num_experts": blocks[0].num_experts if blocks else 0,
             "top_k": blocks[0].top_k if blocks else 0, "config": config}
  if os.path.isfile(os.path.join(model_dir, calibration.SIMILARITY_FILE)):
    summary["similarity"] = calibration.load_similarity(model_dir)[1]
  return summary


def _fmt(value, digits: int = 3) -> str:
  if value is None:
    return "-"
  if isinstance(value, float):
    if math.isnan(value):
      return "-"
    if round(value, digits) == 0:
      value = 0.0  # no "-0.000"
    return f"{value:.{digits}f}"
  return str(value)


def _interval(ci) -> str:
  return "-" if ci is None else f"{ci[0]:+.2f} to {ci[1]:+.2f}"


def _pair(value, best) -> str:
  return "-" if value is None and best is None else f"{_fmt(value)} ({_fmt(best)})"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
  return lines + [""]


def markdown(data: dict[str, Any]) -> str:
  """The report: environment, model, one table per batch size, comparisons."""
  s = data["settings"]
  m = data["model"]
  out = ["# SERE quality evaluation", "", f"Command: `{data['command']}`", "",
         "## Environment", ""]
  out += _table(["key", "value"], [[k, v] for k, v in data["environment"].items()])
  out += ["## Model", ""]
  out += _table(["key", "value"], [
      ["model_dir", m["model_dir"]], ["architecture", m["architecture"]],
      ["MoE layers", m["moe_layers"]], ["experts", m["num_experts"]], ["top-K", m["top_k"]],
      ["hidden size", m["config"].get("hidden_size")],
      ["vocab size", m["config"].get("vocab_size")],
      ["stored similarity", (m.get("similarity") or {}).get("metric", "-")]])
  out += ["## Data", ""]
  out += _table(["key", "value"], [
      ["perplexity text", ", ".join(s["text"])],
      ["windows", f"{s['num_sequences']} x {s['seq_len']} tokens"],
      ["greedy", f"{s['greedy_prompts']} prompts of {s['prompt_len']} tokens, "
                 f"{s['greedy_tokens']} new tokens"],
      ["task", s["task_file"] or "-"], ["metrics text", s["metrics_text"] or "-"],
      ["impl", s["impl"]], ["param dtype", s["param_dtype"]]])
  out += ["Distinct experts: mean per MoE layer per decode step (teacher forcing). "
          "Δppl: perplexity increase over `none` in %, with its 95% interval from a "
          "paired bootstrap over sequences (task accuracy likewise over items). "
          "Agreement: top-1 next-token agreement with `none`. KL: mean KL(none || "
          "policy) per token. Exact match: "
          "greedy continuations equal to `none`'s (prefix: mean agreeing tokens).", ""]
  task = s["task_file"] is not None
  for g in s["batch_sizes"]:
    rows = [r for r in data["results"] if r["batch_size"] == g]
    out += [f"## Batch size {g}", ""]
    header = ["policy", "distinct/layer", "% of none", "perplexity", "Δppl %",
              "Δppl 95% CI", "agreement", "KL", "exact match", "prefix"] + (
                  ["task acc.", "Δacc 95% CI"] if task else [])
    out += _table(header, [
        [r["label"], r["distinct"], r["distinct_pct_of_none"], r["perplexity"],
         r["delta_ppl_pct"], _interval(r.get("ppl_delta_ci")), r["agreement"], r["kl"],
         r.get("exact_match"), r.get("prefix_agreement")]
        + ([r.get("task_accuracy"), _interval(r.get("task_accuracy_delta_ci"))]
           if task else [])
        for r in rows])
  out += ["## At equal distinct-expert count", "",
          "Δppl % of each family at common distinct-expert levels: interpolated linearly "
          "along the family's points sorted by distinct (its points plus `none`, which "
          "is S = K), and in parentheses the family's best Δppl with at most that many "
          "distinct experts; `-` is outside the family's range. `sere` here uses the "
          "stored similarity (any S and rho; no min_batch).", ""]
  for g in s["batch_sizes"]:
    comp = data["comparisons"]["equal_distinct"][str(g)]
    fams = list(comp["delta_ppl_pct"])
    out += [f"### Batch size {g}", ""]
    out += _table(["distinct/layer"] + [f"{f} Δppl %" for f in fams], [
        [x] + [_pair(comp["delta_ppl_pct"][f][i], comp["best_delta_ppl_pct"][f][i])
               for f in fams]
        for i, x in enumerate(comp["levels"])])
  out += ["## Similarity metrics (sere S=2, rho=0)", ""]
  metric_rows = [[g, r["metric"], r["distinct"], r["delta_ppl_pct"], r["agreement"]]
                 for g in s["batch_sizes"] for r in data["comparisons"]["metrics"][str(g)]]
  out += _table(["batch size", "metric", "distinct/layer", "Δppl %", "agreement"],
                metric_rows)
  return "\n".join(out)


def plot(path: str, data: dict[str, Any]) -> None:
  """Δppl % against distinct experts, one panel per batch size, one marker per family."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  sizes = data["settings"]["batch_sizes"]
  policies = list(dict.fromkeys(r["policy"] for r in data["results"]))
  markers = "o^sDvP*Xh"
  fig, axes = plt.subplots(1, len(sizes), figsize=(4.5 * len(sizes), 4), squeeze=False)
  for ax, g in zip(axes[0], sizes):
    rows = [r for r in data["results"] if r["batch_size"] == g]
    for i, policy in enumerate(policies):
      pts = [(r["distinct"], r["delta_ppl_pct"]) for r in rows if r["policy"] == policy]
      if pts:
        ax.scatter(*zip(*pts), marker=markers[i % len(markers)], color=f"C{i}",
                   label=policy, zorder=3 if policy == "none" else 2)
    ax.set_title(f"batch size {g}")
    ax.set_xlabel("distinct experts per layer")
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel("perplexity increase vs none (%)")
  axes[0][-1].legend(fontsize=8)
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=100)
  plt.close(fig)
  fileio.write_atomic(path, buf.getvalue())


def main(argv: list[str]) -> None:
  del argv
  model_dir = _MODEL_DIR.value
  try:
    batch_sizes = [int(g) for g in _BATCH_SIZES.value]
  except ValueError as e:
    raise app.UsageError(f"--batch_sizes must be integers: {e}") from e
  if not batch_sizes or min(batch_sizes) < 1:
    raise app.UsageError("--batch_sizes must be integers >= 1")
  try:
    specs = policy_spec.parse_list(_POLICIES.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  needs_text = sorted({s.metric for s in specs if s.metric not in (None, "weights")})
  if needs_text and not _METRICS_TEXT.value:
    raise app.UsageError(f"--metrics_text is required for the metrics {needs_text}")
  mesh = cli.expert_mesh(_EXPERT_DEVICES.value)
  out = _OUT.value
  cli.check_outputs([f"{out}.json", f"{out}.md",
                     f"{out}_pareto.png" if _PLOT.value else None],
                    overwrite=_OVERWRITE.value, flag="--out")

  model = checkpoint.load_model(model_dir, param_dtype=jnp.dtype(_PARAM_DTYPE.value),
                                impl=_IMPL.value)
  if mesh is not None:
    moe.set_expert_parallel(model, mesh)
  tokenizer = hf_import.load_tokenizer(model_dir)
  vocab = model.config.vocab_size
  tokens = _windows(_TEXT.value, tokenizer, _SEQ_LEN.value, _NUM_SEQ.value, batch_sizes,
                    vocab, "perplexity windows")
  prompts = None
  if _GREEDY_PROMPTS.value > 0 and _GREEDY_TOKENS.value > 0:
    prompts = _windows(_TEXT.value, tokenizer, _PROMPT_LEN.value, _GREEDY_PROMPTS.value,
                       batch_sizes, vocab, "greedy prompts")
  logging.info("%d policy specs x %d batch sizes over %s windows of %d tokens",
               len(specs), len(batch_sizes), len(tokens), _SEQ_LEN.value)

  runs = len(specs) + (0 if any(s.policy == "none" for s in specs) else 1)  # adds none
  bar = cli.progress(total=runs * len(batch_sizes), desc="evaluating", unit="config")

  def log(fmt: str, *args: Any) -> None:
    """evaluate_grid's progress messages to absl INFO; each finished (batch size, spec)
    configuration ("config i/n ...") also advances the bar."""
    logging.info(fmt, *args)
    if fmt.startswith("config "):
      bar.update(1)

  rows = evaluation.evaluate_grid(
      model, specs, batch_sizes, tokens, max_tokens=_MAX_TOKENS.value, prompts=prompts,
      greedy_tokens=_GREEDY_TOKENS.value, task=_task(tokenizer, model_dir),
      similarity_for=_calibrator(model, tokenizer), log=log)
  bar.close()
  data = {
      "command": _COMMAND.value or " ".join(sys.argv),
      "environment": benchmarking.environment(),
      "model": _model_summary(model, model_dir),
      "settings": {
          "text": _TEXT.value, "seq_len": _SEQ_LEN.value, "num_sequences": len(tokens),
          "batch_sizes": batch_sizes, "policies": [s.text for s in specs],
          "metrics_text": _METRICS_TEXT.value,
          "calibration_tokens": _CALIB_TOKENS.value,
          "greedy_prompts": 0 if prompts is None else len(prompts),
          "prompt_len": _PROMPT_LEN.value, "greedy_tokens": _GREEDY_TOKENS.value,
          "task_file": _TASK_FILE.value, "task_scoring": _TASK_SCORING.value,
          "task_max_tokens": _TASK_MAX_TOKENS.value, "max_tokens": _MAX_TOKENS.value,
          "impl": _IMPL.value, "param_dtype": _PARAM_DTYPE.value,
      },
      "results": rows,
      "comparisons": evaluation.comparisons(rows, batch_sizes, FAMILIES),
  }
  fileio.write_all_atomic({f"{out}.json": json.dumps(data, indent=2).encode(),
                           f"{out}.md": markdown(data).encode()})
  if _PLOT.value:
    plot(f"{out}_pareto.png", data)
  print(f"wrote {out}.json and {out}.md" + (f" and {out}_pareto.png" if _PLOT.value else ""))


def run() -> None:
  """Console-script entry point (`sere-evaluate`)."""
  cli.run(main)


if __name__ == "__main__":
  run()

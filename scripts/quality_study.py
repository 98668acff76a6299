r"""Does re-routing keep quality? Every policy at equal distinct experts, per model.

    python -m sere_jax.scripts.quality_study \
        --model_dir=checkpoints/fine_grained_moe,checkpoints/upcycled_moe \
        --heldout_dir=checkpoints/quality_heldout --out_dir=docs/results

For each model and decode batch size B (`--batch_sizes`), one teacher-forced forward
per policy spec over held-out windows of every domain (B sequences re-route together
at each position, as when decoding them): `none`; SERE at S = 1..3 with rho = 0 and a
per-layer rho sweep; the controls at the same S (truncation with and without
renormalisation, keep-active with and without, a random substitute over
`--random_seeds` seeds, OEA), the per-token oracle ceiling, the SERE/router-score
hybrid, and the expert pool at pool sizes D equal to SERE's distinct experts. Writes
`quality_<model>.json` (rows, paired comparisons of SERE against each control at the
same S, the command), `quality_<model>.md`, `quality_<model>_pareto.png` and
`quality_summary.json` (one row per model, B and policy).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import tokenizers

from sere_jax import calibration
from sere_jax import checkpoint
from sere_jax import cli
from sere_jax import corpus
from sere_jax import fileio
from sere_jax import model_card
from sere_jax import moe
from sere_jax import policy_spec
from sere_jax.evaluation import metrics
from sere_jax.evaluation import study
from sere_jax.evaluation import study_report
from sere_jax.evaluation.runner import reference

_MODELS = flags.DEFINE_list("model_dir", None, "Model directories (HF layout with "
                            "similarity and pool statistics).", required=True)
_HELDOUT = flags.DEFINE_string("heldout_dir", None, "Held-out texts: <domain>.txt (or "
                               "<domain>.txt.xz) per domain, documents separated by "
                               "<|endoftext|>.",
                               required=True)
_OUT = flags.DEFINE_string("out_dir", "docs/results", "Where the result files go.")
_BATCHES = flags.DEFINE_list("batch_sizes", ["8", "16", "32", "64"], "Decode batch sizes.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 128, "Tokens per window.")
_PER_DOMAIN = flags.DEFINE_integer("per_domain", 64, "Windows per domain.")
_SEEDS = flags.DEFINE_integer("random_seeds", 5, "Seeds of the random substitute.")
_THREADS = flags.DEFINE_integer("compile_threads", 16, "Parallel compilations.")
_GREEDY = flags.DEFINE_integer("greedy_tokens", 32, "Tokens each spec generates freely "
                               "(greedy) after the first seq_len - greedy_tokens of every "
                               "window, scored by agreement with `none`'s; 0: off.")
_SPECS = flags.DEFINE_list("specs", [], "Policy specs to run instead of the built-in grid "
                           "(`none` is added; expert pools follow SERE rows that use the "
                           "stored similarity).")
_METRICS = flags.DEFINE_list("metrics", [], "Similarity metrics for which SERE at every S "
                             "is added (`sere:S:0:METRIC`), calibrated on --calibration_dir.")
_CALIBRATION = flags.DEFINE_string("calibration_dir", None, "<domain>.txt (or "
                                   "<domain>.txt.xz) documents to calibrate --metrics on "
                                   "(the validation split).")
_CAL_WINDOWS = flags.DEFINE_integer("calibration_windows", 100, "Calibration windows of "
                                    "128 tokens per domain.")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Only re-render the Markdown and "
                                 "plots from the JSON files already in --out_dir.")
_MERGE = flags.DEFINE_list("merge", [], "With --report_only: study JSON files (runs of the "
                           "same models on other machines or batch sizes) merged into "
                           "--out_dir's `quality_<model>.json`; each batch size's rows "
                           "come from the first file listed that has it.")


def grid(top_k: int, seeds: int) -> list[policy_spec.PolicySpec]:
  """The policy specs of the study for a top-`top_k` model (expert pools come later)."""
  texts = ["none"]
  for s in range(1, min(3, top_k - 1) + 1):
    texts += [f"sere:{s}", f"topk_truncate:{s}:renorm", f"topk_truncate:{s}:raw",
              f"keep_active:{s}:renorm", f"keep_active:{s}:raw", f"oea:{s}",
              f"oracle:{s}", f"sere_hybrid:{s}:0:0.5"]
    texts += [f"random:{s}:seed{k}" for k in range(seeds)]
  texts += ["sere:2:q0.25", "sere:2:q0.5", "sere:2:q0.75"]
  return policy_spec.parse_list(texts)


def _specs(top_k: int) -> list[policy_spec.PolicySpec]:
  specs = (policy_spec.parse_list(["none"] + [t for t in _SPECS.value if t != "none"])
           if _SPECS.value else grid(top_k, _SEEDS.value))
  extra = [f"sere:{s}:0:{m}" for m in _METRICS.value
           for s in range(1, min(3, top_k - 1) + 1)]
  return specs + policy_spec.parse_list(extra)


def _metric_matrices(model, tokenizer) -> dict[str, list[np.ndarray]]:
  if not _METRICS.value:
    return {}
  if not _CALIBRATION.value:
    raise ValueError("--metrics needs --calibration_dir")
  documents = corpus.read_documents(_CALIBRATION.value)
  tokens = study.study_data(tokenizer, documents, seq_len=128,
                            per_domain=_CAL_WINDOWS.value).tokens
  batches = [tokens[i:i + 32] for i in range(0, tokens.shape[0], 32)]
  return {m: [np.asarray(x) for x in calibration.calibrate(
      model, batches, m, token_budget=tokens.size)] for m in _METRICS.value}


def _random_mean(rows, outcomes, ref, data, group):
  """One row per S averaging the random seeds' NLL per position."""
  out = []
  by_s: dict[int, list[int]] = {}
  for i, r in enumerate(rows):
    if r["policy"] == "random":
      by_s.setdefault(r["select_top_k"], []).append(i)
  for s, idx in by_s.items():
    mean = study.Outcome(np.mean([outcomes[i].nll for i in idx], axis=0),
                         outcomes[idx[0]].correct, outcomes[idx[0]].agree,
                         np.mean([outcomes[i].kl for i in idx], axis=0),
                         np.mean([outcomes[i].stats for i in idx], axis=0))
    r = study.row(policy_spec.parse(f"random:{s}"), group, mean, ref, data)
    accs = [rows[i]["task_accuracy"] for i in idx]
    counts = [study.answers_correct(outcomes[i].correct, data.answer) for i in idx]
    right, total = sum(c[0] for c in counts), sum(c[1] for c in counts)
    r.update(spec=f"random:{s}:mean{len(idx)}", label=f"random S={s} ({len(idx)} seeds)",
             seeds=len(idx), task_accuracy=float(np.mean(accs)),
             task_accuracy_ci=list(study.ratio_ci(right, total)),
             task_accuracy_seed_range=[min(accs), max(accs)],
             agreement=float(np.mean([rows[i]["agreement"] for i in idx])))
    if "greedy_prefix" in rows[idx[0]]:
      prefixes = np.mean([metrics.agreeing_prefix(ref.continuation,
                                                outcomes[i].continuation)
                          for i in idx], axis=0)
      r.update(greedy_match=float(np.mean([rows[i]["greedy_match"] for i in idx])),
               greedy_prefix=float(prefixes.mean()),
               greedy_prefix_ci=list(metrics.bootstrap_ci(prefixes)))
    out.append((r, mean))
  return out


def _versus(rows, outcomes, data) -> list[dict[str, Any]]:
  """SERE minus each control at the same S, and each `sere_ep` minus the `sere` of the
  same S, rho and placement and minus the `sere` of rho = 0 (whose busiest device holds
  exactly `sere_ep`'s budget): paired intervals over sequences."""
  found = {r["spec"]: (r, o) for r, o in zip(rows, outcomes)}
  pairs = []
  for spec, (r, _) in found.items():
    if r["policy"] == "sere_ep":
      ep = policy_spec.parse(spec)
      same_rho = dataclasses.replace(ep, policy="sere").text
      budget = dataclasses.replace(ep, policy="sere", threshold=0.0, quantile=None).text
      pairs += [(spec, twin) for twin in dict.fromkeys([same_rho, budget]) if twin in found]
    if r["policy"] != "sere" or ":q" in spec:
      continue
    for other, (r2, _) in found.items():
      if (r2["policy"] in ("sere", "sere_ep", "none") or r2.get("seed")
          or r2["select_top_k"] != r["select_top_k"]):
        continue
      if r2["policy"] == "random" and "mean" not in other:
        continue
      pairs.append((spec, other))
  result = []
  for spec, other in pairs:
    (r, o), (r2, o2) = found[spec], found[other]
    greedy = {}
    prefix_a, prefix_b = _prefixes(found, spec), _prefixes(found, other)
    if prefix_a is not None and prefix_b is not None:
      greedy = {"greedy_prefix_delta": float(np.mean(prefix_a - prefix_b)),
                "greedy_prefix_delta_ci": list(metrics.bootstrap_ci(prefix_a - prefix_b))}
    low, high = metrics.paired_bootstrap_delta_ppl_ci(o.nll, o2.nll)
    right_a, total = study.answers_correct(o.correct, data.answer)
    right_b, _ = study.answers_correct(o2.correct, data.answer)
    acc = study.paired_ratio_delta_ci(right_a, right_b, total)
    result.append({
        "sere": spec, "control": other, "batch_size": r["batch_size"],
        "distinct": [r["distinct_per_layer"], r2["distinct_per_layer"]],
        "max_device_distinct": [r["max_device_distinct_per_layer"],
                                r2["max_device_distinct_per_layer"]],
        "sere_vs_control_ppl_pct": 100.0 * np.expm1(o.nll.mean() - o2.nll.mean()),
        "ci": [low, high],
        "verdict": "sere better" if high < 0 else "sere worse" if low > 0
                   else "no difference",
        "task_accuracy_delta_points_ci": list(acc), **greedy})
  return result


def _prefixes(found, spec) -> np.ndarray | None:
  """Per sequence, how many greedy tokens of `spec` agree with `none`'s before the first
  difference (a random mean row: the mean over its seeds); None without continuations."""
  none = found.get("none", (None, None))[1]
  if none is None or none.continuation is None:
    return None
  r, o = found[spec]
  if o.continuation is not None:
    return metrics.agreeing_prefix(none.continuation, o.continuation).astype(np.float64)
  if r["policy"] != "random" or "mean" not in spec:
    return None
  seeds = [o2 for s2, (r2, o2) in found.items() if r2["policy"] == "random"
           and "mean" not in s2 and r2["select_top_k"] == r["select_top_k"]]
  return np.mean([metrics.agreeing_prefix(none.continuation, o2.continuation)
                  for o2 in seeds], axis=0)


def _study_model(model_dir: str, documents, log, partial) -> dict[str, Any]:
  model = checkpoint.load_model(model_dir, impl="xla_dense")
  tokenizer = tokenizers.Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
  data = study.study_data(tokenizer, documents, seq_len=_SEQ_LEN.value,
                          per_domain=_PER_DOMAIN.value)
  top_k = moe.moe_blocks(model)[0].top_k
  t0 = time.time()
  ref = reference(model, data.tokens, max_tokens=data.tokens.size)
  ref_logp = jnp.asarray(ref.logp)
  specs = _specs(top_k)
  metric_matrices = _metric_matrices(model, tokenizer)
  log(f"{os.path.basename(model_dir)}: reference and calibration in "
      f"{time.time() - t0:.0f} s")
  rows, versus = [], []
  for group in [int(b) for b in _BATCHES.value]:
    t0 = time.time()
    with cli.progress(total=len(specs), desc=f"B={group} (compiled first)",
                      unit="spec") as bar:
      outcomes = study.run_grid(model, specs, group, data, ref_logp,
                                threads=_THREADS.value, metric_matrices=metric_matrices,
                                greedy_tokens=_GREEDY.value,
                                progress=lambda _: bar.update(1))
    none = outcomes[0]
    group_rows = [study.row(s, group, o, none, data) for s, o in zip(specs, outcomes)]
    sere_distinct = sorted({round(r["distinct_per_layer"]) for r, s in zip(group_rows, specs)
                            if s.policy == "sere" and s.quantile is None
                            and s.metric is None})
    pools = policy_spec.parse_list([f"expert_pool:{max(d, 1)}" for d in sere_distinct])
    pool_out = study.run_grid(model, pools, group, data, ref_logp, threads=_THREADS.value,
                              greedy_tokens=_GREEDY.value)
    group_rows += [study.row(s, group, o, none, data) for s, o in zip(pools, pool_out)]
    outcomes += pool_out
    for r, o in _random_mean(group_rows, outcomes, none, data, group):
      group_rows.append(r)
      outcomes.append(o)
    versus += _versus(group_rows, outcomes, data)
    rows += group_rows
    log(f"{os.path.basename(model_dir)} B={group}: {len(group_rows)} rows in "
        f"{time.time() - t0:.0f} s")
    result = {"model": os.path.basename(os.path.normpath(model_dir)), "rows": rows,
              "sere_vs_controls": versus, "top_k": top_k,
              "num_experts": moe.moe_blocks(model)[0].num_experts,
              "data": {"seq_len": _SEQ_LEN.value, "per_domain": _PER_DOMAIN.value,
                       "domains": sorted(set(data.domains)),
                       "task_answers": int((data.answer.max(axis=1)).sum())},
              "command": model_card.command_line(),
              "device": jax.devices()[0].device_kind}
    partial(result)
  return result


def _render(result: dict[str, Any]) -> None:
  base = os.path.join(_OUT.value, f"quality_{result['model']}")
  fileio.write_atomic(base + ".md", study_report.markdown(result))
  study_report.pareto_png(result, base + "_pareto.png")


def _summary_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
  keys = ("batch_size", "policy", "distinct_per_layer", "ppl_delta_pct", "ppl_delta_ci",
          "task_accuracy", "task_accuracy_ci")
  return [{"model": result["model"], "spec": r["spec"], **{k: r[k] for k in keys}}
          for r in result["rows"]]


def main(argv):
  del argv
  names = [os.path.basename(os.path.normpath(m)) for m in _MODELS.value]
  results = []
  if _REPORT_ONLY.value:
    runs: dict[str, list[tuple[str, dict[str, Any]]]] = {name: [] for name in names}
    for path in _MERGE.value:
      with open(path) as fh:
        run = json.load(fh)
      if run["model"] not in runs:
        raise ValueError(f"{path} is a study of {run['model']!r}, not of {names}")
      runs[run["model"]].append((path, run))
    for name in names:
      if not runs[name]:
        raise ValueError(f"no --merge file holds a study of {name!r}")
      result = study_report.merge_runs(runs[name])
      fileio.write_json_atomic(os.path.join(_OUT.value, f"quality_{name}.json"), result,
                               compact=True)
      results.append(result)
  else:
    if not 0 <= _GREEDY.value < _SEQ_LEN.value:
      raise ValueError(f"--greedy_tokens must be in [0, --seq_len={_SEQ_LEN.value}), got "
                       f"{_GREEDY.value}")
    for model_dir in _MODELS.value:
      if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"no model directory {model_dir}")
    documents = corpus.read_documents(_HELDOUT.value)
    os.makedirs(_OUT.value, exist_ok=True)
    for model_dir, name in zip(_MODELS.value, names):
      path = os.path.join(_OUT.value, f"quality_{name}.json")
      results.append(_study_model(
          model_dir, documents, print,
          lambda result, path=path: fileio.write_json_atomic(path, result, compact=True)))
  for result in results:
    _render(result)
  summary = [row for result in results for row in _summary_rows(result)]
  fileio.write_json_atomic(os.path.join(_OUT.value, "quality_summary.json"), summary,
                           compact=True)
  print(json.dumps({"rows": len(summary)}))


def run() -> None:
  """Entry point of `python -m sere_jax.scripts.quality_study`."""
  cli.run(main)


if __name__ == "__main__":
  run()

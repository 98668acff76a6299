"""Markdown tables and the Pareto plot of a quality-study result (`study`'s rows), and
the merge of several runs of one model into one result."""

from __future__ import annotations

from typing import Any

FAMILY_ORDER = ("sere", "topk_truncate", "keep_active", "random", "oea", "sere_hybrid",
                "expert_pool", "oracle")


def _ci(ci) -> str:
  return f"[{ci[0]:+.2f}, {ci[1]:+.2f}]"


def _shown(row: dict[str, Any]) -> bool:
  """Rows of the tables: every spec but the single random seeds (their mean is shown)."""
  return not (row["policy"] == "random" and "mean" not in row["spec"])


def markdown(result: dict[str, Any]) -> str:
  """The study of one model as Markdown: a table per batch size and the paired
  comparisons of SERE against each control at the same S."""
  data = result["data"]
  lines = [
      f"# Quality under re-routing: `{result['model']}`", "",
      f"{result['num_experts']} experts, top-{result['top_k']}. Held-out windows of "
      f"{data['seq_len']} tokens, {data['per_domain']} per domain "
      f"({', '.join(data['domains'])}), interleaved so that every decode batch mixes "
      f"domains; {data['task_answers']} task answers. Teacher forced with re-routing per "
      "position among the B sequences of a batch. Δppl: perplexity change against `none` "
      "with a paired bootstrap 95 % interval over sequences; task: exact-match accuracy of "
      "the synthetic tasks' answers (the answer equals greedy decoding's) with its "
      "interval." + (
          f" Greedy: free-running decoding of {result['rows'][0]['greedy_tokens']} tokens "
          "after each window's first tokens; prefix: mean tokens until the first that "
          "differs from `none`'s continuation (bootstrap 95 % interval); same: share of "
          "continuations equal to `none`'s." if "greedy_tokens" in result["rows"][0]
          else ""), ""]
  if "sources" in result:
    lines += ["Runs merged here (each batch size from the first run that has it):", ""]
    for src in result["sources"]:
      lines += [f"- `{src['file']}` ({src['device'] or 'device not recorded'}; "
                f"B = {', '.join(map(str, src['batch_sizes'])) or 'none used'}):",
                "  ```", f"  {src['command']}", "  ```"]
    lines.append("")
  else:
    lines += ["Command:", "```", result["command"], "```", ""]
  for group in sorted({r["batch_size"] for r in result["rows"]}):
    rows = [r for r in result["rows"] if r["batch_size"] == group and _shown(r)]
    domains = sorted(rows[0]["per_domain"])
    # Rows of policies placed on expert-parallel devices add the busiest device's count.
    placed = any(r.get("expert_devices") for r in rows)
    # Runs with free-running decoding add the greedy continuation's agreement.
    greedy = all("greedy_prefix" in r for r in rows)
    lines += [f"## B = {group}", "",
              "| policy | distinct/layer | " + ("max/device | " if placed else "") +
              "Δppl % | 95 % CI | " + " | ".join(f"Δppl {d}" for d in domains) +
              " | agreement | " + ("greedy prefix [CI] | greedy same | " if greedy else "")
              + "task acc | task CI |",
              "|---" * (7 + placed + 2 * greedy + len(domains)) + "|"]
    for r in sorted(rows, key=lambda r: (-r["distinct_per_layer"], r["spec"])):
      device = (f"{r['max_device_distinct_per_layer']:.2f} | "
                if placed and r.get("expert_devices") else "- | " if placed else "")
      lines.append(
          f"| `{r['spec']}` | {r['distinct_per_layer']:.2f} | {device}"
          f"{r['ppl_delta_pct']:+.2f} | "
          f"{_ci(r['ppl_delta_ci'])} | " +
          " | ".join(f"{r['per_domain'][d]['ppl_delta_pct']:+.2f}" for d in domains) +
          f" | {r['agreement']:.3f} | " +
          (f"{r['greedy_prefix']:.1f} [{r['greedy_prefix_ci'][0]:.1f}, "
           f"{r['greedy_prefix_ci'][1]:.1f}] | {r['greedy_match']:.3f} | " if greedy else "")
          + f"{r['task_accuracy']:.3f} | "
          f"[{r['task_accuracy_ci'][0]:.3f}, {r['task_accuracy_ci'][1]:.3f}] |")
    lines.append("")
  placed = any(r.get("expert_devices") for r in result["rows"])
  greedy_versus = any("greedy_prefix_delta" in v for v in result["sere_vs_controls"])
  lines += ["## SERE against each control at the same S (equal distinct experts)", "",
            "Perplexity of SERE relative to the control (negative: SERE better), paired "
            "bootstrap 95 % interval over sequences; a difference inside the interval is "
            "no difference." + (" Each `sere_ep` row is compared with the `sere` of the "
                                "same ρ and with `sere` at ρ = 0, whose busiest device "
                                "holds exactly `sere_ep`'s budget." if placed else "") +
            (" Greedy prefix Δ: SERE's free-running tokens agreeing with `none`'s minus "
             "the control's, paired over sequences (positive: SERE stays with `none` "
             "longer)." if greedy_versus else ""), "",
            "| B | SERE | control | distinct (SERE, control) | " +
            ("max/device (SERE, control) | " if placed else "") +
            "SERE vs control % | 95 % CI | verdict | task Δ points CI |" +
            (" greedy prefix Δ tokens [CI] |" if greedy_versus else ""),
            "|---" * (8 + placed + greedy_versus) + "|"]
  for v in result["sere_vs_controls"]:
    device = (f"{v['max_device_distinct'][0]:.2f}, {v['max_device_distinct'][1]:.2f} | "
              if placed else "")
    greedy = ""
    if greedy_versus:
      greedy = (f" {v['greedy_prefix_delta']:+.2f} {_ci(v['greedy_prefix_delta_ci'])} |"
                if "greedy_prefix_delta" in v else " |")
    lines.append(
        f"| {v['batch_size']} | `{v['sere']}` | `{v['control']}` | "
        f"{v['distinct'][0]:.2f}, {v['distinct'][1]:.2f} | {device}"
        f"{v['sere_vs_control_ppl_pct']:+.2f} | {_ci(v['ci'])} | {v['verdict']} | "
        f"{_ci(v['task_accuracy_delta_points_ci'])} |" + greedy)
  return "\n".join(lines) + "\n"


def pareto_png(result: dict[str, Any], path: str) -> bool:
  """Distinct experts vs Δppl per policy family, one panel per batch size. Returns
  False (and writes nothing) when matplotlib is missing."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  groups = sorted({r["batch_size"] for r in result["rows"]})
  fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.8), squeeze=False)
  for ax, group in zip(axes[0], groups):
    rows = [r for r in result["rows"] if r["batch_size"] == group and _shown(r)]
    none = next(r for r in rows if r["policy"] == "none")
    for family in FAMILY_ORDER:
      pts = sorted((r["distinct_per_layer"], r["ppl_delta_pct"], r["ppl_delta_ci"])
                   for r in rows if r["policy"] == family)
      if not pts:
        continue
      xs, ys = [p[0] for p in pts], [p[1] for p in pts]
      err = [[p[1] - p[2][0] for p in pts], [p[2][1] - p[1] for p in pts]]
      ax.errorbar(xs, ys, yerr=err, marker="o", ms=3, capsize=2, lw=1, label=family)
    ax.axvline(none["distinct_per_layer"], color="grey", lw=0.8, ls=":")
    ax.set_title(f"B = {group}")
    ax.set_xlabel("distinct experts per layer")
    ax.set_yscale("symlog", linthresh=1.0)
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel("Δ perplexity vs none (%)")
  axes[0][-1].legend(fontsize=7)
  fig.suptitle(result["model"])
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def merge_runs(runs: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
  """One result from several runs of one model: rows and comparisons per batch size
  from the first run that has it, each tagged with its source file."""
  merged = dict(runs[0][1], rows=[], sere_vs_controls=[], sources=[])
  merged.pop("command", None)
  taken: set[int] = set()
  for path, run in runs:
    groups = sorted({r["batch_size"] for r in run["rows"]} - taken)
    merged["sources"].append({"file": path, "command": run["command"],
                              "device": run.get("device"), "batch_sizes": groups})
    merged["rows"] += [dict(r, source=path) for r in run["rows"] if r["batch_size"] in groups]
    merged["sere_vs_controls"] += [v for v in run["sere_vs_controls"]
                                   if v["batch_size"] in groups]
    taken.update(groups)
  merged["command"] = "; ".join(s["command"] for s in merged["sources"])
  return merged

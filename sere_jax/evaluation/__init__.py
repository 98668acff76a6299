"""Quality of SERE and its baselines against top-K routing (`none`), in batched decoding.

    specs = policy_spec.parse_list(["none", "sere:2:0.3", "topk_truncate:2"])
    ref = reference(model, tokens, max_tokens=8192)          # `none` log-probs, once
    matrices = stored_similarity(model)
    configure(model, layer_configs(specs[1], matrices, len(matrices)), 16, matrices)
    result = teacher_forced(model, tokens, 16, ref, max_tokens=8192)
    result.perplexity, result.agreement, result.kl, result.distinct

    rows = evaluate_grid(model, specs, [1, 4, 16], tokens, max_tokens=8192,
                         prompts=prompts, greedy_tokens=32)   # one JSON row per pair
    comparisons(rows, [1, 4, 16])

By job: `data` (token windows, tasks), `metrics` (exact match, task scoring, bootstrap
intervals), `runner` (teacher forcing, greedy decoding, the grid) and `report` (a grid's
rows, curves and comparisons at equal distinct-expert counts). Policies are named by
`sere_jax.policy_spec` strings (`sere:2:0.3`, ...).
"""

from sere_jax.evaluation.data import (Task, chunk_sequences, divisible_count, load_task,
                                      read_stream, token_windows)
from sere_jax.evaluation.metrics import (SCORERS, TASK_SCORING, bootstrap_ci, cut_at_stop,
                                         exact_match, last_number,
                                         paired_bootstrap_accuracy_delta_ci,
                                         paired_bootstrap_delta_ppl_ci, score_answers,
                                         score_exact, score_gsm8k)
from sere_jax.evaluation.report import (best_at, comparison_family, comparisons, curve,
                                        equal_distinct, grid_row, interpolate)
from sere_jax.evaluation.runner import (STAT_FIELDS, Reference, TeacherForced, configure,
                                        evaluate_grid, greedy, reference, stored_similarity,
                                        task_accuracy, teacher_forced)

__all__ = [
    "SCORERS", "STAT_FIELDS", "TASK_SCORING", "Reference", "Task", "TeacherForced",
    "best_at", "bootstrap_ci", "chunk_sequences", "comparison_family", "comparisons",
    "configure", "curve", "cut_at_stop", "divisible_count", "equal_distinct",
    "evaluate_grid", "exact_match", "greedy", "grid_row", "interpolate", "last_number",
    "load_task", "paired_bootstrap_accuracy_delta_ci", "paired_bootstrap_delta_ppl_ci",
    "read_stream", "reference", "score_answers", "score_exact", "score_gsm8k",
    "stored_similarity", "task_accuracy", "teacher_forced", "token_windows",
]

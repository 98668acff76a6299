r"""Demo: SERE re-routing on one synthetic MoE layer, against its baselines.

  python -m sere_jax.scripts.demo [--batch=16 --select_top_k=2 --threshold=0.5]

Builds an MoE layer whose experts come in families (each expert is a perturbed
copy of one of a few prototypes, as similar experts are in fine-grained MoEs) and a
router that scores the experts of a token's family high. The expert similarity is
calibrated as in the paper's reference code (cosine of expert outputs on sample
tokens). One decode batch then goes through the MoE op under every policy; the table
shows distinct experts read, slots re-routed, critical experts kept and the output's
error relative to the original top-K routing. `--json_out` writes the table as JSON.
"""

from __future__ import annotations

import json
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from sere_jax import RerouteConfig, route
from sere_jax.kernels import moe_ffn as moe_ffn_lib

_BATCH = flags.DEFINE_integer("batch", 16, "Tokens in the decode batch.")
_EXPERTS = flags.DEFINE_integer("experts", 32, "Routed experts E.")
_FAMILIES = flags.DEFINE_integer("families", 8, "Prototype experts the experts derive from.")
_TOP_K = flags.DEFINE_integer("top_k", 4, "Experts per token K.")
_SELECT = flags.DEFINE_integer("select_top_k", 2, "Primary experts per token S.")
_THRESHOLD = flags.DEFINE_float("threshold", 0.6, "Critical-expert threshold rho of `sere`.")
_DIM = flags.DEFINE_integer("dim", 64, "Model width D.")
_FFN = flags.DEFINE_integer("ffn", 48, "Expert hidden width F (not a power of two on purpose).")
_IMPL = flags.DEFINE_string("impl", "auto", "MoE op implementation (see moe_ffn.IMPLS).")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Optional path for the results as JSON.")


def synthetic_layer(key, experts, families, dim, ffn):
  """Expert weights in families, plus each expert's family id."""
  k_proto, k_noise, k_fam = jax.random.split(key, 3)
  family = jax.random.randint(k_fam, (experts,), 0, families)
  proto_gu = jax.random.normal(k_proto, (families, dim, 2 * ffn)) * dim ** -0.5
  proto_d = jax.random.normal(jax.random.fold_in(k_proto, 1), (families, ffn, dim)) * ffn ** -0.5
  noise_gu = jax.random.normal(k_noise, (experts, dim, 2 * ffn)) * dim ** -0.5
  noise_d = jax.random.normal(jax.random.fold_in(k_noise, 1), (experts, ffn, dim)) * ffn ** -0.5
  w_gate_up = proto_gu[family] + 0.5 * noise_gu
  w_down = proto_d[family] + 0.5 * noise_d
  return w_gate_up, w_down, family


def calibrate_cosine(x, w_gate_up, w_down):
  """Expert similarity as the reference code's cosine metric: mean over tokens of
  cos(expert p output, expert q output), mapped to (c + 1) / 2, diagonal 1."""
  hidden = moe_ffn_lib.swiglu(jnp.einsum("td,edf->etf", x, w_gate_up))
  out = jnp.einsum("etf,efd->etd", hidden, w_down)
  out = out / jnp.linalg.norm(out, axis=-1, keepdims=True)
  cos = jnp.einsum("ptd,qtd->pq", out, out) / x.shape[0]
  sim = (cos + 1) / 2
  return sim.at[jnp.diag_indices(sim.shape[0])].set(1.0)


def main(argv):
  del argv
  key = jax.random.PRNGKey(_SEED.value)
  e, k, d, f = _EXPERTS.value, _TOP_K.value, _DIM.value, _FFN.value
  w_gate_up, w_down, family = synthetic_layer(key, e, _FAMILIES.value, d, f)
  calib = jax.random.normal(jax.random.fold_in(key, 7), (256, d))
  similarity = calibrate_cosine(calib, w_gate_up, w_down)
  x = jax.random.normal(jax.random.fold_in(key, 8), (_BATCH.value, d))
  # The router prefers the experts of a token's family, with noise.
  token_family = jax.random.randint(jax.random.fold_in(key, 9), (_BATCH.value,), 0,
                                    _FAMILIES.value)
  logits = (2.0 * (family[None, :] == token_family[:, None])
            + jax.random.normal(jax.random.fold_in(key, 10), (_BATCH.value, e)))
  ids, weights = route(logits, k, normalize=True)
  scores = jax.nn.softmax(logits, axis=-1)

  s, rho = _SELECT.value, _THRESHOLD.value
  configs = [("none", RerouteConfig(policy="none")),
             (f"sere S={s} rho=0", RerouteConfig(policy="sere", select_top_k=s)),
             (f"sere S={s} rho={rho}", RerouteConfig(policy="sere", select_top_k=s,
                                                     threshold=rho)),
             (f"topk_truncate S={s}", RerouteConfig(policy="topk_truncate", select_top_k=s)),
             (f"oea S={s}", RerouteConfig(policy="oea", select_top_k=s)),
             (f"random S={s}", RerouteConfig(policy="random", select_top_k=s, seed=_SEED.value))]
  impl = moe_ffn_lib.resolve_impl(_IMPL.value)
  print(f"MoE layer: E={e} experts in {_FAMILIES.value} families, top-{k}, D={d}, F={f}; "
        f"batch of {_BATCH.value} tokens; impl={impl} on {jax.default_backend()}")
  off_diag = np.asarray(similarity)[~np.eye(e, dtype=bool)]
  print(f"calibrated cosine similarity: off-diagonal mean {off_diag.mean():.3f}, "
        f"max {off_diag.max():.3f}\n")
  results, reference = [], None
  for name, config in configs:
    start = time.perf_counter()
    out = moe_ffn_lib.moe_ffn(x, ids, weights, w_gate_up, w_down, similarity=similarity,
                              config=config, router_scores=scores, renormalize=True,
                              impl=impl)
    y = np.asarray(jax.block_until_ready(out.y))
    seconds = time.perf_counter() - start
    reference = y if reference is None else reference
    rel_err = float(np.linalg.norm(y - reference) / np.linalg.norm(reference))
    results.append(dict(policy=name, distinct=int(out.stats.distinct_after),
                        slots_rerouted=int(out.stats.slots_rerouted),
                        critical_kept=int(out.stats.critical_kept),
                        rel_error_vs_none=rel_err, seconds=seconds))
  header = f"{'policy':24s} {'distinct':>8s} {'rerouted':>8s} {'critical':>8s} {'rel.err':>8s}"
  print(header)
  print("-" * len(header))
  for r in results:
    print(f"{r['policy']:24s} {r['distinct']:8d} {r['slots_rerouted']:8d} "
          f"{r['critical_kept']:8d} {r['rel_error_vs_none']:8.3f}")
  print("\ndistinct = experts whose weights the step reads; rel.err = ||y - y_none|| / "
        "||y_none||.")
  by_name = {r["policy"]: r for r in results}
  sere, trunc = by_name[f"sere S={s} rho=0"], by_name[f"topk_truncate S={s}"]
  print(f"SERE S={s} reads {sere['distinct']} of the {results[0]['distinct']} experts "
        f"`none` reads, at error {sere['rel_error_vs_none']:.3f}; truncating to top-{s} "
        f"reads {trunc['distinct']} at error {trunc['rel_error_vs_none']:.3f}.")
  if _JSON_OUT.value:
    with open(_JSON_OUT.value + ".tmp", "w") as fh:
      json.dump(results, fh, indent=1)
    import os  # pylint: disable=g-import-not-at-top
    os.replace(_JSON_OUT.value + ".tmp", _JSON_OUT.value)


def run():
  app.run(main)


if __name__ == "__main__":
  run()

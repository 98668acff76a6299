"""Checks the GPU kernels against their references at real shapes on a GPU: the MoE op
with the Triton kernels and with the Mosaic GPU grouped matmul (against the f32 dense
op; its schedule bit for bit) and the decode-attention kernel
(against the model's XLA attention in f32) at Qwen3-30B-A3B / Qwen1.5-MoE head shapes,
and the fused router (against XLA's softmax + top_k).

  python tools/gpu_check.py [BATCH ...]   (prints one line per case; exits 1 on a mismatch)
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np

from sere_jax import RerouteConfig, reroute, route
from sere_jax.kernels.decode_attention.reference import decode_attention_reference
from sere_jax.kernels.decode_attention.triton import decode_attention_triton
from sere_jax.kernels.moe_ffn import moe_ffn
from sere_jax.kernels.router.triton import route_triton
from sere_jax.models import layers
from sere_jax.kernels.schedule.reference import reference_schedule
from sere_jax.kernels.schedule.triton import schedule_triton


def main():
  d, f, e, k = 2048, 768, 128, 8
  key = jax.random.PRNGKey(0)
  kg, kd, kx = jax.random.split(key, 3)
  wg = (jax.random.normal(kg, (e, d, 2 * f), jnp.float32) * d ** -0.5).astype(jnp.bfloat16)
  wd = (jax.random.normal(kd, (e, f, d), jnp.float32) * f ** -0.5).astype(jnp.bfloat16)
  rng = np.random.default_rng(0)
  sim = rng.random((e, e)).astype(np.float32)
  sim = jnp.asarray((sim + sim.T) / 2).at[jnp.arange(e), jnp.arange(e)].set(1.0)
  ok = True
  batches = [int(b) for b in sys.argv[1:]] or [1, 5, 16, 64, 256]
  for batch in batches:
    x = jax.random.normal(kx, (batch, d), jnp.bfloat16)
    ids, w = route(jnp.asarray(rng.normal(size=(batch, e)), jnp.float32), k)
    # Few experts with many rows each: several row blocks per expert in the matmuls.
    few = jnp.asarray(rng.permutation(e)[:8])[(jnp.arange(batch * k) % 8).reshape(batch, k)]
    valid = jnp.asarray(rng.random(batch) < 0.9)
    for name, routed, config in (
        ("none", ids, RerouteConfig(policy="none")),
        ("sere", ids, RerouteConfig(select_top_k=2, threshold=0.3)),
        ("few8", few, RerouteConfig(policy="none"))):
      new_ids, _, _ = reroute(routed, w, valid, sim, config, num_experts=e)
      want = moe_ffn(x.astype(jnp.float32), new_ids, w, wg.astype(jnp.float32),
                     wd.astype(jnp.float32), valid=valid, impl="xla_dense").y
      ref = reference_schedule(routed, w, valid, sim, config, e)
      ker = schedule_triton(routed, valid, sim, config, num_experts=e)
      same = _same_schedule(ker, ref, np.asarray(valid))
      for impl in ("triton", "mosaic_gpu"):
        got = moe_ffn(x, routed, w, wg, wd, valid=valid, similarity=sim, config=config,
                      impl=impl)
        err = float(jnp.linalg.norm(got.y.astype(jnp.float32) - want)
                    / jnp.linalg.norm(want))
        case_ok = err < 2e-2 and same and bool(jnp.array_equal(got.ids, new_ids))
        ok &= case_ok
        print(f"B={batch:4d} {name:5s} {impl:10s} rel_err={err:.2e} schedule_equal={same} "
              f"distinct={int(ker.stats[1])} {'OK' if case_ok else 'MISMATCH'}", flush=True)
    ok &= check_decode_attention(batch, rng)
    ok &= check_router(batch, rng)
  sys.exit(0 if ok else 1)


def check_decode_attention(batch: int, rng: np.random.Generator) -> bool:
  """The kernel in bf16 against the XLA attention in f32: Qwen3-30B-A3B (32 query heads
  over 4 KV heads, q/k norm) and Qwen1.5-MoE (16 over 16, no norm), 160 cache slots,
  left-padded sequences."""
  ok = True
  cache_len, index, head_dim = 160, 137, 128
  for name, heads, kv_heads, qk_norm in (("qwen3", 32, 4, True), ("qwen15", 16, 16, False)):
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.bfloat16)
    start = rng.integers(0, 100, batch)
    slots = np.arange(cache_len)
    args = [normal(batch, heads + 2 * kv_heads, head_dim),  # q, k, v heads in one array
            normal(batch, cache_len, kv_heads, head_dim),
            normal(batch, cache_len, kv_heads, head_dim),
            jnp.asarray((slots >= start[:, None]) & (slots <= index)), jnp.int32(index),
            jnp.asarray(index - start, jnp.int32), layers.rope_inv_freq(head_dim, 1e6)]
    args += ([jnp.asarray(1 + 0.1 * rng.normal(size=head_dim), jnp.float32)] * 2
             if qk_norm else [None, None])
    options = dict(eps=1e-6, scale=head_dim ** -0.5)
    got = decode_attention_triton(*args, **options)
    f32 = [a.astype(jnp.float32) if a is not None and a.dtype == jnp.bfloat16 else a
           for a in args]
    want = decode_attention_reference(*f32, **options)
    rel = lambda g, w: float(jnp.linalg.norm(g.astype(jnp.float32) - w) / jnp.linalg.norm(w))
    # The output, and the new token's key and value in the caches.
    errs = [rel(got[0], want[0])] + [rel(g[:, index], w[:, index])
                                     for g, w in zip(got[1:], want[1:])]
    keep = slots != index  # untouched cache slots stay bit-identical
    same = all(np.array_equal(np.asarray(g)[:, keep], np.asarray(a)[:, keep])
               for g, a in zip(got[1:], args[1:3]))
    case_ok = max(errs) < 2e-2 and same
    ok &= case_ok
    print(f"B={batch:4d} attn-{name} rel_err out/new k/new v={errs[0]:.1e}/{errs[1]:.1e}/"
          f"{errs[2]:.1e} untouched_slots_equal={same} {'OK' if case_ok else 'MISMATCH'}",
          flush=True)
  return ok


def check_router(batch: int, rng: np.random.Generator) -> bool:
  """The fused top-K router against `route` (XLA softmax + top_k), E=128 and 60."""
  ok = True
  for experts, top_k in ((128, 8), (60, 4)):
    logits = jnp.asarray(rng.normal(size=(batch, experts)) * 2, jnp.float32)
    ids, weights = route_triton(logits, top_k, normalize=True)
    want_ids, want_weights = route(logits, top_k, normalize=True)
    same = bool(jnp.array_equal(ids, want_ids))
    err = float(jnp.max(jnp.abs(weights - want_weights)))
    case_ok = same and err < 1e-5
    ok &= case_ok
    print(f"B={batch:4d} router-E{experts} ids_equal={same} max_weight_err={err:.1e} "
          f"{'OK' if case_ok else 'MISMATCH'}", flush=True)
  return ok


def _same_schedule(got, want, valid):
  """Every defined field equal: ids, offsets, active list, stats, rows of valid slots."""
  rows = int(want.stats[4])
  fields = ("ids", "group_offsets", "active_experts", "stats")
  return (all(np.array_equal(getattr(got, n), getattr(want, n)) for n in fields)
          and np.array_equal(np.asarray(got.row_token)[:rows],
                             np.asarray(want.row_token)[:rows])
          and np.array_equal(np.asarray(got.slot_row)[valid],
                             np.asarray(want.slot_row)[valid]))


if __name__ == "__main__":
  main()

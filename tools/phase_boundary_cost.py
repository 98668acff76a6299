"""Times two dependent weight-streaming phases as two kernels and as one, on a GPU.

    python tools/phase_boundary_cost.py OUT.json [SIZES_MB]

A decode layer is a chain of phases that each stream a weight, and each phase needs
the whole previous phase's result. Today every phase is a kernel of its own, and each
costs a fixed part beyond its bytes (`tools/weight_stream_cost.py`). A persistent
layer kernel would instead keep its programs running and wait at a grid-wide barrier
between phases. This tool measures what that changes for the simplest such pair: each
of 128 programs sums its share of a weight `W1` of S MB (default 4, 16, 32), and then
its share of `W2` (S MB) plus the sum of every program's `W1` share, in
`[64, 256]` bf16 tiles (3 pipeline stages). Variants, each in a chain of 8 layers
with their own weights inside one jitted loop (`benchmarking.LayerChain`, carrying
each layer's barrier counters):
  two_kernels       phase 1 and phase 2 as two kernels (the second reads the first's
                    partial sums);
  barrier           one kernel: after phase 1 each program publishes its sum, arrives
                    at a grid-wide barrier (an atomic count; the last to arrive opens
                    it) and waits, then runs phase 2;
  barrier_prefetch  the same, with phase 2's first tile loaded before the wait;
  barrier_count     the barrier as one count that only grows: a program waits until
                    it reaches the next multiple of 128 after its own arrival, then
                    one fence (no reset, no generation, no atomic read);
  neighbour_flag    no barrier: phase 2 of program i adds only program i+1's `W1`
                    sum (mod 128), waiting on that program's flag (a count that only
                    grows) and one fence: a dependency on one other program instead
                    of all of them, as per-tile dataflow would have;
  one_stream        one kernel that streams `W1` and `W2` with no barrier (the bound).
The JSON holds µs per layer (chain update subtracted) and each variant's largest
error against the same sums in jnp. All 128 programs must be resident at once for the
barrier (one per SM); a wait gives up after 2^22 polls and the run then fails.
"""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from sere_jax import benchmarking
from sere_jax import fileio

TOKENS, DIM, LAYERS = 16, 2048, 8
PROGRAMS, TILE_ROWS, TILE_COLS = 128, 64, 256
MIN_MB = PROGRAMS * TILE_ROWS * TILE_COLS * 2 // 2 ** 20  # one tile per program
MAX_POLLS = 1 << 22
ARRIVED, GENERATION, GAVE_UP, FLAGS = range(4)  # the counters; FLAGS: one per program
COUNTERS = FLAGS + PROGRAMS


def _tile(w_ref, program, tiles, i):
  """Tile `i` of `program`'s share of `w_ref` (`tiles` tiles of `[64, 256]`). The
  caller reads `pl.program_id` outside any loop (interpret mode cannot inside one)."""
  rows = (program * tiles + i) * TILE_ROWS + jnp.arange(TILE_ROWS)
  return plt.load(w_ref.at[rows[:, None], jnp.arange(TILE_COLS)[None, :]])


def _stream(w_ref, tiles, first=None):
  """This program's share of `w_ref`, summed over its tiles; `first` is its first
  tile when already loaded."""
  program = pl.program_id(0)

  def body(i, acc):
    return acc + jnp.sum(_tile(w_ref, program, tiles, i).astype(jnp.float32), axis=0)

  start = 0 if first is None else 1
  acc = jnp.zeros((TILE_COLS,), jnp.float32)
  if first is not None:
    acc += jnp.sum(first.astype(jnp.float32), axis=0)
  return jnp.sum(jax.lax.fori_loop(start, tiles, body, acc))


def _write(x_ref, y_ref, value, scale):
  share = x_ref.shape[0] // PROGRAMS
  index = pl.program_id(0) * share + jnp.arange(share)
  plt.store(y_ref.at[index], plt.load(x_ref.at[index]) + value * scale)


def _poll(counters_ref, index, done, now) -> jax.Array:
  """Volatile loads of `counters_ref[index]`, last seen at `now`, until `done(value)`
  (or `MAX_POLLS` of them, counted in `GAVE_UP`); returns the last value."""
  zero = pl.program_id(0) * 0

  def pending(carry):
    now, polls = carry
    return jnp.logical_not(done(now)) & (polls < MAX_POLLS)

  def poll(carry):
    return plt.load(counters_ref.at[index], volatile=True), carry[1] + 1

  now, polls = jax.lax.while_loop(pending, poll, (now, zero))

  @pl.when(polls >= MAX_POLLS)
  def _():
    plt.atomic_add(counters_ref, (zero + GAVE_UP,), zero + 1)

  return now


def _grid_barrier(counters_ref):
  """Waits until every program has arrived. Sense by generation: a program reads the
  generation before it arrives, the last to arrive resets the count and advances the
  generation, and the others poll (volatile loads) until it moves; one atomic read
  then acquires what the others wrote before arriving."""
  zero = pl.program_id(0) * 0
  generation = plt.load(counters_ref.at[zero + GENERATION], volatile=True)
  plt.debug_barrier()  # this program's stores before its arrival
  arrived = plt.atomic_add(counters_ref, (zero + ARRIVED,), zero + 1)

  @pl.when(arrived == PROGRAMS - 1)
  def _():
    plt.atomic_xchg(counters_ref, (zero + ARRIVED,), zero)
    plt.atomic_add(counters_ref, (zero + GENERATION,), zero + 1)

  _poll(counters_ref, zero + GENERATION, lambda now: now != generation, generation)
  plt.atomic_add(counters_ref, (zero + GENERATION,), zero)  # acquire


def _fence(value: jax.Array) -> jax.Array:
  """`value` after a GPU-scope acquire-release fence (PTX), as a dependency for what
  is loaded next."""
  lanes = jnp.full((1,), value)  # inline asm takes tensors, not scalars
  (lanes,) = plt.elementwise_inline_asm(
      "fence.acq_rel.gpu;\n\tmov.b32 $0, $1;", args=[lanes], constraints="=r,r", pack=1,
      result_shape_dtypes=[jax.ShapeDtypeStruct(lanes.shape, lanes.dtype)])
  return jnp.sum(lanes)


def _wait(counters_ref, index, target, now) -> jax.Array:
  """`_poll` until `counters_ref[index]` reaches `target`; returns a zero that depends
  on a fence after the wait."""
  return _fence(_poll(counters_ref, index, lambda value: value >= target, now)) * 0


def _count_barrier(counters_ref) -> jax.Array:
  """Waits until the count of arrivals reaches the next multiple of `PROGRAMS` after
  this program's own; returns a zero that depends on the fence after the wait."""
  zero = pl.program_id(0) * 0
  plt.debug_barrier()  # this program's stores before its arrival
  old = plt.atomic_add(counters_ref, (zero + ARRIVED,), zero + 1)
  return _wait(counters_ref, zero + ARRIVED, (old // PROGRAMS + 1) * PROGRAMS, old + 1)


def _neighbour_flag(counters_ref) -> jax.Array:
  """Raises this program's flag and waits until program i+1's has risen as far;
  returns i+1 (mod `PROGRAMS`) plus a zero that depends on the fence after the wait."""
  program = pl.program_id(0)
  neighbour = (program + 1) % PROGRAMS
  plt.debug_barrier()  # this program's stores before its flag
  old = plt.atomic_add(counters_ref, (program + FLAGS,), program * 0 + 1)
  return neighbour + _wait(counters_ref, neighbour + FLAGS, old + 1, old)


def _phase_kernel(w_ref, x_ref, partials_in_ref, y_ref, partials_ref, *, tiles, scale):
  """One phase: this program's share of `w` plus (when given) all earlier partials."""
  total = 0.0
  if partials_in_ref is not None:
    total = jnp.sum(plt.load(partials_in_ref.at[jnp.arange(PROGRAMS)]))
  own = _stream(w_ref, tiles)
  plt.store(partials_ref.at[pl.program_id(0)], own)
  _write(x_ref, y_ref, own + total, scale)


def _synced_kernel(w1_ref, w2_ref, x_ref, counters_in_ref, y_ref, partials_ref,
                   counters_ref, *, tiles, scale, prefetch, sync):
  """Both phases in one kernel; phase 2 starts after `sync`: a grid-wide barrier
  (`generation` or `count`) or the flag of one other program (`neighbour`)."""
  del counters_in_ref  # aliased to counters_ref
  plt.store(partials_ref.at[pl.program_id(0)], _stream(w1_ref, tiles))
  first = _tile(w2_ref, pl.program_id(0), tiles, 0) if prefetch else None
  if sync == "neighbour":
    total = plt.load(partials_ref.at[_neighbour_flag(counters_ref)], volatile=True)
  else:
    offset = _count_barrier(counters_ref) if sync == "count" else 0
    if sync == "generation":
      _grid_barrier(counters_ref)
    total = jnp.sum(plt.load(partials_ref.at[jnp.arange(PROGRAMS) + offset], volatile=True))
  _write(x_ref, y_ref, _stream(w2_ref, tiles, first) + total, scale)


def _one_stream_kernel(w1_ref, w2_ref, x_ref, y_ref, *, tiles, scale):
  _write(x_ref, y_ref, _stream(w1_ref, tiles) + _stream(w2_ref, tiles), scale)


def _call(kernel, out_shape, *args, **kw):
  return pl.pallas_call(kernel, grid=(PROGRAMS,), out_shape=out_shape,
                        compiler_params=plt.CompilerParams(num_warps=4, num_stages=3),
                        interpret=jax.default_backend() == "cpu", **kw)(*args)


def phases(variant: str, x: jax.Array, w1: jax.Array, w2: jax.Array,
           counters: jax.Array, scale: float = 1e-30) -> tuple[jax.Array, jax.Array]:
  """`variant`'s two phases: `(x (float32) + scale * (what `expected` adds to each
  program's share), counters)`."""
  tiles = w1.shape[0] // (PROGRAMS * TILE_ROWS)
  flat = x.reshape(-1).astype(jnp.float32)
  y_shape = jax.ShapeDtypeStruct(flat.shape, jnp.float32)
  partial_shape = jax.ShapeDtypeStruct((PROGRAMS,), jnp.float32)
  if variant == "two_kernels":
    kernel = functools.partial(_phase_kernel, tiles=tiles, scale=scale)
    _, partials = _call(lambda w, x, y, p: kernel(w, x, None, y, p),
                        (y_shape, partial_shape), w1, flat)
    y, _ = _call(kernel, (y_shape, partial_shape), w2, flat, partials)
  elif variant in _SYNC:
    kernel = functools.partial(_synced_kernel, tiles=tiles, scale=scale,
                               prefetch=variant == "barrier_prefetch", sync=_SYNC[variant])
    y, _, counters = _call(
        kernel, (y_shape, partial_shape, jax.ShapeDtypeStruct(counters.shape, jnp.int32)),
        w1, w2, flat, counters, input_output_aliases={3: 2})
  elif variant == "one_stream":
    y = _call(functools.partial(_one_stream_kernel, tiles=tiles, scale=scale), y_shape,
              w1, w2, flat)
  else:
    raise ValueError(f"unknown variant {variant!r}; one of {VARIANTS}")
  return y.reshape(x.shape), counters


_SYNC = dict(barrier="generation", barrier_prefetch="generation", barrier_count="count",
             neighbour_flag="neighbour")  # how each one-kernel variant waits
VARIANTS = ("two_kernels", *_SYNC, "one_stream")


def expected(variant: str, x: jax.Array, w1: jax.Array, w2: jax.Array) -> jax.Array:
  """`phases(..., scale=1)` in jnp."""
  own1, own2 = (w.astype(jnp.float32).reshape(PROGRAMS, -1).sum(axis=1) for w in (w1, w2))
  if variant == "one_stream":
    per_program = own2 + own1
  elif variant == "neighbour_flag":
    per_program = own2 + jnp.roll(own1, -1)
  else:
    per_program = own2 + jnp.sum(own1)
  return (x.astype(jnp.float32).reshape(PROGRAMS, -1) + per_program[:, None]).reshape(x.shape)


def weight(megabytes: int, key: jax.Array) -> jax.Array:
  return jax.random.normal(key, (megabytes * 2 ** 20 // (2 * TILE_COLS), TILE_COLS),
                           jnp.bfloat16)


def _carried_step(variant: str):
  """`phases` as a `LayerChain` step that carries its weights and counters."""
  def step(x, w1, w2, counters):
    y, counters = phases(variant, x, w1, w2, counters)
    return y, (w1, w2, counters)
  return step


def main(argv: list[str]) -> None:
  out_path = argv[1]
  sizes = [int(s) for s in (argv[2] if len(argv) > 2 else "4,16,32").split(",")]
  if jax.default_backend() != "gpu":
    raise ValueError("the barrier variants need a GPU (interpret mode runs programs one "
                     f"by one), found {jax.default_backend()}")
  if any(s <= 0 or s % MIN_MB for s in sizes):
    raise ValueError(f"sizes must be positive multiples of {MIN_MB} MB, got {sizes}")
  fileio.check_writable(out_path, overwrite=True)
  x = jax.random.normal(jax.random.PRNGKey(0), (TOKENS, DIM), jnp.bfloat16)
  overhead_us = benchmarking.chain_overhead(x, LAYERS) * 1e6
  rows = []
  for megabytes in sizes:
    keys = jax.random.split(jax.random.PRNGKey(megabytes), 2 * LAYERS)
    w = [(weight(megabytes, keys[2 * i]), weight(megabytes, keys[2 * i + 1]))
         for i in range(LAYERS)]
    row = dict(mb_per_phase=megabytes)
    for variant in VARIANTS:
      counters = jnp.zeros((COUNTERS,), jnp.int32)
      y, counters = phases(variant, x, *w[0], counters, scale=1.0)
      want = expected(variant, x, *w[0])
      error = float(jnp.max(jnp.abs(y - want) / jnp.max(jnp.abs(want))))
      chain = benchmarking.LayerChain(_carried_step(variant), carry_args=True)
      args = [(w1, w2, jnp.zeros((COUNTERS,), jnp.int32)) for w1, w2 in w]
      us = chain.seconds_per_layer(x, args) * 1e6 - overhead_us
      gave_up = sum(int(a[2][GAVE_UP]) for a in chain.layer_args) + int(counters[GAVE_UP])
      w = [a[:2] for a in chain.layer_args]
      row[variant] = dict(us=us, relative_error=error, gave_up=gave_up)
      print(megabytes, variant, row[variant], flush=True)
      if gave_up:
        raise RuntimeError(f"{variant}: a barrier gave up waiting ({gave_up} programs)")
    rows.append(row)
  fileio.write_json_atomic(out_path, dict(
      command="python tools/phase_boundary_cost.py " + " ".join(argv[1:]),
      env=benchmarking.environment(), chain_overhead_us=overhead_us, rows=rows),
      compact=True)


if __name__ == "__main__":
  main(sys.argv)

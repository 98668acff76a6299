"""Language-model training of sere-jax models: loss, optimiser, step, evaluation.

    tx = make_optimizer(peak_lr=2e-3, warmup_steps=200, total_steps=3000)
    trainer = Trainer(model, tx, aux_loss_weight=0.01)
    metrics = trainer.step(inputs, targets)          # [B, L] int32 each
    loss = trainer.eval_loss(inputs, targets)        # mean next-token NLL (nats)

The loss is next-token cross-entropy plus `aux_loss_weight` times the mean over MoE
layers of the Switch load-balancing loss (`routing.load_balancing_loss`), which each
`MoeBlock` sows inside `nnx.capture`. Training runs without re-routing, over whole
sequences (`decode=False`), with a differentiable MoE implementation (`ragged_dot` or
`xla_dense`; the Pallas kernels have no gradients).
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any, Callable

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm

from sere_jax import calibration
from sere_jax import fileio
from sere_jax import moe
from sere_jax.models import base as model_base

TRAINABLE_IMPLS = ("ragged_dot", "xla_dense")


def make_optimizer(*, peak_lr: float, warmup_steps: int, total_steps: int,
                   end_lr_fraction: float = 0.1, weight_decay: float = 0.1,
                   clip_norm: float = 1.0) -> optax.GradientTransformation:
  """AdamW with linear warm-up, cosine decay to `end_lr_fraction * peak_lr`, and
  global-norm clipping."""
  if not 0 <= warmup_steps < total_steps:
    raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}), got "
                     f"{warmup_steps}")
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak_lr, warmup_steps=warmup_steps,
      decay_steps=total_steps, end_value=peak_lr * end_lr_fraction)
  return optax.chain(optax.clip_by_global_norm(clip_norm),
                     optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=weight_decay))


def forward(model: nnx.Module, tokens: jax.Array, cache_dtype=jnp.float32) -> jax.Array:
  """Logits `[B, L, V]` of a whole-sequence forward (all tokens valid, no re-routing
  in prefill unless the blocks' configs say so)."""
  batch, length = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), tokens.shape)
  valid = jnp.ones(tokens.shape, jnp.bool_)
  cache = model.init_cache(batch, length, cache_dtype)
  return model(tokens, positions, valid, cache, valid, jnp.zeros((), jnp.int32),
               decode=False).logits


def loss_terms(model: nnx.Module, inputs: jax.Array, targets: jax.Array,
               aux_loss_weight: float, cache_dtype=jnp.float32
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`(total loss, {"loss", "nll", "aux"})` of one batch."""
  logits, sown = nnx.capture(lambda m: forward(m, inputs, cache_dtype),
                             nnx.Intermediate)(model)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
  aux = [v for path, v in nnx.to_flat_state(sown)
         if path[-1] == moe.CAPTURE_LOAD_BALANCE]
  aux = (jnp.mean(jnp.stack([jnp.mean(jnp.stack(v.get_value())) for v in aux]))
         if aux else jnp.zeros((), jnp.float32))
  total = nll + aux_loss_weight * aux
  return total, {"loss": total, "nll": nll, "aux": aux}


class Trainer:
  """Holds the model split into parameters and the rest, and the optimiser state."""

  def __init__(self, model: nnx.Module, tx: optax.GradientTransformation, *,
               aux_loss_weight: float):
    for block in moe.moe_blocks(model):
      if block.impl not in TRAINABLE_IMPLS:
        raise ValueError(f"MoE impl {block.impl!r} has no gradients; train with one of "
                         f"{TRAINABLE_IMPLS}")
      if block.reroute.policy != "none":
        raise ValueError("train without re-routing (policy 'none')")
    self.graphdef, self.params, self.rest = nnx.split(model, nnx.Param, ...)
    self.tx = tx
    self.opt_state = tx.init(self.params)
    dtype = model_base.param_dtype(model)
    self._step = jax.jit(functools.partial(_train_step, self.graphdef, tx,
                                           float(aux_loss_weight), dtype),
                         donate_argnums=(0, 2))
    self._eval = jax.jit(functools.partial(_eval_nll, self.graphdef, dtype))

  @property
  def model(self) -> nnx.Module:
    return nnx.merge(self.graphdef, self.params, self.rest)

  def train_state(self) -> dict[str, Any]:
    """The pytree a checkpoint stores: parameters and optimiser state."""
    return {"params": self.params, "opt_state": self.opt_state}

  def load_train_state(self, state: dict[str, Any]) -> None:
    self.params, self.opt_state = state["params"], state["opt_state"]

  def step(self, inputs: np.ndarray, targets: np.ndarray) -> dict[str, jax.Array]:
    self.params, metrics, self.opt_state = self._step(
        self.params, self.rest, self.opt_state, jnp.asarray(inputs), jnp.asarray(targets))
    return metrics

  def eval_loss(self, inputs: np.ndarray, targets: np.ndarray) -> float:
    """Mean next-token NLL (nats) over the batch."""
    return float(self._eval(self.params, self.rest, jnp.asarray(inputs),
                            jnp.asarray(targets)))


def _train_step(graphdef, tx, aux_loss_weight, dtype, params, rest, opt_state, inputs,
                targets):
  def loss(p):
    return loss_terms(nnx.merge(graphdef, p, rest), inputs, targets, aux_loss_weight,
                      dtype)
  (_, metrics), grads = jax.value_and_grad(loss, has_aux=True)(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  metrics["grad_norm"] = jnp.sqrt(sum(jnp.sum(jnp.square(g))
                                      for g in jax.tree.leaves(grads)))
  return optax.apply_updates(params, updates), metrics, opt_state


def _eval_nll(graphdef, dtype, params, rest, inputs, targets):
  logits = forward(nnx.merge(graphdef, params, rest), inputs, dtype)
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def random_windows(tokens: np.ndarray, batch_size: int, length: int, seed: int,
                   step: int) -> tuple[np.ndarray, np.ndarray]:
  """`(inputs, targets)` `[B, L]`: random windows of `tokens`, a pure function of
  `(seed, step)` so a resumed run sees the same batches."""
  if tokens.shape[0] < length + 2:
    raise ValueError(f"the text has {tokens.shape[0]} tokens, fewer than seq_len + 2 = "
                     f"{length + 2}")
  rng = np.random.default_rng([seed, step])
  starts = rng.integers(0, tokens.shape[0] - length - 1, batch_size)
  windows = np.stack([tokens[s:s + length + 1] for s in starts])
  return windows[:, :-1], windows[:, 1:]


def tiled_windows(tokens: np.ndarray, length: int, max_windows: int | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
  """Non-overlapping `(inputs, targets)` windows covering `tokens` (the tail that does
  not fill a window is dropped); at most `max_windows`, spread evenly."""
  count = (tokens.shape[0] - 1) // length
  if count < 1:
    raise ValueError(f"the text has {tokens.shape[0]} tokens, fewer than seq_len + 1 = "
                     f"{length + 1}")
  index = np.arange(count)
  if max_windows is not None and max_windows < count:
    index = np.linspace(0, count - 1, max_windows).round().astype(int)
  windows = np.stack([tokens[i * length:i * length + length + 1] for i in index])
  return windows[:, :-1], windows[:, 1:]


def routing_statistics(model: nnx.Module, tokens: np.ndarray, group_size: int
                       ) -> dict[str, Any]:
  """Expert load and decode-time distinct experts of the model's own routing.

  `tokens [N, L]`: every MoE layer's fraction of top-K slots per expert (`load`,
  `[layers][E]`), and the mean number of distinct experts per decode step when
  `group_size` sequences decode together (teacher forced, no re-routing;
  `distinct_per_step`, per layer).
  """
  tokens = jnp.asarray(tokens)
  valid = jnp.ones(tokens.shape, jnp.bool_)
  dtype = model_base.param_dtype(model)
  graphdef, state = nnx.split(model)
  captured = calibration.capture_moe_inputs(graphdef, state, tokens, valid,
                                            cache_dtype=dtype)
  loads = []
  for block, (x, _) in zip(moe.moe_blocks(model), captured):
    logits = jnp.dot(x.astype(jnp.float32), block.router_kernel[...].astype(jnp.float32))
    ids = np.asarray(block.route(logits)[0]).reshape(-1)
    loads.append((np.bincount(ids, minlength=block.num_experts) / ids.size).tolist())
  configs = [(b.reroute, b.group_size) for b in moe.moe_blocks(model)]
  moe.set_reroute(model, moe.NO_REROUTE, group_size=group_size)
  try:
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    cache = model.init_cache(tokens.shape[0], tokens.shape[1], dtype)
    stats = model(tokens, positions, valid, cache, valid, jnp.zeros((), jnp.int32),
                  decode=True).stats
  finally:
    for block, (config, size) in zip(moe.moe_blocks(model), configs):
      block.reroute, block.group_size = config, size
  return {"load": loads, "group_size": group_size,
          "distinct_per_step": [float(jnp.mean(s.distinct_after)) for s in stats]}


def fit(trainer: Trainer, batch_fn: Callable[[int], tuple[np.ndarray, np.ndarray]], *,
        steps: int, manager: ocp.CheckpointManager, history_path: str,
        log_every: int, checkpoint_every: int, eval_every: int = 0,
        eval_fn: Callable[[], float] | None = None, desc: str = "train",
        time_budget_s: float | None = None) -> list[dict[str, float]]:
  """Runs (or resumes from `manager`'s latest step) `steps` optimiser steps.

  `batch_fn(step)` gives step `step`'s `(inputs, targets)` (a pure function of the step,
  so a resumed run sees the same batches). Every `log_every` steps the metrics, tokens/s
  and (every `eval_every`) `eval_fn()` are appended to the history, which is kept in
  `history_path` (so a resumed run reports all of it) and returned. A progress bar shows
  the loss and an ETA. With `time_budget_s` the loop stops once that many seconds have
  passed since its first step finished (compilation excluded); the history's last entry
  then has `stopped_early`.
  """
  start, history = 0, []
  if manager.latest_step() is not None:
    start = manager.latest_step()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, trainer.train_state())
    trainer.load_train_state(manager.restore(start, args=ocp.args.StandardRestore(abstract)))
    if os.path.isfile(history_path):
      with open(history_path) as fh:
        history = [e for e in json.load(fh) if e["step"] <= start]
  tic, seen = time.time(), 0
  bar = tqdm.tqdm(total=steps, initial=start, desc=desc, unit="step",
                  disable=start >= steps)
  for step in range(start, steps):
    inputs, targets = batch_fn(step)
    metrics = trainer.step(inputs, targets)
    if step == start and time_budget_s:
      jax.block_until_ready(metrics)
      deadline = time.time() + time_budget_s
    seen += inputs.size
    done = step + 1
    bar.update(1)
    stop = bool(time_budget_s) and time.time() > deadline and done < steps
    if done % log_every == 0 or done == steps or stop:
      entry = {"step": done, **{k: float(v) for k, v in metrics.items()},
               "tokens_per_s": seen / (time.time() - tic)}
      if eval_fn is not None and (done == steps or stop or
                                  (eval_every and done % eval_every == 0)):
        entry["val_nll"] = eval_fn()
      if stop:
        entry["stopped_early"] = True
      history.append(entry)
      fileio.write_json_atomic(history_path, history)
      bar.set_postfix(loss=f"{entry['nll']:.3f}", tok_s=f"{entry['tokens_per_s']:.0f}")
      tic, seen = time.time(), 0
    if done % checkpoint_every == 0 or done == steps or stop:
      manager.save(done, args=ocp.args.StandardSave(trainer.train_state()))
    if stop:
      break
  bar.close()
  manager.wait_until_finished()
  return history


def checkpoint_manager(directory: str, max_to_keep: int = 2) -> ocp.CheckpointManager:
  """An Orbax manager of training states in `directory` (created if absent)."""
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def mean_nll(trainer: Trainer, inputs: np.ndarray, targets: np.ndarray,
             batch_size: int) -> float:
  """Mean next-token NLL over `[N, L]` windows, `batch_size` windows at a time."""
  total = 0.0
  for i in range(0, inputs.shape[0], batch_size):
    total += trainer.eval_loss(inputs[i:i + batch_size], targets[i:i + batch_size]) * (
        inputs[i:i + batch_size].shape[0])
  return total / inputs.shape[0]

"""Pure train and eval steps: (state, batch) -> (state, metrics)."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from effjax.models.lm_head import token_nll
from effjax.optim.factory import global_norm
from effjax.train.state import TrainState

# A post-update hook maps (new_state, old_state, aux) -> new_state. Technique modules use it
# for non-trainable state updates (ALF-LB bias), projections (weight constraints) and
# restores (CGA), all inside the jitted step.
PostUpdateHook = Callable[[TrainState, TrainState, dict], TrainState]
# A gradient hook maps (grads, state) -> grads before the optimizer sees them (and before
# the global-norm clip): e.g. CGA zeroes the gradients of frozen weights.
GradHook = Callable[[dict, TrainState], dict]


def batch_nll(model, params, buffers, batch, model_kwargs) -> tuple[jax.Array, dict]:
  """(per-token NLL [B, L], aux): through the logits, or with model.loss_chunk > 0 through
  the chunked LM head, which never materialises them (effjax/models/lm_head.py)."""
  kwargs = dict(positions_BxL=batch["positions"], segment_ids_BxL=batch["segment_ids"],
                **model_kwargs)
  if getattr(model, "loss_chunk", 0):
    return model.apply(params, buffers, batch["inputs"], targets_BxL=batch["targets"], **kwargs)
  logits, aux = model.apply(params, buffers, batch["inputs"], **kwargs)
  return token_nll(logits, batch["targets"]), aux


def _split_aux(aux: dict) -> tuple[jax.Array, dict]:
  """Model aux outputs: 'loss/*' scalars are summed into the training loss; 'stat/*'
  arrays (e.g. MoE token counts) are kept for post-update hooks and eval; other
  scalars are metrics."""
  extra = sum((jnp.asarray(v, jnp.float32) for k, v in aux.items() if k.startswith("loss/")),
              jnp.float32(0))
  kept = {k: jnp.asarray(v, jnp.float32) for k, v in aux.items()
          if k.startswith("stat/") or k.startswith("loss/") or jnp.ndim(v) == 0}
  return extra, kept


def make_loss_fn(model, model_kwargs=None, reweight=None):
  """loss_fn(params, buffers, batch[, step, weights_B]) -> (loss, (nll, aux)).

  reweight (effjax/train/reweight.py): the NLL term becomes mean_b w_b * nll_b over the
  batch's sequences, with w_B given or, when not, computed from this forward's per-sequence
  losses at `step` (no gradient through them); its metrics join the aux.
  """
  model_kwargs = model_kwargs or {}

  def loss_fn(params, buffers, batch, step=None, weights_B=None):
    nll_BxL, aux = batch_nll(model, params, buffers, batch, model_kwargs)
    nll = jnp.mean(nll_BxL)
    extra, kept = _split_aux(aux)
    if reweight is None:
      return nll + extra, (nll, kept)
    seq_B = jnp.mean(nll_BxL, axis=1)
    if weights_B is None:
      weights_B, metrics = reweight(seq_B, step)
      kept = {**kept, **metrics}
    return jnp.mean(jax.lax.stop_gradient(weights_B) * seq_B) + extra, (nll, kept)
  return loss_fn


def _step_weights(model, model_kwargs, reweight, state, micro):
  """Per-sequence weights of a whole grad-accum step: a forward pass over every micro-batch
  first (the weights are normalised over the global batch, not per micro-batch)."""
  def seq_loss(_, mb):
    nll_BxL, _ = batch_nll(model, state.params, state.buffers, mb, model_kwargs or {})
    return None, jnp.mean(nll_BxL, axis=1)
  _, seq_AxB = jax.lax.scan(seq_loss, None, micro)
  weights, metrics = reweight(seq_AxB.reshape(-1), state.step)
  return weights.reshape(seq_AxB.shape), metrics


def _metric_name(key: str) -> str:
  """'loss/moe_aux/layer0' -> 'train/loss/moe_aux/layer0'; technique metrics keep their prefix."""
  return f"train/{key}" if key.startswith("loss/") or "/" not in key else key


def make_train_step(model, tx: optax.GradientTransformation, schedule, *, grad_accum: int = 1,
                    hooks: Sequence[PostUpdateHook] = (), grad_hooks: Sequence[GradHook] = (),
                    metric_fns: Sequence[Callable[[dict], dict]] = (), model_kwargs=None,
                    reweight=None):
  """Returns train_step(state, batch) -> (state, metrics). Micro-batches are scanned.

  'stat/*' aux arrays are summed over micro-batches (counts over the whole global
  batch), everything else is averaged; hooks see the stats, metrics do not.
  metric_fns: aux -> {name: scalar} computed from the whole step's aux (e.g. MaxVio from
  the summed counts, not the mean of per-micro-batch values); they override aux metrics.
  reweight: per-sequence loss weights (effjax/train/reweight.py), normalised over the whole
  step; None (train.reweight=none) leaves the step unchanged.
  """
  grad_fn = jax.value_and_grad(make_loss_fn(model, model_kwargs, reweight), has_aux=True)

  def train_step(state: TrainState, batch: dict):
    rw_metrics = {}
    if grad_accum == 1:
      (loss, (nll, aux)), grads = grad_fn(state.params, state.buffers, batch, state.step)
    else:
      micro = jax.tree.map(lambda x: x.reshape(grad_accum, -1, *x.shape[1:]), batch)
      w_AxB = None
      if reweight is not None:
        w_AxB, rw_metrics = _step_weights(model, model_kwargs, reweight, state, micro)

      def body(carry, xs):
        mb, w_B = xs
        (l, (n, a)), g = grad_fn(state.params, state.buffers, mb, state.step, w_B)
        return jax.tree.map(jnp.add, carry, (l, n, a, g)), None

      (l0, (n0, a0)), g0 = jax.eval_shape(
          grad_fn, state.params, state.buffers, jax.tree.map(lambda x: x[0], micro),
          state.step, None if w_AxB is None else w_AxB[0])
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (l0, n0, a0, g0))
      (loss, nll, aux, grads), _ = jax.lax.scan(body, zeros, (micro, w_AxB))
      loss, nll, grads = jax.tree.map(lambda x: x / grad_accum, (loss, nll, grads))
      aux = {k: v if k.startswith("stat/") else v / grad_accum for k, v in aux.items()}
    for grad_hook in grad_hooks:
      grads = grad_hook(grads, state)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    for hook in hooks:
      new_state = hook(new_state, state, aux)
    metrics = {"train/loss": nll, "train/total_loss": loss, "train/grad_norm": global_norm(grads),
               "train/lr": schedule(state.step), "train/param_norm": global_norm(params),
               **{_metric_name(k): v for k, v in aux.items() if not k.startswith("stat/")},
               **rw_metrics}
    for metric_fn in metric_fns:
      metrics.update(metric_fn(aux))
    return new_state, metrics

  return train_step


def make_eval_step(model, token_bytes_V: jax.Array | None, model_kwargs=None):
  """eval_step(params, buffers, batch) -> sums of nll (nats), tokens, UTF-8 bytes and the
  model's 'stat/*' arrays (summed over eval batches by the caller)."""
  model_kwargs = model_kwargs or {}

  def eval_step(params, buffers, batch):
    nll, aux = batch_nll(model, params, buffers, batch, model_kwargs)
    nbytes = (jnp.sum(token_bytes_V[batch["targets"]]) if token_bytes_V is not None
              else jnp.float32(jnp.nan))
    stats = {k: v for k, v in aux.items() if k.startswith("stat/")}
    return {"nll_sum": jnp.sum(nll), "tokens": jnp.float32(nll.size), "bytes": nbytes, **stats}

  return eval_step


def summarize_eval(sums: dict) -> dict:
  loss = sums["nll_sum"] / sums["tokens"]
  out = {"eval/loss": loss}
  if sums["bytes"] == sums["bytes"] and sums["bytes"] > 0:  # not NaN
    out["eval/bpb"] = sums["nll_sum"] / math.log(2) / sums["bytes"]
  return out

"""Dynamic loss-based sample reweighting (Sow et al. 2025, "Dynamic Loss-Based Sample
Reweighting for Improved Large Language Model Pretraining"; docs/data.md).

Each sequence i of the step's global batch gets a weight w_i computed online from the
sequences' current losses l_i (mean token NLL), normalised to mean 1 over the whole global
batch (all data-parallel shards and all grad-accum micro-batches), with no gradient through
it; the training loss is mean_i w_i l_i. Schemes (train.reweight):

  none      w_i = 1: the step is exactly today's (no code path changes).
  linear    w_i = l_i / mean_j l_j: weight proportional to loss.
  softmax   w_i = N softmax(l / T)_i, T = train.reweight_temperature: exponential tilt
            towards high-loss sequences (T -> inf: uniform).
  linupper  the paper's best strategy: losses min-max normalised to x_i in [-1, 1] within the
            batch, f(x) = min(x + 1, 1) (rising from 0 at the lowest loss to 1 at the
            batch's mid-range, flat above), w_i = N softmax(f(x) / T)_i (the paper's
            KL-regularised weights with r = T). Low-loss (redundant, already learned)
            sequences are down-weighted; high-loss ones are not pushed beyond the cap.

For the first train.reweight_warmup steps every weight is 1 (uniform warm-up).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

SCHEMES = ("none", "linear", "softmax", "linupper")


def sample_weights(loss_N: jax.Array, scheme: str, temperature: float = 1.0) -> jax.Array:
  """Weights (mean 1, fp32, no gradient) for the per-sequence losses of one global batch."""
  l = jax.lax.stop_gradient(loss_N.astype(jnp.float32))
  n = l.shape[0]
  if scheme == "none":
    return jnp.ones_like(l)
  if scheme == "linear":
    return l / jnp.maximum(jnp.mean(l), 1e-12)
  if scheme == "softmax":
    return n * jax.nn.softmax(l / temperature)
  if scheme == "linupper":
    lo, hi = jnp.min(l), jnp.max(l)
    x = 2.0 * (l - lo) / jnp.maximum(hi - lo, 1e-12) - 1.0
    return n * jax.nn.softmax(jnp.minimum(x + 1.0, 1.0) / temperature)
  raise ValueError(f"train.reweight must be one of {', '.join(SCHEMES)}; got {scheme!r}")


def weight_metrics(loss_N: jax.Array, w_N: jax.Array) -> dict:
  """Spread, effective sample size (fraction of N) and the mean loss of up- vs down-weighted
  sequences (the batch mean where there are none)."""
  l = jax.lax.stop_gradient(loss_N.astype(jnp.float32))
  n = l.shape[0]
  up, down = w_N > 1.0 + 1e-6, w_N < 1.0 - 1e-6
  mean_where = lambda m: jnp.where(m.any(), jnp.sum(jnp.where(m, l, 0)) / jnp.maximum(m.sum(), 1),
                                   jnp.mean(l))
  return {"train/reweight/weight_std": jnp.std(w_N), "train/reweight/weight_max": jnp.max(w_N),
          "train/reweight/weight_min": jnp.min(w_N),
          "train/reweight/ess": jnp.sum(w_N) ** 2 / (n * jnp.sum(w_N ** 2)),
          "train/reweight/loss_up": mean_where(up), "train/reweight/loss_down": mean_where(down)}


def make_reweight(scheme: str, temperature: float = 1.0, warmup: int = 0) -> Callable | None:
  """(per-sequence losses [N], step) -> (weights [N], metrics); None for scheme 'none'."""
  if scheme == "none":
    return None
  if scheme not in SCHEMES:
    raise ValueError(f"train.reweight must be one of {', '.join(SCHEMES)}; got {scheme!r}")

  def reweight(loss_N, step):
    w = sample_weights(loss_N, scheme, temperature)
    w = jnp.where(step < warmup, jnp.ones_like(w), w)
    return w, weight_metrics(loss_N, w)

  return reweight


def from_config(train_config) -> Callable | None:
  return make_reweight(train_config.reweight, train_config.reweight_temperature,
                       train_config.reweight_warmup)

"""Learning-rate schedules: linear warmup then cosine, warmup-stable-decay, or constant."""

from __future__ import annotations

import jax.numpy as jnp
import optax

from effjax.config import TrainConfig


def make_schedule(train: TrainConfig) -> optax.Schedule:
  """Peak lr `train.lr` after `warmup_steps`; ends at `min_lr_ratio * lr` (cosine, wsd)."""
  peak, warmup, steps = train.lr, train.warmup_steps, train.steps
  final = peak * train.min_lr_ratio

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = peak * jnp.minimum(1.0, (step + 1) / max(warmup, 1))
    if train.schedule == "constant":
      after = peak
    elif train.schedule == "cosine":
      frac = jnp.clip((step - warmup) / max(steps - warmup, 1), 0.0, 1.0)
      after = final + (peak - final) * 0.5 * (1 + jnp.cos(jnp.pi * frac))
    else:  # wsd: stable at peak, then linear decay over the last decay_fraction of steps
      decay_steps = max(int(round(steps * train.decay_fraction)), 1)
      frac = jnp.clip((step - (steps - decay_steps)) / decay_steps, 0.0, 1.0)
      after = peak + (final - peak) * frac
    return jnp.where(step < warmup, warm, after)

  return schedule

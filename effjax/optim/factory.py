"""AdamW with per-parameter lr and weight-decay multipliers derived from roles.

The multipliers are static pytrees mirroring the params, computed from the one
parameter-role map (ParamSpec.role). Technique modules (muP, weight-decay rules)
change the multipliers, not the optimizer: see `multipliers_from_roles`.

Update (decoupled AdamW, Loshchilov & Hutter 2019), per leaf with lr multiplier m
and decay multiplier k:  p <- p - lr_t * m * (adam(g) + wd * k * p).
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import optax

from effjax.config import Config
from effjax.optim import scaling
from effjax.optim.schedules import make_schedule


def _is_spec(x) -> bool:
  return hasattr(x, "role") and hasattr(x, "axes")


def multipliers_from_roles(config: Config, specs: dict) -> tuple[dict, dict]:
  """(lr multipliers, weight-decay multipliers) per parameter, from its role
  (muP and the weight-decay rules: effjax/optim/scaling.py)."""
  lr_mult = jax.tree.map(lambda s: scaling.lr_multiplier(s, config), specs, is_leaf=_is_spec)
  wd_mult = jax.tree.map(lambda s: scaling.wd_multiplier(s, config), specs, is_leaf=_is_spec)
  return lr_mult, wd_mult


def decoupled_weight_decay(weight_decay: float, wd_mult: dict) -> optax.GradientTransformation:
  """updates += weight_decay * k * params, with a per-leaf multiplier k."""

  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None):
    if weight_decay == 0:
      return updates, state
    updates = jax.tree.map(lambda u, p, k: u + weight_decay * k * p.astype(u.dtype) if k else u,
                           updates, params, wd_mult)
    return updates, state

  return optax.GradientTransformation(init, update)


def scale_by_tree(multipliers: dict) -> optax.GradientTransformation:
  """Multiplies each update leaf by a static per-leaf float."""

  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, m: u * m if m != 1.0 else u, updates, multipliers), state

  return optax.GradientTransformation(init, update)


def make_optimizer(config: Config, specs: dict) -> tuple[optax.GradientTransformation,
                                                         optax.Schedule]:
  """The optax chain for `config.optim` and the lr schedule (for logging)."""
  o = config.optim
  lr_mult, wd_mult = multipliers_from_roles(config, specs)
  schedule = make_schedule(config.train)
  parts = []
  if o.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(o.grad_clip))
  parts += [
      optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=o.eps),
      decoupled_weight_decay(scaling.base_weight_decay(config), wd_mult),
      scale_by_tree(lr_mult),
      optax.scale_by_learning_rate(schedule),
  ]
  return optax.chain(*parts), schedule


def global_norm(tree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))

"""AdamW with per-parameter lr and weight-decay multipliers derived from roles.

The multipliers are static pytrees mirroring the params, computed from the one
parameter-role map (ParamSpec.role). Technique modules (muP, weight-decay rules)
change the multipliers, not the optimizer: see `multipliers_from_roles`.

Update (decoupled AdamW, Loshchilov & Hutter 2019), per leaf with lr multiplier m
and decay multiplier k:  p <- p - lr_t * m * (adam(g) + wd * k * p).

optim.name=muon: the matrices of optim.muon_roles take the Muon direction
(effjax/optim/muon.py) instead of adam(g), with m = optim.muon_lr_mult (Muon's
sqrt(fan_out/fan_in) update scale is already the width rule, so muP's Adam multipliers
are not applied to them); every other leaf stays on AdamW with its muP multiplier. The
decay is the same decoupled term for both.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import optax

from effjax.config import Config
from effjax.models.layers import layer_stacked
from effjax.optim import muon, scaling
from effjax.optim.schedules import make_schedule


def _is_spec(x) -> bool:
  return hasattr(x, "role") and hasattr(x, "axes")


def multipliers_from_roles(config: Config, specs: dict) -> tuple[dict, dict]:
  """(lr multipliers, weight-decay multipliers) per parameter, from its role
  (muP and the weight-decay rules: effjax/optim/scaling.py)."""
  lr_mult = jax.tree.map(lambda s: scaling.lr_multiplier(s, config), specs, is_leaf=_is_spec)
  wd_mult = jax.tree.map(lambda s: scaling.wd_multiplier(s, config), specs, is_leaf=_is_spec)
  return lr_mult, wd_mult


def muon_labels(config: Config, specs: dict) -> dict:
  """'muon' for the matrices of optim.muon_roles under optim.name=muon, else 'adam'."""
  o = config.optim

  def label(spec):
    matrix = len(spec.axes) - layer_stacked(spec.axes) >= 2
    return "muon" if o.name == "muon" and spec.role in o.muon_roles and matrix else "adam"
  return jax.tree.map(label, specs, is_leaf=_is_spec)


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
  adam = optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=o.eps)
  if o.name == "muon":
    labels = muon_labels(config, specs)
    lr_mult = jax.tree.map(lambda m, lab: o.muon_lr_mult if lab == "muon" else m, lr_mult, labels)
    direction = optax.multi_transform({"adam": adam, "muon": muon.scale_by_muon(
        beta=o.muon_beta, nesterov=o.muon_nesterov, coeffs=muon.NS_COEFFS[o.muon_ns],
        steps=o.muon_ns_steps)}, labels)
  else:
    direction = adam
  parts += [
      direction,
      decoupled_weight_decay(scaling.base_weight_decay(config), wd_mult),
      scale_by_tree(lr_mult),
      optax.scale_by_learning_rate(schedule),
  ]
  return optax.chain(*parts), schedule


def global_norm(tree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))

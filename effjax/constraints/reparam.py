"""Weight reparameterisations as `LinearHook`s (constraints.reparam; docs/constraints.md).

W is stored (fan_in, fan_out), so an output unit's weights are a column W[:, j].
  weight_norm  (Salimans & Kingma 2016)  W = g V / ||V||, per output unit; g starts at the init's
               expected column norm init_std sqrt(fan_in), so the model starts where the plain
               one does (in distribution).
  weight_cond  (Saratchandran et al., ECCV 2024)  W~ = E W, E = diag(1 / ||W_j||), recomputed
               every forward pass: row equilibration, by van der Sluis' theorem within sqrt(m) of
               the best diagonal preconditioner of W's condition number. Options: no gradient
               through E (constraints.cond_stop_grad) and a learnable per-unit gain
               (constraints.cond_gain, starts at 1). With the gain and the gradient through E it
               is weight normalisation with g starting at 1 instead of the init's norm.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from effjax.models.layers import LinearHook, make_param

REPARAM = "reparam"  # the hook's name on a Linear: its gain is <linear>/reparam/gain
EPS = 1e-12


def column_norms(w_IxO: jax.Array) -> jax.Array:
  return jnp.sqrt(jnp.sum(jnp.square(w_IxO.astype(jnp.float32)), axis=-2) + EPS)


class WeightNorm(LinearHook):
  def __init__(self, d_in: int, d_out: int, *, axes, std: float):
    self.gain = make_param(jnp.full((d_out,), std * d_in ** 0.5, jnp.float32), "vector",
                           (axes[1],))

  def weight(self, w_IxO):
    return (w_IxO * (self.gain[...] / column_norms(w_IxO))).astype(w_IxO.dtype)


class WeightCond(LinearHook):
  def __init__(self, d_out: int, *, axes, gain: bool, stop_grad: bool):
    self.stop_grad = stop_grad
    self.gain = make_param(jnp.ones((d_out,), jnp.float32), "vector", (axes[1],)) if gain else None

  def weight(self, w_IxO):
    e_O = 1.0 / column_norms(w_IxO)
    if self.stop_grad:
      e_O = jax.lax.stop_gradient(e_O)
    if self.gain is not None:
      e_O = e_O * self.gain[...]
    return (w_IxO * e_O).astype(w_IxO.dtype)


def make_reparam(c, d_in: int, d_out: int, *, axes, std: float) -> dict:
  """{REPARAM: hook} for one block linear under constraints.reparam (c: the section)."""
  if c.reparam == "weight_norm":
    return {REPARAM: WeightNorm(d_in, d_out, axes=axes, std=std)}
  return {REPARAM: WeightCond(d_out, axes=axes, gain=c.cond_gain, stop_grad=c.cond_stop_grad)}


def condition(w) -> jax.Array:
  s = jnp.linalg.svd(w.astype(jnp.float32), compute_uv=False)
  return s[..., 0] / s[..., -1]


def condition_numbers(model, params, layers=None) -> dict:
  """kappa of the stored and the effective weight of the reparameterised linears of the first
  and last layer: 'constraints/kappa/<slot>/layer<i>' and '.../kappa_eff/...'."""
  mod = model.module(params)
  last = model.dims.n_layers - 1
  layers = (0, last) if layers is None else layers
  out = {}
  for entry in model.index.entries:
    if entry.module != "Linear" or entry.tag.layer not in layers:
      continue
    node = model.node(mod, entry.path, entry.stacked)
    if REPARAM not in getattr(node, "hook_names", ()):
      continue
    name = f"{entry.tag.slot}/layer{entry.tag.layer}"
    out[f"constraints/kappa/{name}"] = condition(node.kernel[...])
    out[f"constraints/kappa_eff/{name}"] = condition(node.effective_weight())
  return out

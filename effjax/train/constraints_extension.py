"""Weight constraints in the trainer (docs/constraints.md): the projection after every
optimizer step (a post-update hook inside the jitted step) and, at each eval, the largest
RMS->RMS norm of the constrained matrices, the certified Lipschitz bound of a
model.arch=lipschitz model and the condition numbers of a few reparameterised matrices."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from effjax import constraints
from effjax.constraints import lipschitz
from effjax.constraints import projections as P
from effjax.models.index import get_path
from effjax.optim import muon, scaling
from effjax.optim.factory import multipliers_from_roles
from effjax.optim.schedules import make_schedule
from effjax.train.extensions import Extension


def soft_cap_bounds(config, specs, paths):
  """step -> {path: k}: the largest RMS->RMS norm one Muon step can reach from a matrix at
  w_max, k = w_max (1 - lr_t m wd_k) + lr_t m g (m, wd_k: the leaf's lr and decay multipliers;
  g: the largest singular value Newton-Schulz outputs, `muon.ns_max_gain`)."""
  o, w_max = config.optim, config.constraints.w_max
  schedule = make_schedule(config.train)
  _, wd_mult = multipliers_from_roles(config, specs)
  wd = scaling.base_weight_decay(config)
  gain = muon.ns_max_gain(muon.NS_COEFFS[o.muon_ns], o.muon_ns_steps)

  def bounds(step):
    lr = schedule(step)
    out = {}
    for path in paths:
      m, k_wd = o.muon_lr_mult, get_path(wd_mult, path)
      out[path] = w_max * (1 - lr * m * wd * k_wd) + lr * m * gain
    return out

  return bounds


class ConstraintsExtension(Extension):
  name = "constraints"

  @classmethod
  def enabled(cls, config) -> bool:
    c = config.constraints
    return c.method != "none" or c.reparam != "none" or config.model.arch == "lipschitz"

  def __init__(self, config, model):
    self.config, self.model = config, model
    self.paths = constraints.constrained_paths(config, model.specs)
    self.bounds = (soft_cap_bounds(config, model.specs, self.paths)
                   if config.constraints.method == "soft_cap" else None)
    self._eval = jax.jit(self._eval_metrics)
    self._act = jax.jit(lambda p, b, ids: lipschitz.max_activation_norm(model, p, b, ids))

  def hooks(self):
    config, paths, bounds = self.config, self.paths, self.bounds
    embed_max = config.constraints.embed_max if config.model.arch == "lipschitz" else 0.0
    hooks = []
    if embed_max > 0:
      def embed_hook(new_state, old_state, aux):
        """model.arch=lipschitz: token-embedding rows back to RMS <= constraints.embed_max."""
        del old_state, aux
        params = dict(new_state.params)
        params["embed"] = {**params["embed"],
                           "table": P.cap_row_rms(params["embed"]["table"], embed_max)}
        return new_state.replace(params=params)
      hooks.append(embed_hook)
    if not paths:
      return hooks

    def project_hook(new_state, old_state, aux):
      del aux
      alphas = None
      if bounds is not None:
        w_max = config.constraints.w_max
        alphas = {p: P.soft_cap_alpha(w_max, k) for p, k in bounds(old_state.step).items()}
      params, buffers = constraints.project_params(new_state.params, new_state.buffers, paths,
                                                   config, alphas, cold=old_state.step == 0)
      return new_state.replace(params=params, buffers=buffers)

    return hooks + [project_hook]

  def _eval_metrics(self, params, buffers):
    out = {}
    if self.paths:
      norms = [jnp.max(P.rms_norms(get_path(params, p))) for p in self.paths]
      out["constraints/max_rms_norm"] = jnp.max(jnp.stack(norms))
    if self.config.model.arch == "lipschitz":
      out.update(lipschitz.certified_bound(self.model, params))
    if self.config.constraints.reparam != "none":
      from effjax.constraints import reparam  # pylint: disable=g-import-not-at-top
      out.update(reparam.condition_numbers(self.model, params))
    del buffers
    return out

  def on_eval(self, state, stats) -> dict:
    del stats
    row = {k: float(v) for k, v in jax.device_get(self._eval(state.params, state.buffers)).items()}
    if self.config.model.arch == "lipschitz":
      row["constraints/max_activation_norm"] = self.max_activation_norm(state)
    return row

  def max_activation_norm(self, state) -> float:
    """Largest per-token RMS norm of the residual stream on the eval batches (`eval_data`,
    set by the trainer); NaN when there are none."""
    batches = self.eval_data
    if not batches:
      return float("nan")
    return float(max(self._act(state.params, state.buffers, batch["inputs"]) for batch in batches))

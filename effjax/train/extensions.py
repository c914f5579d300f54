"""Trainer extensions: how a technique plugs into the loop without editing it.

An extension may contribute
  * post-update hooks run inside the jitted step (non-trainable state updates,
    projections, restores): `hooks()`; gradient hooks before the optimizer: `grad_hooks()`;
  * a static per-step phase for the model (e.g. a top-k schedule): `phase(step)`
    returns hashable model kwargs; the trainer compiles one step per distinct phase;
  * metrics computed inside the jitted step from the step's aux, after the 'stat/*' arrays
    are summed over micro-batches: `step_metrics(aux)` (overrides same-named metrics);
  * metrics computed from eval-set stats: `eval_metrics(stats)`;
  * end-of-run artifacts (plots): `on_end(workdir, eval_stats)`.
"""

from __future__ import annotations


class Extension:
  name = "extension"

  def hooks(self) -> list:
    return []

  def grad_hooks(self) -> list:
    """(grads, state) -> grads, applied before the optimizer (effjax/train/step.py)."""
    return []

  def step_metrics(self, aux: dict) -> dict:
    """Metrics from the whole step's aux (jnp scalars), e.g. statistics of summed counts."""
    del aux
    return {}

  def phase(self, step: int) -> dict:
    del step
    return {}

  def eval_metrics(self, stats: dict) -> dict:
    del stats
    return {}

  def eval_params_metrics(self, params) -> dict:
    """Metrics computed from the parameters at each eval (e.g. spectral norms)."""
    del params
    return {}

  def eval_buffer_metrics(self, buffers) -> dict:
    """Metrics computed from the non-trainable state at each eval (e.g. oscillation EMAs)."""
    del buffers
    return {}

  def on_end(self, workdir: str, eval_stats: dict) -> list[str]:
    del workdir, eval_stats
    return []


def build_extensions(config, model) -> list[Extension]:
  """The extensions the config switches on."""
  exts = []
  if config.train.log_spectral:
    from effjax.train.spectral import SpectralExtension  # pylint: disable=g-import-not-at-top
    exts.append(SpectralExtension(model))
  if config.quant.method != "none":
    from effjax.train.quant_extension import QuantExtension  # pylint: disable=g-import-not-at-top
    exts.append(QuantExtension(config, model))
  if config.model.moe.num_experts:
    from effjax.train.moe_extension import MoEExtension  # pylint: disable=g-import-not-at-top
    exts.append(MoEExtension(config, model))
  return exts


def merged_phase(extensions, step: int) -> tuple:
  kwargs = {}
  for ext in extensions:
    kwargs.update(ext.phase(step))
  return tuple(sorted(kwargs.items()))

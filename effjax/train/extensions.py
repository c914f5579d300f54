"""Trainer extensions: how a technique plugs into the loop without editing it.

An extension may contribute
  * post-update hooks run inside the jitted step (non-trainable state updates,
    projections, restores): `hooks()`; gradient hooks before the optimizer: `grad_hooks()`;
  * metrics computed inside the jitted step from the step's aux, after the 'stat/*' arrays
    are summed over micro-batches: `step_metrics(aux)` (overrides same-named metrics);
  * a static per-step phase for the model (e.g. a top-k schedule): `phase(step)`
    returns hashable model-context fields; the trainer compiles one step per distinct phase;
  * metrics at each eval from the state and the eval-set stats: `on_eval(state, stats)`
    (the eval batches themselves are in `self.eval_data`, set by the trainer);
  * extra evaluations of the same parameters under other model configs (e.g. MoR's other
    selection rule), reported as eval/<name>/loss: `eval_variants()`;
  * end-of-run artifacts (plots): `on_end(workdir, eval_stats)`.
The list of extensions and when each is on: effjax/train/registry.py.
"""

from __future__ import annotations


class Extension:
  name = "extension"
  eval_data: list = []  # the eval batches (global arrays), set by the trainer

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
    """Keyword arguments that select this step's compiled program (e.g. an MoE top-k); must
    be constant between the steps `phase_changes` lists."""
    del step
    return {}

  def phase_changes(self) -> tuple[int, ...]:
    """The steps at which `phase` may change value (so FLOPs can be summed per interval)."""
    return ()

  @classmethod
  def enabled(cls, config) -> bool:
    """Whether `config` switches this extension on."""
    del config
    return False

  def on_eval(self, state, stats: dict) -> dict:
    """Metrics at an eval: `state` (params, buffers) and the eval set's summed 'stat/*'."""
    del state, stats
    return {}

  def eval_variants(self) -> dict:
    """{name: Config}: configs of the same parameters the eval set is also evaluated under;
    their eval metrics are reported as eval/<name>/loss (and bpb)."""
    return {}

  def on_end(self, workdir: str, eval_stats: dict) -> list[str]:
    del workdir, eval_stats
    return []


def phase_intervals(extensions, stop: int) -> list[tuple[int, int]]:
  """[start, end) step intervals covering [0, stop) on which every extension's phase is
  constant."""
  cuts = sorted({0, stop} | {s for e in extensions for s in e.phase_changes() if 0 < s < stop})
  return [(a, b) for a, b in zip(cuts, cuts[1:]) if a < b]


def merged_phase(extensions, step: int) -> tuple:
  kwargs = {}
  for ext in extensions:
    kwargs.update(ext.phase(step))
  return tuple(sorted(kwargs.items()))

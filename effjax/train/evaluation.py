"""Evaluation rows of the training loop: the eval set (or each mixture source and their
weighted mean) and the extensions' extra figures and variants. Moved out of trainer.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from effjax import data as data_lib
from effjax.train.state import TrainState
from effjax.train.step import summarize_eval


def eval_row(run, eval_fn) -> tuple[dict, dict]:
  if run.eval_sets:  # data.sources: per source, and the weight-averaged figure
    per_source = {name: evaluate(eval_fn, run.state, batches)
                  for name, batches in run.eval_sets.items()}
    row = data_lib.mixed_eval_row({n: r for n, (r, _) in per_source.items()},
                                  run.corpus.weights)
    stats = {}
    for _, source_stats in per_source.values():
      stats = {k: stats.get(k, 0) + v for k, v in source_stats.items()}
  else:
    row, stats = evaluate(eval_fn, run.state, run.eval_data)
  for ext in run.extensions:
    row.update(ext.on_eval(run.state, stats))
    for name, variant in ext.eval_variants().items():  # e.g. MoR's other selection rule
      key = (name, run.phase)
      if key not in run.variant_evals:
        run.variant_evals[key] = run.plan.eval_step(run.token_bytes, run.phase, config=variant)
      v_row, _ = evaluate(run.variant_evals[key], run.state, run.eval_data)
      row.update({f"eval/{name}/{k[len('eval/'):]}": v for k, v in v_row.items()})
  return row, stats


def evaluate(eval_fn, state: TrainState, eval_data: list) -> tuple[dict, dict]:
  """(eval metrics, summed 'stat/*' arrays over the eval set)."""
  sums = None
  for batch in eval_data:
    out = eval_fn(state.params, state.buffers, batch)
    sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
  sums = jax.device_get(sums)
  stats = {k: np.asarray(v) for k, v in sums.items() if k.startswith("stat/")}
  return {k: float(v) for k, v in summarize_eval(sums).items()}, stats

"""Top singular value per matrix type, by power iteration, logged at every eval: the
weight-decay-rule diagnostic of Fan et al. 2025 (docs/mup.md), where the
late-training top singular value of each matrix type should match across widths.

Matrix types are the module names of hidden matrices (q, k, v, o, gate, up, down, ...);
values are averaged over layers: metrics 'spec/sigma_max/<type>'. A scanned stack's matrices
(stacked on a leading layer axis) are taken one layer at a time.
"""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp

from effjax.models.layers import layer_stacked
from effjax.train.extensions import Extension


def sigma_max(w_IxO: jax.Array, iters: int = 20) -> jax.Array:
  """Largest singular value by power iteration on W^T W (fixed start: deterministic)."""
  w = w_IxO.astype(jnp.float32)
  v = jnp.ones((w.shape[-1],), jnp.float32) / jnp.sqrt(w.shape[-1])

  def body(_, v):
    u = w @ v
    v = w.T @ u
    return v / (jnp.linalg.norm(v) + 1e-30)

  v = jax.lax.fori_loop(0, iters, body, v)
  return jnp.linalg.norm(w @ v)


def matrix_types(specs: dict) -> dict[str, list[tuple]]:
  """{type name: [param paths]} for hidden matrices (2-D, or 3-D stacked over layers)."""
  groups = collections.defaultdict(list)
  for path, spec in jax.tree_util.tree_flatten_with_path(
      specs, is_leaf=lambda s: hasattr(s, "role"))[0]:
    keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
    if spec.role == "hidden" and len(spec.axes) - layer_stacked(spec.axes) == 2:
      groups[str(keys[-2])].append(tuple(keys))
  return dict(groups)


class SpectralExtension(Extension):
  name = "spectral"

  @classmethod
  def enabled(cls, config) -> bool:
    return config.train.log_spectral

  def __init__(self, config, model):
    del config
    self.groups = matrix_types(model.specs)

    def compute(params):
      out = {}
      for name, paths in self.groups.items():
        vals = []
        for path in paths:
          leaf = params
          for k in path:
            leaf = leaf[k]
          vals.append(jax.vmap(sigma_max)(leaf) if leaf.ndim == 3 else sigma_max(leaf)[None])
        out[f"spec/sigma_max/{name}"] = jnp.mean(jnp.concatenate(vals))
      return out

    self._compute = jax.jit(compute)

  def on_eval(self, state, stats) -> dict:
    del stats
    return {k: float(v) for k, v in jax.device_get(self._compute(state.params)).items()}

"""Models and the functional wrapper the trainer uses.

`build(config, vocab, seed)` returns a `FunctionalModel`: the NNX graph definition,
pure-dict params and buffers (non-trainable state), and a pure-dict tree of
`ParamSpec`s (role + logical axes) mirroring the params. `apply(params, buffers,
...)` runs the model as a pure function of those dicts.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import nnx

from effjax.config import Config
from effjax.models.layers import Buffer
from effjax.models.transformer import Dims, Transformer, count_params, ffn_params, resolve_dims
from effjax.parallel import sharding
from effjax.resolve import resolve

__all__ = ["Buffer", "Dims", "FunctionalModel", "ParamSpec", "Transformer", "build",
           "count_params", "ffn_params", "resolve_dims"]


@dataclasses.dataclass(frozen=True)
class ParamSpec:
  role: str
  axes: tuple


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def _pure(state) -> dict:
  return nnx.to_pure_dict(state) if hasattr(nnx, "to_pure_dict") else state.to_pure_dict()


def _axes(variable) -> tuple | None:
  try:
    return variable.axes
  except AttributeError:
    return None


class FunctionalModel:
  """A Transformer split into (graphdef, params, buffers) with a pure apply."""

  def __init__(self, module: Transformer):
    self.dims = module.dims
    self.graphdef, param_state, buffer_state = nnx.split(module, nnx.Param, Buffer)
    self._param_template = param_state
    self._buffer_template = buffer_state
    self.specs = _pure(jax.tree.map(lambda v: ParamSpec(v.role, v.axes), param_state,
                                    is_leaf=_is_var))
    # Buffers: logical axes where they were given (per-weight QAT state follows its kernel),
    # else None (replicated).
    self.buffer_specs = _pure(jax.tree.map(lambda v: ParamSpec("buffer", _axes(v)), buffer_state,
                                           is_leaf=_is_var))
    self.initial_params = _pure(param_state)
    self.initial_buffers = _pure(buffer_state)

  def module(self, params: dict, buffers: dict | None = None) -> Transformer:
    p = jax.tree.map(lambda v: v, self._param_template, is_leaf=_is_var)
    p = jax.tree.map(lambda x: x, p)  # fresh Variables; templates stay untouched
    nnx.replace_by_pure_dict(p, params)
    b = jax.tree.map(lambda x: x, self._buffer_template)
    if buffers:
      nnx.replace_by_pure_dict(b, buffers)
    return nnx.merge(self.graphdef, p, b)

  def apply(self, params: dict, buffers: dict, ids_BxL, *, positions_BxL=None,
            segment_ids_BxL=None, **kwargs) -> tuple[jax.Array, dict[str, Any]]:
    model = self.module(params, buffers)
    return model(ids_BxL, positions_BxL=positions_BxL, segment_ids_BxL=segment_ids_BxL, **kwargs)


def build(config: Config, tokenizer_vocab: int | None, seed: int | None = None,
          batch_groups: int | None = None) -> FunctionalModel:
  """batch_groups: batch shards (for per-shard balance losses); default from mesh.* and the
  'batch' rule of mesh.rules, as the trainer computes it. An `auto` the caller has not
  resolved for its target devices (effjax.resolve) is resolved for the local ones."""
  config = resolve(config, jax.devices())
  dims = resolve_dims(config.model, tokenizer_vocab)
  seed = config.seed if seed is None else seed
  if batch_groups is None:
    batch_groups = sharding.batch_shards(
        sharding.resolve_mesh_shape(config.mesh, jax.device_count()),
        sharding.rules_for(config.mesh))
  return FunctionalModel(Transformer(config.model, dims, batch_groups=batch_groups,
                                     rngs=nnx.Rngs(params=seed), quant=config.quant))

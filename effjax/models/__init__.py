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
from effjax import constraints
from effjax.models import mup
from effjax.models.builder import Builder
from effjax.models.index import ModelIndex, tagged
from effjax.models.layers import Buffer, Tag
from effjax.models.stack import Context
from effjax.models.transformer import Dims, Transformer, count_params, ffn_params, resolve_dims
from effjax.parallel import sharding
from effjax.resolve import resolve

__all__ = ["Buffer", "Context", "Dims", "FunctionalModel", "ModelIndex", "ParamSpec", "Tag",
           "Transformer", "build", "for_evaluation", "count_params", "ffn_params", "probes",
           "resolve_dims"]


@dataclasses.dataclass(frozen=True)
class ParamSpec:
  role: str
  axes: tuple
  fan_in_mult: float = 1.0   # fan_in / fan_in at model.base_width (muP; effjax/models/mup.py)
  fan_out_mult: float = 1.0


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def _pure(state) -> dict:
  return nnx.to_pure_dict(state) if hasattr(nnx, "to_pure_dict") else state.to_pure_dict()


def _meta(variable, name: str, default):
  return variable.get_metadata().get(name, default)


def _axes(variable) -> tuple | None:
  try:
    return variable.axes
  except AttributeError:
    return None


PROBE_PREFIX = "probe_"


def probes(module) -> dict:
  """Values sown as nnx.Intermediate 'probe_<name>' by tagged modules, as aux
  'act/<name>[/layer<i>]' (a scanned stack's come stacked over layers: row i)."""
  out = {}
  for _, node, tag, stacked in tagged(module):
    for name, value in vars(node).items():
      if isinstance(value, nnx.Intermediate) and name.startswith(PROBE_PREFIX):
        suffix = "" if tag.layer is None else f"/layer{tag.layer}"
        value = value.get_value()[-1]
        out[f"act/{name[len(PROBE_PREFIX):]}{suffix}"] = (value if stacked is None
                                                           else value[stacked])
  return out


class FunctionalModel:
  """A Transformer split into (graphdef, params, buffers) with a pure apply, and the model
  index of its tagged modules."""

  def __init__(self, module: Transformer):
    self.dims = module.dims
    self.loss_chunk = module.loss_chunk  # > 0: apply(..., targets_BxL=) returns per-token NLL
    self.index = ModelIndex(module)
    self.graphdef, param_state, buffer_state = nnx.split(module, nnx.Param, Buffer)
    self._param_template = param_state
    self._buffer_template = buffer_state
    self.specs = _pure(jax.tree.map(
        lambda v: ParamSpec(v.role, v.axes, _meta(v, "fan_in_mult", 1.0),
                            _meta(v, "fan_out_mult", 1.0)), param_state, is_leaf=_is_var))
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
            segment_ids_BxL=None, targets_BxL=None, **context) -> tuple[jax.Array, dict[str, Any]]:
    """context: the fields of models.Context (moe_top_k, probe); probes come back in aux.
    targets_BxL with model.loss_chunk > 0: returns the per-token NLL instead of the logits."""
    ctx = Context(**context)
    model = self.module(params, buffers)
    logits, aux = model(ids_BxL, positions_BxL=positions_BxL, segment_ids_BxL=segment_ids_BxL,
                        ctx=ctx, targets_BxL=targets_BxL)
    if ctx.probe:
      aux = {**aux, **probes(model)}
    return logits, aux

  def init_cache(self, batch: int, max_len: int):
    """Empty KV caches for incremental decoding (shapes only depend on the graph)."""
    return self.module(self.initial_params, self.initial_buffers).init_cache(batch, max_len)

  def decode(self, params: dict, buffers: dict, ids_BxS, cache, *, start, **context):
    """(logits [B, S, V], cache) of S new tokens at positions start ... (docs/generate.md)."""
    model = self.module(params, buffers)
    return model.decode(ids_BxS, start=start, cache=cache, ctx=Context(**context))

  def node(self, module, path: tuple, stacked: int | None = None):
    """The submodule of a merged `module` at an index path; stacked (an entry's layer row in
    a scanned stack): that layer's module, with its rows of the stacked state."""
    for key in path:
      module = module[key] if isinstance(key, int) else getattr(module, key)
    if stacked is None:
      return module
    graphdef, state = nnx.split(module)  # (state not given to `module` may be abstract)
    return nnx.merge(graphdef, jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype)
        if isinstance(x, jax.ShapeDtypeStruct) else x[stacked], state))


def for_evaluation(config: Config) -> Config:
  """The config evaluation and sampling run: model.attention.score replaced by eval_score
  (same parameters; e.g. an LSSA-trained model evaluated with LSSAR re-weighting), and an
  expert-choice MoR's model.mor.rule by eval_rule (the causal threshold rule)."""
  att, mor = config.model.attention, config.model.mor
  model = config.model
  if att.eval_score and att.eval_score != att.score:
    model = dataclasses.replace(model, attention=dataclasses.replace(att, score=att.eval_score))
  if mor.enabled and mor.router == "expert" and mor.rule != mor.eval_rule:
    model = dataclasses.replace(model, mor=dataclasses.replace(mor, rule=mor.eval_rule))
  return config if model is config.model else dataclasses.replace(config, model=model)


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
  module = Builder(config, dims, batch_groups=batch_groups, rngs=nnx.Rngs(params=seed)).model()
  if config.model.param == "mup" and config.model.base_width not in (0, config.model.d_model):
    base_config = dataclasses.replace(
        config, model=mup.base_model_config(config.model, dims.head_dim))
    base_dims = resolve_dims(base_config.model, tokenizer_vocab)
    base = nnx.eval_shape(lambda: Builder(base_config, base_dims, batch_groups=batch_groups,
                                          rngs=nnx.Rngs(params=seed)).model())
    mup.apply_width_rules(module, base)
  constraints.attach_power_buffers(module, config)  # no-op unless constraints.method needs them
  return FunctionalModel(module)

"""The run plan: model structure, optimizer, sharded state and the one step assembly.

`plan_state(config, vocab, mesh, rules)` is what the trainer, compile_check, coord_check, the
benchmarks and the export all build first; `StatePlan.compile_step` is the only place a
train step is assembled, jitted with the state's and batch's shardings and compiled (the
trainer per phase, compile_check for a TPU topology from a CPU host).

Sharded initialisation: no full copy of the parameters on any host.

`abstract_model` builds the model's structure (graph, parameter roles and logical axes,
shapes) without computing any weights; `init_state` computes the weights inside one jit
whose out_shardings are the mesh placements, so each device creates only its own shards
and a multi-process run needs no host-to-device transfer of parameters. With the
partitionable threefry PRNG (JAX's default) the values do not depend on the mesh.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from effjax import models
from effjax.config import Config
from effjax.parallel.sharding import (activation_sharding, batch_sharding, batch_shards,
                                      logical_to_spec, param_shardings, replicated)
from effjax.train import reweight as reweight_lib
from effjax.train.state import TrainState
from effjax.train.step import make_eval_step, make_train_step


def abstract_model(config: Config, vocab: int, batch_groups: int) -> models.FunctionalModel:
  """A FunctionalModel whose params and buffers are ShapeDtypeStructs (nothing computed)."""

  def build():
    m = models.build(config, vocab, batch_groups=batch_groups)
    return m.module(m.initial_params, m.initial_buffers)

  return models.FunctionalModel(nnx.eval_shape(build))


def state_shardings(model: models.FunctionalModel, tx: optax.GradientTransformation, mesh,
                    rules) -> TrainState:
  """NamedShardings of the whole TrainState: params from their logical axes, the optimizer
  state like its params (ZeRO-3 under fsdp), buffers from their logical axes where they
  have them (per-weight QAT state), else replicated like step and rng."""
  repl = replicated(mesh)
  p_shard = param_shardings(model.specs, model.initial_params, mesh, rules)
  opt_shapes = jax.eval_shape(tx.init, model.initial_params)
  # optax.multi_transform (optim.name=muon) leaves a MaskedNode where a branch skips a param.
  masked = lambda x: isinstance(x, optax.MaskedNode)
  opt_shard = optax.tree_map_params(tx, lambda x, s: x if masked(x) else s, opt_shapes, p_shard,
                                    transform_non_params=lambda _: repl, is_leaf=masked)
  b_shard = jax.tree.map(
      lambda spec, x: repl if spec.axes is None else NamedSharding(
          mesh, logical_to_spec(spec.axes, x.shape, mesh, rules)),
      model.buffer_specs, model.initial_buffers, is_leaf=lambda s: hasattr(s, "axes"))
  return TrainState(step=repl, params=p_shard, opt_state=opt_shard, buffers=b_shard, rng=repl)


def _init_fn(config: Config, vocab: int, batch_groups: int, tx):
  def init():
    m = models.build(config, vocab, batch_groups=batch_groups)
    params = m.initial_params
    return TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params),
                      buffers=m.initial_buffers, rng=jax.random.PRNGKey(config.seed))
  return init


def abstract_state(config: Config, vocab: int, batch_groups: int, tx,
                   shardings: TrainState) -> TrainState:
  """ShapeDtypeStructs of the TrainState carrying `shardings` (AOT compiles, restores)."""
  shapes = jax.eval_shape(_init_fn(config, vocab, batch_groups, tx))
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      shapes, shardings)


def init_state(config: Config, vocab: int, batch_groups: int, tx,
               shardings: TrainState) -> TrainState:
  """The initial TrainState, computed directly into `shardings` (every process calls it)."""
  return jax.jit(_init_fn(config, vocab, batch_groups, tx), out_shardings=shardings)()


@dataclasses.dataclass(frozen=True)
class StatePlan:
  """What the trainer, compile_check and the export all build before touching weights:
  the abstract model, the optimizer, the train state's shardings on `mesh`."""
  config: Config
  vocab: int
  batch_groups: int  # batch shards under the mesh and rules (MoE per-shard balance losses)
  model: models.FunctionalModel
  tx: optax.GradientTransformation
  schedule: object
  shardings: TrainState
  eval_model: models.FunctionalModel  # model.attention.eval_score, else `model`
  mesh: Mesh
  rules: dict

  def _args(self):
    return self.config, self.vocab, self.batch_groups, self.tx, self.shardings

  def abstract(self) -> TrainState:
    """ShapeDtypeStructs with the target shardings (AOT compiles, checkpoint restores)."""
    return abstract_state(*self._args())

  def init(self) -> TrainState:
    """The initial state, computed directly into the target shardings."""
    return init_state(*self._args())

  @property
  def batch_sharding(self) -> NamedSharding:
    return batch_sharding(self.mesh, self.rules)

  def abstract_batch(self, batch_size: int, seq_len: int) -> dict:
    return {k: jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32,
                                    sharding=self.batch_sharding)
            for k in ("inputs", "targets", "segment_ids", "positions")}

  def compile_step(self, state, batch, extensions=(), phase: tuple = ()):
    """(compiled train step, compile seconds): the step of effjax/train/step.py with the
    extensions' hooks, gradient hooks and step metrics, the phase's model context
    (e.g. moe_top_k), jitted with the state's and batch's shardings (the state donated)
    and compiled for `state` and `batch` (arrays or ShapeDtypeStructs)."""
    fn = make_train_step(self.model, self.tx, self.schedule,
                         grad_accum=self.config.train.grad_accum,
                         hooks=[h for ext in extensions for h in ext.hooks()],
                         grad_hooks=[h for ext in extensions for h in ext.grad_hooks()],
                         metric_fns=[ext.step_metrics for ext in extensions],
                         model_kwargs=dict(phase),
                         reweight=reweight_lib.from_config(self.config.train))
    t0 = time.perf_counter()
    with activation_sharding(self.mesh, self.rules):  # for sharding.constrain in model code
      compiled = jax.jit(fn, in_shardings=(self.shardings, self.batch_sharding),
                         out_shardings=(self.shardings, replicated(self.mesh)),
                         donate_argnums=(0,)).lower(state, batch).compile()
    return compiled, time.perf_counter() - t0

  def eval_step(self, token_bytes_V, phase: tuple = (), config: Config | None = None):
    """The jitted eval step (model.attention.eval_score's model) for a phase; config: the
    model of another config with the same parameters (an extension's eval variant)."""
    model = self.eval_model if config is None else abstract_model(config, self.vocab,
                                                                  self.batch_groups)
    return jax.jit(make_eval_step(model, token_bytes_V, dict(phase)),
                   out_shardings=replicated(self.mesh))


def plan_state(config: Config, vocab: int, mesh, rules) -> StatePlan:
  from effjax.optim import make_optimizer  # pylint: disable=g-import-not-at-top (cycle)
  groups = batch_shards(dict(mesh.shape), rules)
  model = abstract_model(config, vocab, groups)  # shapes only: no weights are computed
  tx, schedule = make_optimizer(config, model.specs)
  eval_config = models.for_evaluation(config)
  eval_model = model if eval_config is config else abstract_model(eval_config, vocab, groups)
  return StatePlan(config, vocab, groups, model, tx, schedule,
                   state_shardings(model, tx, mesh, rules), eval_model, mesh, rules)

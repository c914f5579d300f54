"""Sharded train-state initialisation: no full copy of the parameters on any host.

`abstract_model` builds the model's structure (graph, parameter roles and logical axes,
shapes) without computing any weights; `init_state` computes the weights inside one jit
whose out_shardings are the mesh placements, so each device creates only its own shards
and a multi-process run needs no host-to-device transfer of parameters. With the
partitionable threefry PRNG (JAX's default) the values do not depend on the mesh.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from effjax import models
from effjax.config import Config
from effjax.parallel.sharding import param_shardings, replicated
from effjax.train.state import TrainState


def abstract_model(config: Config, vocab: int, batch_groups: int) -> models.FunctionalModel:
  """A FunctionalModel whose params and buffers are ShapeDtypeStructs (nothing computed)."""

  def build():
    m = models.build(config, vocab, batch_groups=batch_groups)
    return m.module(m.initial_params, m.initial_buffers)

  return models.FunctionalModel(nnx.eval_shape(build))


def state_shardings(model: models.FunctionalModel, tx: optax.GradientTransformation, mesh,
                    rules) -> TrainState:
  """NamedShardings of the whole TrainState: params from their logical axes, the optimizer
  state like its params (ZeRO-3 under fsdp), buffers / step / rng replicated."""
  repl = replicated(mesh)
  p_shard = param_shardings(model.specs, model.initial_params, mesh, rules)
  opt_shapes = jax.eval_shape(tx.init, model.initial_params)
  opt_shard = optax.tree_map_params(tx, lambda _, s: s, opt_shapes, p_shard,
                                    transform_non_params=lambda _: repl)
  return TrainState(step=repl, params=p_shard, opt_state=opt_shard,
                    buffers=jax.tree.map(lambda _: repl, model.initial_buffers), rng=repl)


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

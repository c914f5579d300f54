"""Orbax checkpointing of the whole train state plus the grain data-iterator position.

Each checkpoint step directory holds two items:
  state: TrainState as a pure pytree (params, optimizer state, buffers, rng, step),
         saved asynchronously, restored directly into the target shardings (so a
         checkpoint written under one mesh restores under another);
  data:  the grain iterator state (one JSON file per process).
"""

from __future__ import annotations

import logging

import grain
import jax
import orbax.checkpoint as ocp

from effjax import paths
from effjax.train.state import TrainState


class Checkpointer:
  """Thin wrapper over ocp.CheckpointManager: save / restore_latest / wait / close."""

  def __init__(self, directory, *, keep: int = 3, async_save: bool = True):
    """directory: a local path or a cloud URL (effjax/paths.py); Orbax writes either."""
    self.directory = paths.absolute(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: TrainState, data_iterator=None, *, force: bool = True) -> bool:
    items = {"state": ocp.args.StandardSave(state.as_dict())}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
    if saved:
      logging.info("checkpoint at step %d (async) -> %s", step, self.directory)
    return saved

  def restore(self, step: int, abstract_state: TrainState, data_iterator=None) -> TrainState:
    """Restores into `abstract_state` (ShapeDtypeStructs carrying target shardings)."""
    items = {"state": ocp.args.StandardRestore(abstract_state.as_dict())}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))["state"]
    # Orbax returns NamedTuples (optax states) as plain tuples: put the target's tree
    # structure back (the leaf order is the same).
    target = abstract_state.as_dict()
    leaves = jax.tree.leaves(restored)
    if len(leaves) != len(jax.tree.leaves(target)):
      raise ValueError(f"checkpoint at step {step} in {self.directory} does not match the "
                       "model/optimizer of this config (different number of arrays)")
    return TrainState(**jax.tree.unflatten(jax.tree.structure(target), leaves))

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


"""Multi-process local checkpoints: a fast per-process tier next to the persistent one.

TECHNIQUES.md section 8.1: persistent checkpoints are limited by storage bandwidth, so keep
frequent copies on fast per-host storage and persist rarely. Built on Orbax's emergency
CheckpointManager (orbax.checkpoint.experimental.emergency): the mesh's `data` axis holds
R >= 2 replicas of the state, one per process; every replica except replica 0 writes the
state to its own `train.local_checkpoint_dir` every `train.local_checkpoint_every` steps. After a
failure JAX ends every process, the job restarts, and the newest step held by any replica is
read there and broadcast to the others (a process whose own local storage is empty or gone
recovers from a peer's copy).

What is effjax's, not Orbax's:
  * persistent checkpoints stay with effjax's Checkpointer (train.checkpoint_every, manifests,
    config item, fallback over damaged steps); Orbax's own persistent tier is kept empty;
  * the emergency manager stores one pytree, so the data position of every process (grain
    state as JSON bytes, gathered from all processes) travels inside it as a replicated uint8
    array next to the TrainState (params, optimizer state, buffers, RNG, step): a restore is
    exact, like a persistent one;
  * `choose_tier` picks where a start resumes from: the local step when it is newer than
    the newest persistent one, else the persistent path (also for --restore_step).

Test hook (tests/test_local_tier.py): EFFJAX_TEST_SIGKILL_AFTER_LOCAL_STEP=N makes a process
SIGKILL itself once its local checkpoint of step N is written (a deterministic hard loss).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from typing import Callable

import jax
import numpy as np

from effjax.config import ConfigError
from effjax.train.state import TrainState

DATA_BYTES = 1 << 14  # room for one process's grain state (JSON) in the checkpoint
KEEP = 2  # local steps kept per process
KILL_HOOK = "EFFJAX_TEST_SIGKILL_AFTER_LOCAL_STEP"


def choose_tier(local_step: int | None, persistent_step: int | None,
                restore_step: int | None = None) -> str:
  """'local' when the newest local step (held by any process) is newer than the newest
  persistent checkpoint and no explicit --restore_step was given; else 'persistent'."""
  if restore_step or not local_step:
    return "persistent"
  return "local" if local_step > (persistent_step or 0) else "persistent"


def check_mesh(mesh, abstract_state: TrainState, process_count: int, process_of) -> None:
  """ConfigError unless each process holds exactly one whole replica along `data`.

  process_of(device) -> process index. The emergency manager treats the slices of the
  replica axis as replicas: every slice must live in one process (and each process in one
  slice), and no array may be split over `data`."""
  keys = "train.local_checkpoint_dir needs"
  if process_count < 2:
    raise ConfigError(f"{keys} >= 2 processes (one data-parallel replica each; a peer holds "
                      "the copy); this run has 1. Set train.local_checkpoint_dir='' or launch "
                      "several processes (launch/local.py, docs/scale-out.md).")
  data_axis = mesh.axis_names.index("data")
  rows = np.moveaxis(mesh.devices, data_axis, 0).reshape(mesh.devices.shape[data_axis], -1)
  owners = [{process_of(d) for d in row} for row in rows]
  if len(rows) != process_count or any(len(o) != 1 for o in owners) or len(
      set().union(*owners)) != process_count:
    raise ConfigError(f"{keys} one data-parallel replica per process: mesh.data must equal "
                      f"the number of processes ({process_count}) with the other mesh axes "
                      f"inside a process; the mesh is {dict(mesh.shape)}.")
  split = [jax.tree_util.keystr(path) for path, x in
           jax.tree_util.tree_flatten_with_path(abstract_state)[0]
           if "data" in jax.tree.leaves(tuple(getattr(x.sharding, "spec", ())))]
  if split:
    raise ConfigError(f"{keys} the state replicated over the mesh's data axis; these arrays "
                      f"are split over it: {', '.join(split[:5])} (check mesh.rules).")


def _setup_orbax_multihost() -> None:
  """What the emergency manager needs outside Orbax's own launcher (as in its multi-tier
  initialization): absl flags parsed and the runtime <-> distributed id maps."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():  # orbax reads absl flags; effjax has none of its own
    flags.FLAGS.mark_as_parsed()
  from orbax.checkpoint._src.multihost import multihost  # pylint: disable=g-import-not-at-top
  multihost.initialize_runtime_to_distributed_ids()
  multihost.initialize_distributed_to_device_ids()


def _sync_operation_ids() -> None:
  """Brings Orbax's per-process operation counter to the same fresh value on every process.

  Orbax keys the signals of a save (e.g. 'step directory created') by this counter, so it
  must agree across processes. The emergency manager advances it differently per process
  (replica 0 skips local saves, only the restoring replica reads a local step): without
  this, a later persistent save on another process can find a signal of an older save and
  write into a directory that does not exist yet."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  # pylint: disable-next=g-import-not-at-top
  from orbax.checkpoint._src.futures import synchronization
  ids = synchronization.OperationIdGenerator
  top = int(np.max(multihost_utils.process_allgather(np.int32(ids.get_current_operation_id()))))
  while int(ids.get_current_operation_id()) < top:
    ids.next_operation_id()
  ids.next_operation_id()  # one no process has used


class LocalTier:
  """The local tier of one run: `due`, `save`, `latest_step`, `restore`, `discard_after`."""

  def __init__(self, directory: str, every: int, mesh, abstract_state: TrainState):
    check_mesh(mesh, abstract_state, jax.process_count(), lambda d: d.process_index)
    _setup_orbax_multihost()
    # pylint: disable-next=g-import-not-at-top
    from orbax.checkpoint.experimental.emergency import checkpoint_manager as em
    self.every, self.mesh, self.root = every, mesh, os.path.abspath(directory)
    self._replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    self._state_tree = jax.tree.structure(abstract_state.as_dict())
    self.abstract = {"state": abstract_state.as_dict(),
                     "data": jax.ShapeDtypeStruct((jax.process_count(), DATA_BYTES), np.uint8,
                                                  sharding=self._replicated)}
    # This process's own storage (several processes on one host share the directory).
    self.directory = os.path.join(os.path.abspath(directory), f"process_{jax.process_index()}")
    steps_dir, unused = os.path.join(self.directory, "steps"), os.path.join(self.directory,
                                                                            "orbax_persistent")
    os.makedirs(steps_dir, exist_ok=True)
    os.makedirs(unused, exist_ok=True)
    options = em.CheckpointManagerOptions(
        local=em.LocalCheckpointOptions(save_interval_steps=every, max_to_keep=KEEP),
        # effjax's Checkpointer writes the persistent checkpoints: Orbax's tier stays empty.
        persistent=em.PersistentCheckpointOptions(should_save_fn=lambda step, last: False))
    self.manager = em.CheckpointManager(steps_dir, unused, mesh, self.abstract, options=options)
    self.steps_dir = steps_dir
    self._saved = set()
    _sync_operation_ids()

  def due(self, step: int) -> bool:
    return step % self.every == 0 and step not in self._saved

  def latest_step(self) -> int | None:
    """The newest step any process holds locally (agreed by all processes)."""
    self.manager.reload()
    steps = self.manager.all_steps()
    _sync_operation_ids()
    return max(steps) if steps else None

  # ------------------------------------------------------------------------- save

  def _data_array(self, data_iterator) -> jax.Array:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    raw = json.dumps(data_iterator.get_state()).encode()
    if len(raw) > DATA_BYTES:
      raise ValueError(f"the data-iterator state ({len(raw)} bytes) exceeds the local "
                       f"checkpoint's room ({DATA_BYTES}); raise local_tier.DATA_BYTES")
    mine = np.zeros((DATA_BYTES,), np.uint8)
    mine[:len(raw)] = np.frombuffer(raw, np.uint8)
    every = np.asarray(multihost_utils.process_allgather(mine))  # (processes, DATA_BYTES)
    return jax.make_array_from_callback(every.shape, self._replicated, lambda i: every[i])

  def save(self, step: int, state: TrainState, data_iterator) -> bool:
    """Saves `state` and every process's data position (before the batch of `step`);
    asynchronous. Collective: every process calls it at the same step."""
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    self._saved.add(step)
    tree = {"state": state.as_dict(), "data": self._data_array(data_iterator)}
    saved = self.manager.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(tree)))
    _sync_operation_ids()
    if os.environ.get(KILL_HOOK) == str(step):
      self.manager.wait_until_finished()
      os.kill(os.getpid(), signal.SIGKILL)
    return saved

  # ------------------------------------------------------------------------- restore

  def restore(self, step: int, data_iterator) -> TrainState:
    """The state of a local step (from whichever process holds it) and this process's data
    position, set on `data_iterator`."""
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(self.abstract)))["state"]
    # Orbax may return NamedTuples (optax states) as tuples, and the broadcast from the
    # restoring replica may widen small integer dtypes (uint8 comes back as uint32): rebuild
    # the target's structure and dtypes.
    leaves = [x if x.dtype == a.dtype else x.astype(a.dtype) for x, a in
              zip(jax.tree.leaves(restored["state"]), jax.tree.leaves(self.abstract["state"]))]
    state = TrainState(**jax.tree.unflatten(self._state_tree, leaves))
    row = np.asarray(restored["data"].addressable_data(0))[jax.process_index()].astype(np.uint8)
    data_iterator.set_state(json.loads(bytes(row[row != 0]).decode()))
    _sync_operation_ids()
    self._saved = {step}
    return state

  def discard_after(self, step: int) -> None:
    """Removes this process's local steps newer than `step` (the run resumed from an older
    persistent one: they belong to a timeline that is being replaced)."""
    for name in os.listdir(self.steps_dir):
      if name.isdigit() and int(name) > step:
        shutil.rmtree(os.path.join(self.steps_dir, name), ignore_errors=True)
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("effjax_local_tier_discard")
    self.manager.reload()
    _sync_operation_ids()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def open_tier(config, mesh, abstract_state: TrainState) -> LocalTier | None:
  """The local tier of this config (None when train.local_checkpoint_dir is empty)."""
  t = config.train
  if not t.local_checkpoint_dir:
    return None
  return LocalTier(t.local_checkpoint_dir, t.local_checkpoint_every, mesh, abstract_state)


def restore_newest(ckpt, tier: LocalTier | None, abstract_state: TrainState, data_iterator, *,
                   restore_step: int | None, report: Callable[[str], None], say: Callable,
                   **restore_good_kw) -> tuple[int, TrainState | None, str]:
  """(step, state, where) from the newest tier: a local step newer than every persistent
  checkpoint wins; otherwise (or when the local restore fails) the persistent checkpoints
  (Checkpointer.restore_good, with its fallback over damaged steps)."""
  local_step = tier.latest_step() if tier else None
  if choose_tier(local_step, ckpt.latest_step(), restore_step) == "local":
    say(f"restoring local step {local_step} (newer than the persistent checkpoints; read "
        "where a process holds it and broadcast) ...")
    try:
      return local_step, tier.restore(local_step, data_iterator), f"{tier.root} (local tier)"
    except Exception as e:  # pylint: disable=broad-except  (orbax/tensorstore raise many kinds)
      report(f"WARNING: local step {local_step} could not be restored ({type(e).__name__}: "
             f"{str(e)[:300]}); falling back to the persistent checkpoints")
      _sync_operation_ids()
  start, state = ckpt.restore_good(abstract_state, data_iterator, step=restore_step,
                                   report=report, **restore_good_kw)
  if tier and local_step and local_step > start:
    report(f"local steps after {start} belong to the replaced timeline: removing them")
    tier.discard_after(start)
  return start, state, str(ckpt.directory)

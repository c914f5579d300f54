"""In-memory snapshots of the train state and rollback on a software fault.

TECHNIQUES.md section 8.1 (in-memory fault tolerance, 2025): disk checkpoints are limited by
storage bandwidth, so keep frequent asynchronous snapshots of the sharded state (params,
optimizer state, buffers, RNG) and of the data-iterator position in host memory, and on a
software fault (a non-finite loss, an exception from a step) restore the newest one instead of
the older disk checkpoint.

How a snapshot is taken without stalling the device: `take` dispatches a device-side copy of
the state (the train step donates its input, so the live buffers cannot be kept) and starts
an asynchronous device-to-host copy of each shard; `settle`, called one step later, once the
metrics of the snapshot's step have been checked, turns the shards into numpy arrays and drops
the device copy. Only settled snapshots are restored: a snapshot is trusted once the step that
produced it is known to be finite. Memory: one settled snapshot on the host, one in flight
(device copy for at most one step, then host).

`FaultInjector` is a test hook: a poisoned batch (every step that sees the batch first met at
a given step returns NaN and a poisoned state, or raises) and batches to skip (the reference
run that never saw the poisoned batch).
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from effjax.train.state import TrainState


def _index_key(index: tuple) -> tuple:
  return tuple((s.start, s.stop, s.step) if isinstance(s, slice) else s for s in index)


@dataclasses.dataclass
class _Leaf:
  shape: tuple
  dtype: Any
  sharding: Any
  shards: dict  # index key -> single-device array (in flight) or numpy array (settled)


@dataclasses.dataclass
class Snapshot:
  step: int
  leaves: list
  treedef: Any
  data_state: Any
  settled: bool = False
  seconds: float = 0.0  # host time spent taking and settling it

  def nbytes(self) -> int:
    return sum(a.nbytes for leaf in self.leaves for a in leaf.shards.values())


@jax.jit
def _device_copy(tree):
  return jax.tree.map(jnp.copy, tree)  # new buffers (a bare identity may forward its inputs)


def _start(state: TrainState) -> tuple[list, Any]:
  leaves, treedef = jax.tree.flatten(_device_copy(state))
  out = []
  for x in leaves:
    shards = {}
    for shard in x.addressable_shards:  # one copy per distinct index on this process
      key = _index_key(shard.index)
      if key not in shards:
        shard.data.copy_to_host_async()
        shards[key] = shard.data
    out.append(_Leaf(x.shape, x.dtype, x.sharding, shards))
  return out, treedef


class Snapshots:
  """Newest settled snapshot plus one in flight; `restore` rebuilds the sharded state."""

  def __init__(self, every: int):
    self.every = every
    self.settled: Snapshot | None = None
    self.pending: Snapshot | None = None
    self.taken = 0
    self.seconds = 0.0  # host time of all take + settle calls

  def due(self, step: int) -> bool:
    return bool(self.every) and step % self.every == 0

  def take(self, step: int, state: TrainState, data_state, *, trusted: bool = False):
    """Starts a snapshot of `state` (after `step` updates; `data_state` is the iterator
    position before the batch of `step`). trusted: settle now (a restored or fresh state)."""
    t0 = time.perf_counter()
    self.settle()
    leaves, treedef = _start(state)
    self.pending = Snapshot(step, leaves, treedef, data_state, seconds=time.perf_counter() - t0)
    self.seconds += self.pending.seconds
    self.taken += 1
    if trusted:
      self.settle()

  def settle(self):
    """The pending snapshot's step was checked: move it to the host and trust it."""
    if self.pending is None:
      return
    t0 = time.perf_counter()
    snap = self.pending
    for leaf in snap.leaves:
      leaf.shards = {k: np.asarray(a) for k, a in leaf.shards.items()}
    snap.settled = True
    snap.seconds += time.perf_counter() - t0
    self.seconds += time.perf_counter() - t0
    self.settled, self.pending = snap, None

  def discard_pending(self):
    self.pending = None

  def restore(self) -> TrainState:
    """The settled snapshot's state, on device with the shardings it had."""
    snap = self.settled
    arrays = [jax.make_array_from_callback(
        leaf.shape, leaf.sharding, lambda index, leaf=leaf: leaf.shards[_index_key(index)])
              for leaf in snap.leaves]
    return jax.tree.unflatten(snap.treedef, arrays)


class InjectedFault(RuntimeError):
  """Raised by FaultInjector (tests): stands for an exception from a train step."""


class FaultInjector:
  """Test hook. poison_at: the batch seen at these loop steps is poisoned: every step that
  sees that batch again (a replay after a rollback) faults too, as a bad batch would.
  mode: 'nan' (loss NaN and the new state's params NaN) or 'raise' (InjectedFault).
  skip_at: loop steps whose batch is skipped (the reference run that never saw it)."""

  def __init__(self, poison_at=(), mode: str = "nan", skip_at=()):
    self.poison_at, self.mode, self.skip_at = set(poison_at), mode, set(skip_at)
    self.poisoned: set[str] = set()
    self.faults = 0

  @staticmethod
  def _fingerprint(batch: dict) -> str:
    return hashlib.sha1(np.asarray(jax.device_get(batch["inputs"])).tobytes()).hexdigest()

  def after_step(self, step: int, batch: dict, state: TrainState, metrics: dict):
    """(state, metrics) after the step at `step` (before the increment), maybe faulted."""
    if not self.poison_at:
      return state, metrics
    fingerprint = self._fingerprint(batch)
    if step in self.poison_at and fingerprint not in self.poisoned:
      self.poison_at.discard(step)
      self.poisoned.add(fingerprint)
    if fingerprint not in self.poisoned:
      return state, metrics
    self.faults += 1
    if self.mode == "raise":
      raise InjectedFault(f"injected fault at step {step}")
    nan = lambda x: x * jnp.nan if jnp.issubdtype(x.dtype, jnp.floating) else x
    return (state.replace(params=jax.tree.map(nan, state.params)),
            {**metrics, "train/loss": jnp.float32(jnp.nan)})

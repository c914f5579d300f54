"""Multi-process recovery from a peer's local checkpoint with Orbax's emergency
CheckpointManager (orbax.checkpoint.experimental.emergency; TECHNIQUES.md section 8.1).

The mesh's data axis holds R >= 2 replicas of the state (here one per process). Replica 0
writes rare persistent checkpoints to shared storage; the other replicas write frequent
local checkpoints to their own fast storage (a RAM disk in production). After a failure the
whole job restarts (JAX ends every process once one is lost); on restore, the newest step
that some replica holds locally is read there and broadcast to the others, so the run
continues from the frequent local state, not the older persistent one.

The trainer's local tier (train.local_checkpoint_dir, effjax/train/local_tier.py) uses the
same manager; this module is the minimal demonstration its own multi-process test runs:

  python -m effjax.train.emergency --process_id=I --num_processes=2 --port=P --root=DIR \
      --phase=train|restore [--steps=6]

phase=train saves steps 1..steps (local every step, persistent every 4) and then SIGKILLs
its own process (a hard loss: nothing flushed); phase=restore prints one JSON line with the
step and values it restored and the steps each tier holds.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

PERSISTENT_EVERY = 4


def _initialize(process_id: int, num_processes: int, port: int):
  import jax  # pylint: disable=g-import-not-at-top
  jax.distributed.initialize(f"localhost:{port}", num_processes=num_processes,
                             process_id=process_id)
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():  # orbax reads absl flags; we have none of our own
    flags.FLAGS.mark_as_parsed()
  from orbax.checkpoint._src.multihost import multihost  # pylint: disable=g-import-not-at-top
  # The emergency manager maps between runtime and distributed ids (its setup, as in orbax's
  # own multi-tier initialization).
  multihost.initialize_runtime_to_distributed_ids()
  multihost.initialize_distributed_to_device_ids()


def state_at(step: int, sharding):
  """A state whose every value is the step (so a restore shows which step it came from)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  full = {"w_DxF": np.full((8, 4), float(step), np.float32),
          "b_F": np.full((4,), float(step), np.float32)}
  return {k: jax.make_array_from_callback(v.shape, sharding, lambda i, v=v: v[i])
          for k, v in full.items()}


def make_manager(root: str, mesh, abstract_state, *, local_every: int = 1,
                 persistent_every: int = PERSISTENT_EVERY):
  import jax  # pylint: disable=g-import-not-at-top
  # pylint: disable-next=g-import-not-at-top
  from orbax.checkpoint.experimental.emergency import checkpoint_manager as em
  local = os.path.join(root, f"local_p{jax.process_index()}")  # this process's own storage
  persistent = os.path.join(root, "persistent")
  os.makedirs(local, exist_ok=True)
  os.makedirs(persistent, exist_ok=True)
  options = em.CheckpointManagerOptions(
      local=em.LocalCheckpointOptions(save_interval_steps=local_every, max_to_keep=2),
      persistent=em.PersistentCheckpointOptions(save_interval_steps=persistent_every,
                                                max_to_keep=2))
  return em.CheckpointManager(local, persistent, mesh, abstract_state, options=options)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--process_id", type=int, required=True)
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument("--port", type=int, required=True)
  parser.add_argument("--root", required=True)
  parser.add_argument("--phase", choices=("train", "restore"), required=True)
  parser.add_argument("--steps", type=int, default=6)
  args = parser.parse_args(argv)
  _initialize(args.process_id, args.num_processes, args.port)
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh, NamedSharding  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  # One replica per process along "data" (the replica axis, index 0).
  mesh = Mesh(np.array(jax.devices()).reshape(args.num_processes, -1), ("data", "model"))
  sharding = NamedSharding(mesh, P())
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state_at(0, sharding))
  manager = make_manager(args.root, mesh, abstract)
  if args.phase == "train":
    for step in range(1, args.steps + 1):
      manager.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(
          state_at(step, sharding))))
    manager.wait_until_finished()
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("effjax_emergency_saved")  # every tier written
    print(json.dumps({"process": jax.process_index(), "saved": args.steps}), flush=True)
    # A hard loss: no shutdown, no flush. Whichever process dies first, JAX aborts the other
    # (SIGABRT) if its own SIGKILL has not landed yet: the job is lost either way.
    os.kill(os.getpid(), signal.SIGKILL)
  step = manager.latest_step()
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      abstract)))["state"]
  values = sorted({float(v) for x in jax.tree.leaves(restored)
                   for v in np.unique(np.asarray(x.addressable_data(0)))})
  local = os.path.join(args.root, f"local_p{jax.process_index()}")
  print(json.dumps({"process": jax.process_index(), "restored_step": int(step),
                    "values": values,
                    "local_steps_here": sorted(int(d) for d in os.listdir(local) if d.isdigit()),
                    "persistent_steps": sorted(int(d) for d in os.listdir(
                        os.path.join(args.root, "persistent")) if d.isdigit())}), flush=True)
  manager.close()
  return 0


if __name__ == "__main__":
  sys.exit(main())

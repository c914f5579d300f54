"""Multi-process local checkpoints in the trainer (issue 17; effjax/train/local_tier.py).

Slow test: two CPU processes run the real trainer with persistent checkpoints every 4 steps
and local ones every step; process 1 is SIGKILLed right after its local step 6 (persistent: 4),
process 0 is then killed too (JAX cannot continue without it), both are restarted and the run
must resume from local step 6, which only process 1 holds (process 0 reads it from its peer),
and end with the params and per-step losses of an uninterrupted 2-process run, bit for bit.
Fast tests: the tier choice, the config keys and the mesh requirements."""

import os
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest

from effjax import checks
from effjax import config as C
from effjax.train import local_tier

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 12
TRAIN = ["--config=configs/tiny.py", f"--config.train.steps={STEPS}",
         "--config.train.checkpoint_every=4", "--config.train.log_every=1",
         "--config.train.eval_every=6", "--config.train.local_checkpoint_every=1"]


def test_a_local_step_newer_than_the_persistent_ones_wins():
  assert local_tier.choose_tier(6, 4) == "local"
  assert local_tier.choose_tier(6, None) == "local"
  assert local_tier.choose_tier(4, 4) == "persistent"  # same step: the checksummed one
  assert local_tier.choose_tier(3, 4) == "persistent"
  assert local_tier.choose_tier(None, 4) == "persistent"
  assert local_tier.choose_tier(6, 4, restore_step=4) == "persistent"  # explicit step


def test_local_tier_keys_are_checked():
  load = lambda *a: checks.load(["--config=configs/tiny.py", *a])[0]
  t = load("--config.train.local_checkpoint_dir=/dev/shm/x",
           "--config.train.local_checkpoint_every=5").train
  assert (t.local_checkpoint_dir, t.local_checkpoint_every) == ("/dev/shm/x", 5)
  with pytest.raises(C.ConfigError, match="local_checkpoint_every go together"):
    load("--config.train.local_checkpoint_dir=/dev/shm/x")
  with pytest.raises(C.ConfigError, match="local_checkpoint_every go together"):
    load("--config.train.local_checkpoint_every=5")
  with pytest.raises(C.ConfigError, match="must be a local path"):
    load("--config.train.local_checkpoint_dir=gs://bucket/x",
         "--config.train.local_checkpoint_every=5")
  with pytest.raises(C.ConfigError, match="mesh.data=1"):
    load("--config.train.local_checkpoint_dir=/dev/shm/x",
         "--config.train.local_checkpoint_every=5", "--config.mesh.data=1")


def _mesh(shape, owners):
  """A stand-in mesh (data, fsdp) whose devices are their owning process indices."""
  devices = np.array(owners, dtype=object).reshape(shape)
  return types.SimpleNamespace(axis_names=("data", "fsdp"), devices=devices,
                               shape=dict(zip(("data", "fsdp"), shape)))


def _leaf(*spec):
  return types.SimpleNamespace(sharding=types.SimpleNamespace(spec=spec))


def test_local_tier_needs_one_whole_replica_per_process():
  state = {"w": _leaf("fsdp", None), "b": _leaf(None)}
  local_tier.check_mesh(_mesh((2, 2), [0, 0, 1, 1]), state, 2, int)  # fine
  with pytest.raises(C.ConfigError, match=">= 2 processes"):
    local_tier.check_mesh(_mesh((1, 1), [0]), state, 1, int)
  with pytest.raises(C.ConfigError, match="mesh.data must equal the number of processes"):
    local_tier.check_mesh(_mesh((4, 1), [0, 0, 1, 1]), state, 2, int)
  with pytest.raises(C.ConfigError, match="mesh.data must equal the number of processes"):
    local_tier.check_mesh(_mesh((2, 2), [0, 1, 0, 1]), state, 2, int)  # replicas span both
  with pytest.raises(C.ConfigError, match=r"split over it: \['w'\]"):
    local_tier.check_mesh(_mesh((2, 1), [0, 1]), {"w": _leaf(("fsdp", "data"))}, 2, int)


def _start(workdir, local_dir, port, kill_process_1_at=None):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  procs = []
  for i in range(2):
    penv = dict(env)
    if i == 1 and kill_process_1_at is not None:
      penv[local_tier.KILL_HOOK] = str(kill_process_1_at)
    log = open(os.path.join(os.path.dirname(workdir), f"{os.path.basename(workdir)}_p{i}.log"),
               "a")
    procs.append((subprocess.Popen(
        [sys.executable, "-m", "effjax.train", *TRAIN, f"--workdir={workdir}",
         f"--config.train.local_checkpoint_dir={local_dir}",
         f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"],
        cwd=REPO, env=penv, stdout=log, stderr=subprocess.STDOUT), log.name))
  return procs


def _wait(procs, timeout=400):
  codes = [p.wait(timeout=timeout) for p, _ in procs]
  return codes, [open(name).read() for _, name in procs]


def _final_state(workdir):
  """The step-STEPS state of a 2-process run, restored in this one process."""
  import jax
  import orbax.checkpoint as ocp
  path = os.path.join(workdir, "checkpoints", str(STEPS), "state")
  checkpointer = ocp.StandardCheckpointer()
  meta = checkpointer.metadata(path)
  tree = getattr(getattr(meta, "item_metadata", meta), "tree", meta)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
  return checkpointer.restore(path, target)


def _compare(reference, resumed):
  """How `resumed` differs from `reference` (final params, per-step losses, duplicated rows)."""
  import jax
  from effjax import chaos
  problems = []
  a, b = (jax.tree.leaves(_final_state(w)) for w in (reference, resumed))
  if not a or len(a) != len(b) or any(not np.array_equal(np.asarray(x), np.asarray(y))
                             for x, y in zip(a, b)):
    problems.append("final state differs from the uninterrupted run")
  ra, rb = chaos._losses(reference), chaos._losses(resumed)  # pylint: disable=protected-access
  problems += [f"{k} differs: {ra[k]} vs {rb[k]}" for k in ra if ra[k] != rb[k]]
  logged = [s for s, _ in rb["train/loss"]]
  if len(logged) != len(set(logged)) or len(logged) != STEPS:
    problems.append(f"logged steps {logged}")
  return problems


def _steps(directory):
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit()) if os.path.isdir(
      directory) else []


@pytest.mark.slow
def test_a_killed_process_resumes_from_its_peers_local_step(tmp_path):
  ref, run = str(tmp_path / "ref"), str(tmp_path / "run")
  codes, logs = _wait(_start(ref, str(tmp_path / "ref_local"), 12491))
  assert codes == [0, 0], logs[0][-3000:]

  local = str(tmp_path / "run_local")
  procs = _start(run, local, 12492, kill_process_1_at=6)
  assert procs[1][0].wait(timeout=400) == -signal.SIGKILL, open(procs[1][1]).read()[-3000:]
  deadline = time.time() + 30  # process 0 cannot go on without it; a scheduler would kill it
  while procs[0][0].poll() is None and time.time() < deadline:
    time.sleep(0.5)
  if procs[0][0].poll() is None:
    procs[0][0].kill()
  assert procs[0][0].wait() != 0
  persistent = _steps(os.path.join(run, "checkpoints"))
  assert max(persistent) == 4, persistent
  assert 6 in _steps(os.path.join(local, "process_1", "steps"))
  assert _steps(os.path.join(local, "process_0", "steps")) == []  # replica 0 keeps none

  codes, logs = _wait(_start(run, local, 12493))
  assert codes == [0, 0], (logs[0][-3000:], logs[1][-3000:])
  assert "resumed from checkpoint at step 6 in" in logs[0] and "(local tier)" in logs[0], \
      logs[0][-3000:]
  assert _compare(ref, run) == []  # params and per-step losses, bit for bit

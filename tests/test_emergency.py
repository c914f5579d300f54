"""Multi-process recovery from a peer's local checkpoint (issue 17; effjax/train/emergency.py):
two CPU processes with jax.distributed on localhost, one data-parallel replica each. Replica 1
checkpoints locally every step, replica 0 persistently every 4 steps; after both processes are
SIGKILLed at step 6 and restarted, both restore step 6 (from replica 1's local storage, which
process 0 does not have), not the persistent step 4."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _phase(root, phase, port):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  env.pop("XLA_FLAGS", None)  # one CPU device per process
  cmd = lambda i: [sys.executable, "-m", "effjax.train.emergency", f"--process_id={i}",
                   "--num_processes=2", f"--port={port}", f"--root={root}", f"--phase={phase}"]
  procs = [subprocess.Popen(cmd(i), cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in (0, 1)]
  outs = [p.communicate(timeout=300) for p in procs]
  return [p.returncode for p in procs], outs


def _report(out):
  lines = [l for l in out.splitlines() if l.startswith("{")]
  return json.loads(lines[-1]) if lines else None


def test_restart_restores_the_peers_local_step_not_the_older_persistent_one(tmp_path):
  root = str(tmp_path)
  codes, outs = _phase(root, "train", 12471)
  # Both saved step 6, then died: SIGKILL, or SIGABRT from JAX once the other was gone.
  assert all(c in (-9, -6) for c in codes), [o[1][-2000:] for o in outs]
  assert all(_report(o[0]) == {"process": i, "saved": 6} for i, o in enumerate(outs)), outs
  codes, outs = _phase(root, "restore", 12473)
  assert codes == [0, 0], [o[1][-3000:] for o in outs]
  r0, r1 = (_report(o[0]) for o in outs)
  assert r0["persistent_steps"] == [1, 4]  # persistent every 4 steps (max_to_keep 2)
  assert r0["local_steps_here"] == [] and r1["local_steps_here"] == [5, 6]
  for r in (r0, r1):  # process 0 got step 6 from its peer's local storage
    assert r["restored_step"] == 6 and r["values"] == [6.0], r

"""Multi-process training (issue 4): two processes on localhost via launch/local.py, each
with 2 forced CPU devices, on a hybrid mesh whose data axis crosses processes, against one
process with 4 devices (the same mesh sizes and global batch); process-0-only writing;
resume under another mesh; the distributed flags."""

import json
import os
import subprocess
import sys

import pytest

from effjax import distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = ["--config=configs/tiny.py", "--config.train.eval_every=10",
         "--config.train.checkpoint_every=10"]


def _losses(workdir):
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}, rows


def _run(cmd, env=None, timeout=300):
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _two_process(workdir, steps, port, mesh=()):
  return _run([sys.executable, "launch/local.py", "--num_processes=2", "--devices_per_process=2",
               f"--port={port}", "--", *TRAIN, f"--workdir={workdir}",
               f"--config.train.steps={steps}", *mesh])


# data=2 x fsdp=2 where the data axis crosses the two processes (a hybrid DCN x ICI mesh,
# processes standing in for slices); the single process has the same axis sizes. The batch
# is split over (fsdp, data), fsdp outermost, so each process holds row blocks 0, 2 or 1, 3:
# interleaved rows, as on topology-aware TPU meshes.
MESH = ["--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.rules=batch=fsdp+data"]
HYBRID = [*MESH, "--config.mesh.dcn.data=2"]


def test_two_processes_match_one_process_and_resume(tmp_path):
  two, one = str(tmp_path / "two"), str(tmp_path / "one")
  r = _two_process(two, 20, 12361, HYBRID)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
  r1 = _run([sys.executable, "-m", "effjax.train", *TRAIN, f"--workdir={one}",
             "--config.train.steps=20", *MESH], env=env)
  assert r1.returncode == 0, r1.stderr[-3000:]
  l2, rows2 = _losses(two)
  l1, _ = _losses(one)
  assert sorted(l2) == sorted(l1) and len(l2) >= 4
  # Same global batch and mesh sizes (the device order differs); only the all-reduce
  # differs (gloo across processes vs in-process), which reorders fp32 sums: 1e-4 relative.
  for step in l1:
    assert l2[step] == pytest.approx(l1[step], rel=1e-4), (step, l2[step], l1[step])
  # Process 0 alone writes metrics: each logged step appears once.
  steps = [r["step"] for r in rows2 if "train/loss" in r]
  assert len(steps) == len(set(steps))
  assert not os.path.exists(os.path.join(two, "process_1_metrics.jsonl"))
  # Resume with more steps from the step-20 checkpoint, under the default mesh (data=4):
  # orbax reshards across processes.
  r = _two_process(two, 30, 12362)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  l2b, _ = _losses(two)
  assert max(l2b) == 30 and sorted(l2b)[:len(l2)] == sorted(l2)
  assert "resum" in r.stdout.lower() + r.stderr.lower()


# "off" (slow): the same stop path without the coordination service's shutdown barrier.
@pytest.mark.parametrize("service", ["on", pytest.param("off", marks=pytest.mark.slow)])
def test_a_signal_to_one_process_stops_all_at_the_same_step(tmp_path, service):
  """SIGTERM to process 1 alone: both processes checkpoint the same step and exit 75 (a
  collective checkpoint needs every process). With JAX's preemption service (the default)
  its sync point picks the step; with the service off the signal is shared by an
  allgather every step."""
  import signal
  import time
  workdir = str(tmp_path / "run")
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_ENABLE_PREEMPTION_SERVICE="true" if service == "on" else "false")
  port = 12371 if service == "on" else 12372
  logs = [open(os.path.join(str(tmp_path), f"p{i}.log"), "w") for i in range(2)]
  procs = [subprocess.Popen([sys.executable, "-m", "effjax.train", *TRAIN, f"--workdir={workdir}",
                             "--config.train.steps=100000", "--config.train.log_every=1",
                             f"--coordinator_address=localhost:{port}", "--num_processes=2",
                             f"--process_id={i}"], cwd=REPO, env=env, stdout=logs[i],
                            stderr=subprocess.STDOUT) for i in range(2)]
  try:
    deadline = time.time() + 240
    metrics = os.path.join(workdir, "metrics.jsonl")
    while time.time() < deadline and not (os.path.exists(metrics) and
                                          sum(1 for _ in open(metrics)) >= 5):
      assert all(p.poll() is None for p in procs), open(logs[0].name).read()[-3000:]
      time.sleep(0.5)
    procs[1].send_signal(signal.SIGTERM)
    codes = [p.wait(timeout=240) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  out = [open(f.name).read() for f in logs]
  assert codes == [75, 75], (codes, out[0][-2000:], out[1][-2000:])
  steps = os.listdir(os.path.join(workdir, "checkpoints"))
  saved = [int(s) for s in steps if s.isdigit()]
  assert saved and f"saved checkpoint at step {max(saved)}" in out[0], out[0][-2000:]
  assert "all processes" in out[0], out[0][-2000:]
  assert ("preemption service is off" in out[1]) == (service == "off"), out[1][-2000:]


def test_distributed_flags_are_checked():
  opts, rest = distributed.split_flags(["--config=x", "--coordinator_address=h:1",
                                        "--num_processes", "2", "--process_id=1"])
  assert opts == {"coordinator_address": "h:1", "num_processes": 2, "process_id": 1}
  assert rest == ["--config=x"]
  assert distributed.split_flags(["--distributed"])[0] == {"auto": True}
  with pytest.raises(distributed.DistributedError, match="without --process_id"):
    distributed.split_flags(["--coordinator_address=h:1", "--num_processes=2"])
  with pytest.raises(distributed.DistributedError, match="--process_id=2 must be in"):
    distributed.split_flags(["--coordinator_address=h:1", "--num_processes=2", "--process_id=2"])
  with pytest.raises(distributed.DistributedError, match="integer"):
    distributed.split_flags(["--coordinator_address=h:1", "--num_processes=two",
                             "--process_id=0"])


# slow (~60 s on 2 cores, three 8-device subprocesses): the default suite resumes across
# processes (test_two_processes_match_one_process_and_resume) and checks sharded runs
# against one device (test_train.py's 8-device test); this adds resharding on restore.
@pytest.mark.slow
def test_checkpoint_restores_under_another_mesh(tmp_path):
  """Saved under fsdp=8 on 8 devices, resumed under fsdp=4 x tensor=2 and on 1 device: the
  continued losses equal resuming the same checkpoint under fsdp=8 (orbax reshards to the
  new mesh). A 10-step run resumed with steps=20 has another lr schedule than a 20-step
  run, so the reference is a resume too."""
  import shutil
  eight = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
  one = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  fsdp8 = ["--config.mesh.data=1", "--config.mesh.fsdp=8"]

  def train(workdir, steps, env, mesh):
    r = _run([sys.executable, "-m", "effjax.train", *TRAIN, f"--workdir={workdir}",
              f"--config.train.steps={steps}", *mesh], env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stderr

  saved = str(tmp_path / "saved")
  train(saved, 10, eight, fsdp8)
  shutil.copytree(saved, str(tmp_path / "same"))
  train(str(tmp_path / "same"), 20, eight, fsdp8)
  reference, _ = _losses(str(tmp_path / "same"))
  for name, env, mesh in (("tp", eight, ["--config.mesh.data=1", "--config.mesh.fsdp=4",
                                         "--config.mesh.tensor=2"]),
                          ("single", one, [])):
    workdir = str(tmp_path / name)
    shutil.copytree(saved, workdir)
    log = train(workdir, 20, env, mesh)
    assert "resumed from checkpoint at step 10" in log
    losses, _ = _losses(workdir)
    for step in (15, 20):  # fp32 sums in another order on another mesh: 1e-4 relative
      assert losses[step] == pytest.approx(reference[step], rel=1e-4), (name, step)


def test_compile_check_reports_memory_for_a_cpu_mesh_and_names_tpu_topologies():
  r = _run([sys.executable, "-m", "effjax.compile_check", "--config=configs/tiny.py",
            "--topology=cpu:8", "--config.mesh.data=1", "--config.mesh.fsdp=4",
            "--config.mesh.tensor=2"], env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert r.returncode == 0, r.stderr[-3000:]
  assert "mesh {'data': 1, 'fsdp': 4, 'tensor': 2, 'expert': 1}" in r.stderr
  temp = [l for l in r.stdout.splitlines() if l.startswith("| temp_size")]
  assert temp and float(temp[0].split("|")[2]) > 0
  from effjax.compile_check import tpu_topology_name
  assert tpu_topology_name("v5p-128") == "v5p:4x4x4"  # 128 TensorCores = 64 chips
  assert tpu_topology_name("v5e-16") == "v5e:4x4"
  assert tpu_topology_name("4x4", "v6e") == "v6e:4x4"


def test_compile_check_without_libtpu_says_what_is_missing():
  import importlib.util
  if importlib.util.find_spec("libtpu") is not None:
    pytest.skip("libtpu is installed: the TPU topology would compile")
  r = _run([sys.executable, "-m", "effjax.compile_check", "--config=configs/tiny.py",
            "--topology=v5p-8"])
  assert r.returncode != 0 and "needs libtpu" in r.stdout + r.stderr


def test_sharding_rules_come_from_config():
  from effjax import checks, config as C
  from effjax.parallel import sharding
  rules = sharding.rules_from_string("mlp=fsdp, embed=none, batch=data+fsdp+tensor")
  assert rules["mlp"] == "fsdp" and rules["embed"] is None
  assert rules["batch"] == ("data", "fsdp", "tensor") and rules["heads"] == "tensor"
  import jax
  from jax.sharding import PartitionSpec as P
  mesh = sharding.make_mesh(C.MeshConfig(), jax.devices()[:1])
  assert sharding.logical_to_spec(("embed", "mlp"), (8, 16), mesh) == P("fsdp", "tensor")
  assert sharding.logical_to_spec(("embed", "mlp"), (8, 16), mesh, rules) == P(None, "fsdp")
  with pytest.raises(C.ConfigError, match="mesh.rules.*LOGICAL one of"):
    checks.load(["--config=configs/tiny.py", "--config.mesh.rules=mpl=fsdp"])
  with pytest.raises(C.ConfigError, match="mesh.rules.*data, fsdp, tensor, expert"):
    checks.load(["--config=configs/tiny.py", "--config.mesh.rules=mlp=model"])
  r = _run([sys.executable, "-m", "effjax.compile_check", "--config=configs/tiny.py",
            "--topology=cpu:8", "--config.mesh.data=1", "--config.mesh.fsdp=8",
            "--config.mesh.rules=mlp=fsdp,embed=none"], env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert r.returncode == 0, r.stderr[-3000:]

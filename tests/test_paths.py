"""Cloud-storage workdirs (issue 20, bug 1): every workdir file goes through effjax/paths.py.

Before the fix a gs:// workdir made a local folder ./gs:/BUCKET/..., wrote the config and
metrics there and crashed at the first checkpoint. Two tests, no credentials needed:
  * a file:// URL workdir, end to end: train, checkpoint, resume, eval, generate;
  * the TPU-pod example's own train command (launch/tpu_pod.sh, DRY_RUN) against a gs://
    workdir on an in-memory fake of Google Cloud Storage (fsspec's memory filesystem under
    the gs protocol). Orbax writes gs:// checkpoints through tensorstore's GCS driver, which
    needs a real bucket, so there only the checkpoint directory is mapped to a local folder;
    every other file must land in the fake bucket and nothing in the working directory.
"""

import importlib
import json
import os
import shlex
import subprocess

import pytest

from effjax import config as C
from effjax import paths
from tests.conftest import REPO, TINY

FAST = ["--config.train.steps=3", "--config.train.eval_every=3", "--config.train.log_every=1",
        "--config.train.checkpoint_every=3", "--config.train.warmup_steps=1",
        "--config.train.plot=true", "--config.train.sample_tokens=5"]
RUN_FILES = ("config.json", "run_info.json", "metrics.jsonl", "final_metrics.json", "loss.png",
             "sample.txt")


def test_paths_map_file_urls_to_local_folders_and_keep_cloud_urls(tmp_path):
  assert str(paths.as_path(f"file://{tmp_path}/x")) == f"{tmp_path}/x"
  assert not paths.is_url(f"file://{tmp_path}") and paths.is_url("gs://b/x")
  assert str(paths.as_path("gs://b/runs") / "x") == "gs://b/runs/x"
  assert str(paths.absolute("gs://b/x")) == "gs://b/x"


def test_a_file_url_workdir_trains_resumes_evaluates_and_generates(tmp_path, monkeypatch):
  from effjax import eval as eval_cli
  from effjax import load, sampling
  from effjax.train import trainer
  monkeypatch.chdir(tmp_path)  # a stray relative folder ('file:') would appear here
  url = f"file://{tmp_path}/runs/x"
  cfg, _ = C.load(["--config=" + TINY, *FAST])
  assert trainer.train(cfg, url, quiet=True).exit_code == 0
  cfg, _ = C.load(["--config=" + TINY, *FAST, "--config.train.steps=6"])
  result = trainer.train(cfg, url, quiet=True)
  assert result.exit_code == 0 and result.step == 6
  local = tmp_path / "runs" / "x"
  assert all((local / f).exists() for f in RUN_FILES)
  assert sorted(os.listdir(local / "checkpoints")) == ["3", "6"]
  assert json.loads((local / "run_info.json").read_text())["resumes"][0]["step"] == 3
  assert eval_cli.main([f"--workdir={url}", "--step=3"]) == 0 and (local / "eval_3.json").exists()
  run = load.load_run(url)
  out = sampling.generate(run.model, run.params, run.buffers, [1, 2], max_tokens=3,
                          rng=__import__("jax").random.PRNGKey(0), temperature=0.0, context=8)
  assert run.step == 6 and len(out) == 3
  assert sorted(os.listdir(tmp_path)) == ["runs"]


@pytest.fixture
def fake_gcs(monkeypatch):
  """gs:// served by an in-memory fsspec filesystem (what epath uses without TensorFlow)."""
  fsspec = pytest.importorskip("fsspec")
  from fsspec.implementations.memory import MemoryFileSystem

  class FakeGCS(MemoryFileSystem):
    protocol = ("gs", "gcs")
    store, pseudo_dirs = {}, [""]

    def __init__(self, *args, finalize_on_close=None, **kwargs):
      del finalize_on_close
      super().__init__(*args, **kwargs)

    @classmethod
    def _strip_protocol(cls, path):
      for prefix in ("gs://", "gcs://"):
        path = path[len(prefix):] if path.startswith(prefix) else path
      return "/" + path.lstrip("/").rstrip("/")

  monkeypatch.setenv("EPATH_USE_TF", "false")
  known = importlib.import_module("fsspec.registry")._registry  # pylint: disable=protected-access
  saved = {p: known.get(p) for p in ("gs", "gcs")}
  for proto in ("gs", "gcs"):
    fsspec.register_implementation(proto, FakeGCS, clobber=True)
  yield FakeGCS
  for proto, cls in saved.items():  # back to the lazy gcsfs entry
    known.pop(proto, None)
    if cls is not None:
      known[proto] = cls


def _pod_train_args(*args) -> list[str]:
  """The train command launch/tpu_pod.sh runs on every worker (DRY_RUN prints it)."""
  proc = subprocess.run(["bash", os.path.join(REPO, "launch", "tpu_pod.sh"), "effjax-test", "zone",
                         "v5p-8", "runtime", "--", *args], capture_output=True, text=True,
                        env=dict(os.environ, DRY_RUN="1"), cwd=REPO, timeout=60)
  assert proc.returncode == 0, proc.stderr
  line = next(l for l in proc.stderr.splitlines() if "python -m effjax.train" in l)
  return shlex.split(line.split("python -m effjax.train", 1)[1])


def test_the_pod_example_trains_into_a_gs_workdir(fake_gcs, tmp_path, monkeypatch):
  from effjax import sweep
  from effjax.experiments import study
  from effjax.train import __main__ as train_main
  from effjax.train import trainer
  monkeypatch.chdir(tmp_path)
  ckpt_dirs = []

  class LocalCheckpoints(trainer.Checkpointer):  # tensorstore's GCS driver needs a bucket
    def __init__(self, directory, **kwargs):
      ckpt_dirs.append(str(directory))
      super().__init__(tmp_path / "ckpt" / str(directory).replace("gs://", ""), **kwargs)

  monkeypatch.setattr(trainer, "Checkpointer", LocalCheckpoints)
  workdir = "gs://bucket/runs/tiny"
  args = _pod_train_args(f"--config={TINY}", f"--workdir={workdir}", *FAST)
  assert args[0] == "--distributed" and f"--workdir={workdir}" in args
  assert train_main.main(args[1:]) == 0  # one process here: no --distributed
  stored = set(fake_gcs.store)
  assert {f"/bucket/runs/tiny/{f}" for f in RUN_FILES} <= stored, stored
  assert ckpt_dirs == [f"{workdir}/checkpoints"]
  assert json.loads(paths.as_path(f"{workdir}/final_metrics.json").read_text())["step"] == 3
  # the sweep's bookkeeping and a study's outputs in the bucket too
  sweep_dir = "gs://bucket/sweep"
  for name in ("lr=0.01", "lr=0.02"):
    paths.as_path(f"{sweep_dir}/runs/{name}").mkdir(parents=True, exist_ok=True)
    for f in ("config.json", "final_metrics.json"):
      paths.as_path(f"{sweep_dir}/runs/{name}/{f}").write_text(
          paths.as_path(f"{workdir}/{f}").read_text())
  csv_path = sweep.collect(sweep_dir, [{"train.lr": 0.01}, {"train.lr": 0.02}])
  assert csv_path == f"{sweep_dir}/results.csv"
  assert len(paths.as_path(csv_path).read_text().splitlines()) == 3
  cfg, _ = C.load(["--config=" + TINY])
  records = study.run_variants(cfg, [study.Variant("tiny", {}, "tiny")], "gs://bucket/runs",
                               only=set())
  assert len(records) == 1 and records[0].rows
  study.write_part("gs://bucket/results", "a", "A", "body", records, "cmd", "tiny")
  readme = study.assemble_readme("gs://bucket/results", "T", "intro", ("a",))
  assert "## A" in paths.as_path(readme).read_text()
  assert "/bucket/results/configs/tiny.json" in fake_gcs.store
  assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # nothing else written locally

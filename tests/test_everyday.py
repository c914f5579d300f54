"""The run contract a new user hits (issue 20): CLI refusals, final metrics, resume checks,
benchmarks that leave committed results alone."""

import importlib.util
import json
import os

import pytest

from effjax import config as C
from effjax.train import trainer
from tests.conftest import REPO, TINY, run_module

FAST = ["--config.train.steps=4", "--config.train.eval_every=4", "--config.train.log_every=2",
        "--config.train.checkpoint_every=4", "--config.train.warmup_steps=1"]


@pytest.fixture(scope="module")
def tiny_data():
  cfg, _ = C.load(["--config=" + TINY])
  return trainer.load_data(cfg)


def _cfg(*overrides):
  cfg, _ = C.load(["--config=" + TINY, *FAST, *overrides])
  return cfg


def _train_cli(workdir, *args):
  return run_module(["-m", "effjax.train", "--config=" + TINY, f"--workdir={workdir}", *FAST,
                     *args])


def test_positional_config_is_refused(tmp_path):
  proc = run_module(["-m", "effjax.train", TINY, f"--workdir={tmp_path / 'w'}", *FAST])
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert f"--config={TINY}" in proc.stderr and "Traceback" not in proc.stderr
  assert not os.path.exists(tmp_path / "w")


def test_workdir_that_is_a_file_is_refused(tmp_path):
  path = tmp_path / "afile"
  path.write_text("x")
  proc = _train_cli(path)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert str(path) in proc.stderr and "is a file" in proc.stderr
  assert "Traceback" not in proc.stderr


@pytest.mark.skipif(importlib.util.find_spec("tensorboardX") is not None,
                    reason="tensorboardX is installed")
def test_tensorboard_without_tensorboardx_is_refused_before_writing(tmp_path):
  proc = _train_cli(tmp_path / "w", "--config.train.tensorboard=true")
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "pip install -e '.[tensorboard]'" in proc.stderr and "Traceback" not in proc.stderr
  assert not os.path.exists(tmp_path / "w")


def test_final_metrics_have_train_values(tmp_path):
  proc = _train_cli(tmp_path / "w")
  assert proc.returncode == 0, proc.stderr[-2000:]
  final = json.load(open(tmp_path / "w" / "final_metrics.json"))
  assert isinstance(final["train/loss"], float) and "train/grad_norm" in final
  assert "eval/loss" in final
  done = [l for l in proc.stderr.splitlines() if l.startswith("[effjax p0] done:")]
  assert done and "train/loss" in done[0] and "eval/loss" in done[0], proc.stderr[-1000:]


def test_config_json_written_only_when_training_starts(tmp_path, tiny_data):
  workdir = str(tmp_path)
  assert trainer.train(_cfg(), workdir, data=tiny_data, quiet=True).exit_code == 0
  saved = lambda: json.load(open(os.path.join(workdir, "config.json")))
  info = lambda: json.load(open(os.path.join(workdir, "run_info.json")))
  assert saved()["train"]["lr"] == 0.01 and info()["resumes"] == []
  # finished run, other flags: nothing trains, so config.json keeps the lr the run used
  r = trainer.train(_cfg("--config.train.lr=0.5"), workdir, data=tiny_data, quiet=True)
  assert r.exit_code == 0 and r.step == 4
  assert saved()["train"]["lr"] == 0.01
  # extending the run with another lr: training starts, config.json and the history follow
  r = trainer.train(_cfg("--config.train.lr=0.02", "--config.train.steps=6"), workdir,
                    data=tiny_data, quiet=True)
  assert r.exit_code == 0 and r.step == 6
  assert saved()["train"]["lr"] == 0.02 and saved()["train"]["steps"] == 6
  assert info()["resumes"] == [{"step": 4, "changed": {"train.steps": [4, 6],
                                                       "train.lr": [0.01, 0.02]}}]


def test_incompatible_resume_exits_2_naming_the_keys(tmp_path, tiny_data):
  workdir = str(tmp_path / "w")
  assert trainer.train(_cfg(), workdir, data=tiny_data, quiet=True, stop_at=2).exit_code == 75
  before = open(os.path.join(workdir, "config.json")).read()
  proc = _train_cli(workdir, "--config.model.d_model=64", "--config.train.steps=6")
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "model.d_model (32 -> 64)" in proc.stderr and "Traceback" not in proc.stderr
  assert "train.steps" not in proc.stderr.split("model.d_model")[1]  # only the fixed keys
  with pytest.raises(trainer.WorkdirError, match="train.batch_size"):
    trainer.train(_cfg("--config.train.batch_size=16"), workdir, data=tiny_data, quiet=True)
  assert open(os.path.join(workdir, "config.json")).read() == before


def test_mfu_without_gpu_refuses_and_keeps_results():
  path = os.path.join(REPO, "results", "perf", "mfu.md")
  before = open(path).read()
  proc = run_module(["-m", "effjax.train.mfu", "--steps=2"], env_extra={"JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "GPU" in proc.stderr and "Traceback" not in proc.stderr
  assert open(path).read() == before


# train.bench (slow, ~60 s here) also runs in the default suite on a mixture
# (tests/test_data_sources_tools.py); this test is about printing vs --out.
@pytest.mark.parametrize("args", [
    pytest.param(["-m", "effjax.train.bench", "--config=" + TINY, "--steps=4"],
                 marks=pytest.mark.slow),
    ["-m", "effjax.models.moe_bench", "--tokens=512", "--d=16", "--d-ff=32", "--experts=2",
     "--top-k=1", "--dispatch=blocks", "--repeats=1"],
    ["-m", "pallas_kernels.attention.bench", "--seq-lens=64", "--batch=1", "--heads=2",
     "--head-dim=16", "--scores=softmax", "--impls=xla", "--repeats=1"],
], ids=["train.bench", "moe_bench", "attention.bench"])
def test_benchmarks_print_and_write_only_with_out(tmp_path, args):
  proc = run_module(args, cwd=str(tmp_path))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "|---" in proc.stdout
  assert os.listdir(tmp_path) == []  # no results/perf/... in the working directory
  proc = run_module(args + [f"--out={tmp_path / 'table.md'}"], cwd=str(tmp_path))
  assert proc.returncode == 0 and "|---" in open(tmp_path / "table.md").read()


def test_compile_check_without_libtpu_exits_2():
  """A TPU topology needs libtpu: without it compile_check says so and exits 2 (a usage /
  environment error, like a config error), not 1 with a traceback."""
  import importlib.util
  if importlib.util.find_spec("libtpu") is not None:
    pytest.skip("libtpu is installed here")
  r = run_module(["-m", "effjax.compile_check", "--config=configs/tiny.py", "--topology=v5p-8"],
                 timeout=300)
  assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
  assert "needs libtpu" in r.stderr and "Traceback" not in r.stderr


def test_startup_progress_is_reported_before_the_first_step(tmp_path, capsys):
  """The first seconds (corpus, build, init, compile) say what they do, in order."""
  assert trainer.train(_cfg("--config.train.steps=1", "--config.train.eval_every=1"),
                       str(tmp_path)).exit_code == 0
  err = capsys.readouterr().err
  lines = ["loading corpus 'builtin'", "building the model", "initialising parameters",
           "compiling the train step", "model: "]
  positions = [err.find(line) for line in lines]
  assert -1 not in positions and positions == sorted(positions), err[:1500]


def test_wandb_logging_offline(tmp_path, monkeypatch, tiny_data):
  """train.wandb_project logs every metrics row to a W&B run (offline: no account needed)."""
  pytest.importorskip("wandb")
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_SILENT", "true")
  logged = []
  import wandb
  real_init = wandb.init

  def init(**kwargs):
    run = real_init(**kwargs)
    log = run.log
    run.log = lambda data, step=None: (logged.append((step, dict(data))), log(data, step=step))
    return run

  monkeypatch.setattr(wandb, "init", init)
  r = trainer.train(_cfg("--config.train.wandb_project=effjax-test"), str(tmp_path),
                    data=tiny_data, quiet=True)
  assert r.exit_code == 0
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [s for s, _ in logged] == [row["step"] for row in rows]
  assert logged[-1][1]["eval/loss"] == rows[-1]["eval/loss"]
  assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_wandb_without_the_package_is_refused_at_config_time(tmp_path):
  from effjax import checks
  with pytest.raises(C.ConfigError, match=r"pip install -e '.\[wandb\]'"):
    checks.validate(_cfg("--config.train.wandb_project=p"), 1)

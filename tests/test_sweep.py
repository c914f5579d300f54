"""Sweep tool: cartesian product, skipping finished runs, resuming interrupted ones (issue 7)."""

import csv
import os

import pytest

from effjax import config as C
from effjax import sweep
from effjax.train import trainer
from tests.conftest import TINY, run_module

GRID = ["--grid", "train.lr=3e-3,1e-2"]
COMMON = ["--config=" + TINY, "--config.train.steps=6", "--config.train.eval_every=6",
          "--config.train.checkpoint_every=3"]


def test_emit_prints_one_command_per_run(tmp_path):
  proc = run_module(["-m", "effjax.sweep", *GRID, "--grid", "model.d_model=32,64",
                     f"--out={tmp_path}", "--emit", *COMMON])
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.strip().splitlines()
  assert len(lines) == 4 and all("effjax.train" in l for l in lines)
  assert any("--config.train.lr=1e-2" in l and "--config.model.d_model=64" in l for l in lines)
  bad = run_module(["-m", "effjax.sweep", "--grid", "train.lrr=1", f"--out={tmp_path}", "--emit"])
  assert bad.returncode == 2 and "train.lr" in bad.stderr


def test_sweep_skips_finished_and_resumes_interrupted(tmp_path):
  out = str(tmp_path)
  # an interrupted run of the first grid point, as if a previous sweep was killed
  name = sweep.run_name({"train.lr": "3e-3"})
  cfg, _ = C.load(COMMON + ["--config.train.lr=3e-3"])
  assert trainer.train(cfg, os.path.join(out, "runs", name), quiet=True, stop_at=3).exit_code == 75
  first = run_module(["-m", "effjax.sweep", *GRID, f"--out={out}", *COMMON])
  assert first.returncode == 0, first.stderr[-2000:]
  assert "0 already finished, 2 to run" in first.stderr
  log = open(os.path.join(out, "runs", name + ".log")).read()
  assert "resumed from checkpoint at step 3" in log
  rows = list(csv.DictReader(open(os.path.join(out, "results.csv"))))
  assert sorted(r["train.lr"] for r in rows) == ["1e-2", "3e-3"]
  assert all(float(r["eval/loss"]) > 0 and int(r["step"]) == 6 for r in rows)
  again = run_module(["-m", "effjax.sweep", *GRID, f"--out={out}", *COMMON])
  assert again.returncode == 0 and "2 already finished, 0 to run" in again.stderr


# slow (~40 s on 2 cores: three sweep subprocesses): the default suite keeps the skip /
# resume test above, which exercises the same finished-run check.
@pytest.mark.slow
def test_sweep_reruns_a_finished_run_whose_config_differs(tmp_path):
  out, grid = str(tmp_path), ["--grid", "train.lr=3e-3"]
  common = ["--config=" + TINY, "--config.train.steps=4", "--config.train.eval_every=4",
            "--config.train.warmup_steps=1", "--config.train.log_every=2"]
  first = run_module(["-m", "effjax.sweep", *grid, f"--out={out}", *common])
  assert first.returncode == 0, first.stderr[-2000:]
  rows = list(csv.DictReader(open(os.path.join(out, "results.csv"))))
  assert float(rows[0]["train/loss"]) > 0 and rows[0]["config_hash"]
  # output-only keys do not make a finished run stale
  same = run_module(["-m", "effjax.sweep", *grid, f"--out={out}", *common,
                    "--config.train.log_every=1"])
  assert same.returncode == 0 and "1 already finished, 0 to run" in same.stderr
  other = run_module(["-m", "effjax.sweep", *grid, f"--out={out}", *common,
                      "--config.train.steps=6", "--config.model.d_model=64"])
  assert other.returncode == 0, other.stderr[-2000:]
  assert "0 already finished, 1 to run" in other.stderr
  assert "train.steps: 4 -> 6" in other.stderr and "model.d_model: 32 -> 64" in other.stderr
  rows2 = list(csv.DictReader(open(os.path.join(out, "results.csv"))))
  assert int(rows2[0]["step"]) == 6 and rows2[0]["config_hash"] != rows[0]["config_hash"]
  assert any(".stale-" in d for d in os.listdir(os.path.join(out, "runs")))

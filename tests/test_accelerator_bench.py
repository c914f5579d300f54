"""The prepared accelerator benchmark (effjax/bench/accelerator.py): stage selection, the
CPU dry run of its environment stage, and the benchmark rule (tables written only where
--out says; without it a temporary folder)."""

import os

import pytest

from effjax.bench import accelerator
from tests.conftest import run_module


def test_env_stage_writes_its_table_only_under_out(tmp_path):
  proc = run_module(["-m", "effjax.bench.accelerator", "--tiny", "--stages=env"],
                    cwd=str(tmp_path))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "| jax |" in proc.stdout and "pass --out to keep them" in proc.stderr
  assert os.listdir(tmp_path) == []
  out = tmp_path / "perf"
  proc = run_module(["-m", "effjax.bench.accelerator", "--tiny", "--stages=env,tests,mfu",
                     f"--out={out}"], cwd=str(tmp_path))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert sorted(os.listdir(out)) == ["env.md", "run.log"]
  text = (out / "env.md").read_text()
  assert "| backend |" in text and "| flax |" in text
  if "| backend | cpu |" in text:  # the GPU stages say why they did not run
    assert "tests: pytest -m gpu needs a GPU backend" in proc.stdout
    assert "mfu: training-step MFU needs a GPU backend" in proc.stdout


def test_unknown_stage_is_a_usage_error():
  with pytest.raises(SystemExit):
    accelerator.main(["--stages=env,warp"])

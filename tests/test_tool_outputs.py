"""The tools' --workdir / --out go through effjax/paths.py: a file:// URL names a local
folder (before, os.path made a relative folder 'file:' in the working directory)."""

import csv
import json
import os

import numpy as np
import pytest

from effjax import config as C
from effjax import fit
from tests.conftest import TINY


def test_fit_reads_and_writes_file_urls(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # a stray relative folder 'file:' would appear here
  x = np.geomspace(1, 1000, 8)
  with open(tmp_path / "results.csv", "w", newline="") as f:
    csv.writer(f).writerows([("x", "y"), *zip(x, 3.0 * x ** -0.5)])
  assert fit.main([f"--csv=file://{tmp_path}/results.csv", "--law=power", "--x=x", "--y=y",
                   "--bootstrap=5", f"--out=file://{tmp_path}/out/fit"]) == 0
  result = json.loads((tmp_path / "out" / "fit" / "fit.json").read_text())
  assert abs(result["params"]["k"] + 0.5) < 1e-3
  assert (tmp_path / "out" / "fit" / "fit.png").stat().st_size > 0
  assert sorted(os.listdir(tmp_path)) == ["out", "results.csv"]


def test_export_writes_and_loads_a_file_url(tmp_path, monkeypatch):
  import jax  # pylint: disable=g-import-not-at-top
  from effjax import models  # pylint: disable=g-import-not-at-top
  from effjax.quant import export  # pylint: disable=g-import-not-at-top
  monkeypatch.chdir(tmp_path)
  cfg, _ = C.load(["--config=" + TINY, "--config.quant.method=statsq",
                   "--config.quant.weight_bits=2"])
  m = models.build(cfg, 257)
  url = f"file://{tmp_path}/out/q.npz"
  (tmp_path / "out").mkdir()
  meta = export.export(cfg, m.initial_params, url, m.index)
  loaded, meta_back = export.load(url)
  assert meta_back == meta and meta["kernels"]
  flat = dict(jax.tree_util.tree_leaves_with_path(loaded))
  assert all(np.asarray(v).dtype == np.float32 for v in flat.values())
  assert sorted(os.listdir(tmp_path)) == ["out"] and os.listdir(tmp_path / "out") == ["q.npz"]


@pytest.mark.slow
def test_export_reads_a_file_url_workdir_and_writes_a_file_url(tmp_path, monkeypatch, capsys):
  """On a data.sources mixture too: the export's eval batches come from every source."""
  from effjax.quant import export  # pylint: disable=g-import-not-at-top
  from effjax.train import trainer  # pylint: disable=g-import-not-at-top
  (tmp_path / "a.txt").write_text(" ".join(["ab", "ba", "abba"] * 3000))
  (tmp_path / "b.txt").write_text(" ".join(["xy", "yx", "xyyx"] * 3000))
  monkeypatch.chdir(tmp_path)
  cfg, _ = C.load(["--config=" + TINY, "--config.quant.method=statsq",
                   "--config.quant.weight_bits=2", "--config.quant.act_bits=8",
                   "--config.train.steps=4", "--config.train.eval_every=4",
                   "--config.train.checkpoint_every=4", "--config.train.warmup_steps=1",
                   f"--config.data.sources=a={tmp_path}/a.txt,b={tmp_path}/b.txt"])
  url = f"file://{tmp_path}/run"
  assert trainer.train(cfg, url, quiet=True).exit_code == 0
  assert export.main([f"--workdir={url}", f"--out=file://{tmp_path}/q.npz",
                      "--eval_batches=1"]) == 0
  assert "2 batches" in capsys.readouterr().out  # one per source
  loaded, meta = export.load(f"file://{tmp_path}/q.npz")
  assert meta["kernels"] and loaded
  assert sorted(os.listdir(tmp_path)) == ["a.txt", "b.txt", "q.npz", "run"]


def test_launch_local_writes_process_logs_under_a_file_url(tmp_path):
  """Processes that exit at once (a missing config): the log of process 1 lands in the
  file:// workdir, and no relative 'file:' folder appears in the working directory."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from tests.conftest import REPO  # pylint: disable=g-import-not-at-top
  env = dict(os.environ, PYTHONPATH=REPO)
  proc = subprocess.run([sys.executable, os.path.join(REPO, "launch", "local.py"),
                         "--num_processes=2", "--port=12399", "--",
                         f"--workdir=file://{tmp_path}/run", "--config=missing.py"],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0 and "exit codes" in proc.stdout
  assert "missing.py" in (tmp_path / "run" / "process_1.log").read_text()
  assert sorted(os.listdir(tmp_path)) == ["run"]


def test_launch_local_reads_the_workdir_in_both_spellings():
  """launch/local.py finds --workdir=DIR and --workdir DIR the way effjax.train reads them."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  from tests.conftest import REPO  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("launch_local",
                                                os.path.join(REPO, "launch", "local.py"))
  local = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(local)
  assert local._workdir_arg(["--config=c.py", "--workdir=runs/a"]) == "runs/a"
  assert local._workdir_arg(["--workdir", "runs/b", "--config=c.py"]) == "runs/b"
  assert local._workdir_arg(["--config=c.py"]) is None
  assert local._workdir_arg(["--config=c.py", "--workdir"]) is None

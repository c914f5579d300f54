"""effjax.train.bench and effjax.coord_check read data through the trainer's entry point, so
they run on a data.sources mixture as on a single corpus."""

import numpy as np
import pytest

from effjax import checks, coord_check
from effjax.data import ByteTokenizer
from effjax.train import bench
from tests.conftest import TINY


def _sources(tmp_path) -> str:
  """Two text sources with disjoint letters ('ab' and 'xy'), nothing like the built-in corpus."""
  rng = np.random.default_rng(0)
  for name, letters in (("ab", ["a", "b", "aa", "bab"]), ("xy", ["x", "y", "xx", "yxy"])):
    (tmp_path / f"{name}.txt").write_text(" ".join(rng.choice(letters, 8000)))
  return f"--config.data.sources=ab={tmp_path / 'ab.txt'}:0.5,xy={tmp_path / 'xy.txt'}:0.5"


def test_bench_runs_on_a_mixture(tmp_path, capsys):
  assert bench.main(["--config=" + TINY, "--steps=2", _sources(tmp_path)]) == 0
  assert "trainer overhead vs bare loop" in capsys.readouterr().out


def test_coord_check_trains_on_the_mixture(tmp_path):
  base, _ = checks.load(["--config=" + TINY, _sources(tmp_path)])
  batches, vocab = coord_check.train_batches(base, 4)
  assert vocab == ByteTokenizer().vocab_size
  ids = set(np.concatenate([np.asarray(b["inputs"]).ravel() for b in batches]).tolist())
  assert ids - {ByteTokenizer().eos_id} <= set(b"abxy "), "tokens from outside the two sources"
  assert ids & set(b"ab") and ids & set(b"xy")


@pytest.mark.slow
def test_coord_check_runs_on_a_mixture(tmp_path):
  base, _ = checks.load(["--config=" + TINY, _sources(tmp_path)])
  result = coord_check.run(base, [32, 64], steps=2, lr=1e-2, verbose=False)
  for param in ("sp", "mup"):
    for m in coord_check.MODULES:
      assert np.isfinite(result[param][m]["values"]).all()

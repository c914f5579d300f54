"""data.sources: parsing, mixture proportions, determinism, exact resume, per-source eval."""

import os

import numpy as np
import pytest

from effjax import config as C
from effjax.data import (ByteTokenizer, Corpus, DataError, Mixture, make_mixture_iterator,
                         mixed_eval_row, mixture_eval_batches, parse_sources)
from effjax.data.mixture import Source
from effjax.train import trainer
from effjax.train.metrics import read_metrics
from tests.conftest import TINY

TOK = ByteTokenizer()


def _corpus(lo, hi, n=40000, seed=0):
  """Tokens in [lo, hi): a row's first token tells which source it came from."""
  t = np.random.default_rng(seed).integers(lo, hi, n).astype(np.uint16)
  return Corpus("c", t, t[:2000].copy(), f"fp{lo}", 1, 1, n, 2000)


def _mixture(w=0.7):
  return Mixture([Source("low", w, _corpus(0, 100)), Source("high", 1 - w, _corpus(100, 200, seed=1))])


def test_parse_sources_names_weights_and_errors():
  got = parse_sources("builtin:3, web=prepared/web:1,/data/code/*.txt")
  assert [(s.name, s.spec) for s in got] == [("builtin", "builtin"), ("web", "prepared/web"),
                                             ("code", "/data/code/*.txt")]
  np.testing.assert_allclose([s.weight for s in got], [0.6, 0.2, 0.2])
  with pytest.raises(DataError, match="weight must be > 0"):
    parse_sources("builtin:0")
  with pytest.raises(DataError, match="'builtin' twice"):
    parse_sources("builtin,builtin:2")
  with pytest.raises(C.ConfigError, match="data.sources replaces data.corpus"):
    C.load(["--config.data.sources=builtin", "--config.data.corpus=text",
            "--config.data.paths=x.txt"])


def test_mixture_proportions_within_sampling_error():
  it = make_mixture_iterator(_mixture(0.7), seq_len=16, batch_size=8, seed=0, num_threads=0)
  first = np.concatenate([next(it)["inputs"][:, 0] for _ in range(100)])
  n, share = first.size, np.mean(first < 100)
  assert abs(share - 0.7) < 3 * np.sqrt(0.7 * 0.3 / n), share


def test_mixture_deterministic_seeded_and_exact_resume():
  kw = dict(seq_len=16, batch_size=4, num_threads=0)
  a = [next(it)["inputs"] for it in [make_mixture_iterator(_mixture(), seed=1, **kw)]
       for _ in range(12)]
  it = make_mixture_iterator(_mixture(), seed=1, **kw)
  b = [next(it)["inputs"] for _ in range(12)]
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  other = make_mixture_iterator(_mixture(), seed=2, **kw)
  assert not np.array_equal(next(other)["inputs"], a[0])
  # resume mid-stream from the iterator state: the same batches follow
  it = make_mixture_iterator(_mixture(), seed=1, **kw)
  for _ in range(5):
    next(it)
  state = it.get_state()
  fresh = make_mixture_iterator(_mixture(), seed=1, **kw)
  fresh.set_state(state)
  for want in b[5:]:
    np.testing.assert_array_equal(next(fresh)["inputs"], want)


def test_process_slices_union_is_the_global_batch():
  kw = dict(seq_len=16, seed=3, num_threads=0)
  whole = make_mixture_iterator(_mixture(), batch_size=8, **kw)
  parts = [make_mixture_iterator(_mixture(), batch_size=4, process_index=p, process_count=2, **kw)
           for p in range(2)]
  for _ in range(3):
    np.testing.assert_array_equal(next(whole)["inputs"],
                                  np.concatenate([next(p)["inputs"] for p in parts]))


def test_mixed_eval_row_is_weighted():
  row = mixed_eval_row({"a": {"eval/loss": 1.0, "eval/bpb": 2.0}, "b": {"eval/loss": 3.0}},
                       {"a": 0.25, "b": 0.75})
  assert row == {"eval/a/loss": 1.0, "eval/a/bpb": 2.0, "eval/b/loss": 3.0, "eval/loss": 2.5}
  sets = mixture_eval_batches(_mixture(), seq_len=16, batch_size=4, num_batches=3)
  assert list(sets) == ["low", "high"] and all(len(b) == 3 for b in sets.values())
  assert all(np.all(b["inputs"] < 100) for b in sets["low"])
  with pytest.raises(DataError, match="data.sources 'low': validation split has 2000 tokens"):
    mixture_eval_batches(_mixture(), seq_len=512, batch_size=8, num_batches=1)


def test_trainer_mixture_per_source_eval_and_exact_resume(tmp_path):
  """A builtin + text-file mixture trains, logs eval/<source>/loss, and resumes bit-for-bit."""
  text = tmp_path / "rep"
  text.mkdir()
  for i in range(4):
    (text / f"f{i}.txt").write_text(("the same few lines, repeated again and again\n" * 80) + str(i))
  overrides = ["--config=" + TINY, f"--config.data.sources=builtin:0.5,rep={text}/*.txt:0.5",
               "--config.data.val_percent=30", "--config.train.steps=8",
               "--config.train.log_every=1", "--config.train.eval_every=4",
               "--config.train.eval_batches=2", "--config.train.checkpoint_every=100",
               "--config.train.sample_tokens=0", "--config.train.plot=false"]
  cfg, _ = C.load(overrides)
  data = trainer.load_data(cfg)
  straight, chunked = str(tmp_path / "a"), str(tmp_path / "b")
  assert trainer.train(cfg, straight, data=data, quiet=True).exit_code == 0
  assert trainer.train(cfg, chunked, data=data, quiet=True, stop_at=4).exit_code == \
      trainer.EXIT_INTERRUPTED
  assert trainer.train(cfg, chunked, data=data, quiet=True).exit_code == 0
  a, b = read_metrics(straight + "/metrics.jsonl"), read_metrics(chunked + "/metrics.jsonl")
  keys = ("train/loss", "eval/loss", "eval/builtin/loss", "eval/rep/loss", "eval/rep/bpb")
  pick = lambda rows: {(r["step"], k): r[k] for r in rows for k in keys if k in r}
  assert pick(a) == pick(b) and len(pick(a)) == 8 + 2 * 4
  last = [r for r in a if "eval/loss" in r][-1]
  assert last["eval/loss"] == pytest.approx(0.5 * last["eval/builtin/loss"]
                                            + 0.5 * last["eval/rep/loss"])
  assert os.path.exists(os.path.join(straight, "run_info.json"))

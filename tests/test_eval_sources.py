"""effjax.eval on a data.sources run evaluates each source, as the trainer's eval does."""

import json

import pytest

from effjax import config as C
from effjax import eval as eval_cli
from effjax.train import trainer
from tests.conftest import TINY


def test_eval_of_a_mixture_run_equals_the_trainers_per_source_eval(tmp_path):
  (tmp_path / "a.txt").write_text("def f(x):\n  return x + 1\n" * 300)
  (tmp_path / "b.txt").write_text("Zebras quietly jog over vexing fjords. " * 200)
  sources = f"code={tmp_path / 'a.txt'}:0.75,prose={tmp_path / 'b.txt'}:0.25"
  cfg, _ = C.load(["--config=" + TINY, "--config.train.steps=2", "--config.train.eval_every=2",
                   "--config.train.checkpoint_every=2", "--config.train.warmup_steps=1",
                   "--config.train.eval_batches=1", f"--config.data.sources={sources}"])
  workdir = tmp_path / "run"
  final = trainer.train(cfg, str(workdir), quiet=True).final_metrics
  assert eval_cli.main([f"--workdir={workdir}"]) == 0
  (entry,) = json.loads((workdir / "eval_2.json").read_text())["evals"].values()
  got = entry["sources"]
  assert entry["corpus"] == "mixture" and set(got) == {"code", "prose", "total", "mixture"}
  for name in ("code", "prose"):
    assert got[name]["loss"] == pytest.approx(final[f"eval/{name}/loss"], rel=1e-6)
  assert got["mixture"]["loss"] == pytest.approx(final["eval/loss"], rel=1e-6)
  assert got["mixture"]["bpb"] == pytest.approx(final["eval/bpb"], rel=1e-6)

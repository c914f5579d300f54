"""`python -m effjax.eval` (issue 20): a checkpoint's loss and bpb on any corpus, per source."""

import json
import math

import pytest

from effjax import config as C
from effjax import eval as eval_cli
from effjax.train import trainer
from tests.conftest import TINY


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run")
  cfg, _ = C.load(["--config=" + TINY, "--config.train.steps=3", "--config.train.eval_every=3",
                   "--config.train.checkpoint_every=3", "--config.train.warmup_steps=1"])
  result = trainer.train(cfg, str(workdir), quiet=True)
  assert result.exit_code == 0
  return workdir, result.final_metrics


def test_eval_of_the_final_checkpoint_equals_the_trainers_eval(trained):
  workdir, final = trained
  assert eval_cli.main([f"--workdir={workdir}"]) == 0
  saved = json.load(open(workdir / "eval_3.json"))
  (entry,) = saved["evals"].values()
  got = entry["sources"]["builtin"]
  assert entry["split"] == "val" and got["batches"] == 2  # the run's train.eval_batches
  assert got["loss"] == pytest.approx(final["eval/loss"], rel=1e-6)
  assert got["bpb"] == pytest.approx(final["eval/bpb"], rel=1e-6)


def test_eval_on_other_text_reports_each_source_and_the_total(trained, tmp_path):
  workdir, _ = trained
  (tmp_path / "a.txt").write_text("def f(x):\n  return x + 1\n" * 60)
  (tmp_path / "b.txt").write_text("Zebras quietly jog over vexing fjords. " * 40)
  paths = f"{tmp_path / 'a.txt'},{tmp_path / 'b.txt'}"
  assert eval_cli.main([f"--workdir={workdir}", "--batches=0", "--batch_size=2",
                        "--config.data.corpus=text", f"--config.data.paths={paths}"]) == 0
  saved = json.load(open(workdir / "eval_3.json"))
  assert len(saved["evals"]) == 2  # the builtin entry of the test above is kept
  entry = next(e for e in saved["evals"].values() if e["corpus"] == "text")
  a, b, total = (entry["sources"][k] for k in (str(tmp_path / "a.txt"), str(tmp_path / "b.txt"),
                                               "total"))
  assert entry["split"] == "all" and a["batches"] > 2 and a["loss"] != b["loss"]
  assert total["loss"] == pytest.approx(
      (a["loss"] * a["tokens"] + b["loss"] * b["tokens"]) / (a["tokens"] + b["tokens"]))
  assert total["bpb"] == pytest.approx(total["loss"] / math.log(2))  # byte tokenizer: 1 byte each


def test_eval_refuses_a_missing_run_or_step(trained, tmp_path, capsys):
  workdir, _ = trained
  assert eval_cli.main([f"--workdir={tmp_path / 'nothing'}"]) == 2
  assert eval_cli.main([f"--workdir={workdir}", "--step=99"]) == 2
  assert "available: 3" in capsys.readouterr().err

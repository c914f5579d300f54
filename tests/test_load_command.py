"""effjax.load.open_for_command: the preamble effjax.eval and effjax.generate share."""

import argparse

from effjax import load


def _parser():
  p = argparse.ArgumentParser()
  p.add_argument("--workdir", required=True)
  p.add_argument("--step", type=int, default=None)
  p.add_argument("--n", type=int, default=1)
  return p


def test_a_missing_run_or_bad_flags_exit_2_with_the_reason(tmp_path, capsys):
  assert load.open_for_command([f"--workdir={tmp_path / 'nope'}"], _parser()) == 2
  assert "does not exist" in capsys.readouterr().err
  assert load.open_for_command([f"--workdir={tmp_path}"], _parser()) == 2
  assert "config.json" in capsys.readouterr().err
  assert load.open_for_command([f"--workdir={tmp_path}", "--config.train.seq_len"], _parser()) == 2
  assert "Missing value" in capsys.readouterr().err


def test_the_check_runs_before_loading(tmp_path, capsys):
  check = lambda args: "--n must be >= 1" if args.n < 1 else None
  assert load.open_for_command([f"--workdir={tmp_path / 'nope'}", "--n=0"], _parser(),
                               check=check) == 2
  err = capsys.readouterr().err
  assert "--n must be >= 1" in err and "loading" not in err


def test_eval_and_generate_share_the_preamble(tmp_path, capsys):
  from effjax import eval as eval_cli, generate  # pylint: disable=g-import-not-at-top
  for main in (eval_cli.main, generate.main):
    assert main([f"--workdir={tmp_path / 'nope'}", "--config.model.d_model"]) == 2
    assert "Missing value" in capsys.readouterr().err

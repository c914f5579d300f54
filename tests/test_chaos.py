"""Chaos test (issue 17): a training CLI run SIGKILLed during checkpoint writes and at random
moments, restarted each time, ends bit-identical to an uninterrupted run (effjax/chaos.py)."""

import pytest

from effjax import chaos


def _check(report, kills):
  assert report["problems"] == [], report
  assert report["kills"] == kills and report["starts"] == kills + 1, report


def test_kill_during_a_checkpoint_write_loses_nothing(tmp_path):
  """Three CLI starts (reference, killed mid-save, resumed): about 50 s idle (estimated)."""
  report = chaos.chaos(str(tmp_path), kills=1, steps=6, seed=0, say=lambda *a: None)
  _check(report, 1)
  assert report["kills_during_save"] == 1


@pytest.mark.slow
def test_repeated_kills_lose_nothing(tmp_path):
  """Six kills (three mid-save, three at random moments): ~2 min on an idle machine."""
  report = chaos.chaos(str(tmp_path), kills=6, steps=12, seed=1, say=lambda *a: None)
  _check(report, 6)
  assert report["kills_during_save"] == 3

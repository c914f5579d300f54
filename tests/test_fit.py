"""Scaling-law fits recover known parameters from synthetic data (issue 7, Fits)."""

import csv
import json
import os

import numpy as np
import pytest

from effjax import fit
from tests.conftest import run_module

TRUE = {"E": 1.7, "A": 400.0, "alpha": 0.34, "B": 410.0, "beta": 0.28}


def _chinchilla_data(seed=0, noise=0.005):
  rng = np.random.default_rng(seed)
  n, d = np.meshgrid(np.geomspace(1e6, 1e9, 6), np.geomspace(1e8, 1e11, 5))
  n, d = n.ravel(), d.ravel()
  loss = fit.chinchilla_predict(TRUE, n, d) * np.exp(noise * rng.standard_normal(n.size))
  return n, d, loss


def test_chinchilla_recovers_parameters_within_ci():
  """Percentile-bootstrap intervals are approximate: over noise seeds 0-5, 5 of 6 covered
  E, alpha and beta jointly (about 86% is expected for three 95% intervals). Seed 1 is
  fixed here; the width bound below fails for the too-narrow intervals an optimiser stopping
  at its start point gives (seen before the objective was rescaled)."""
  n, d, loss = _chinchilla_data(seed=1)
  p = fit.fit_chinchilla(n, d, loss)
  ci = fit.bootstrap(lambda n, d, loss: fit.fit_chinchilla(n, d, loss, inits=[p["_theta"]]),
                     {"n": n, "d": d, "loss": loss}, 40, seed=1)
  for k in ("E", "alpha", "beta"):
    lo, hi = ci[k]
    assert lo <= TRUE[k] <= hi, (k, TRUE[k], ci[k])
    assert 0.005 * TRUE[k] < hi - lo < 0.5 * TRUE[k]  # informative, not degenerate
  assert abs(p["E"] - TRUE["E"]) < 0.1 and abs(p["alpha"] - 0.34) < 0.05


def test_power_law_slope():
  rng = np.random.default_rng(2)
  x = np.geomspace(1, 1000, 12)
  y = 3.0 * x ** -0.527 * np.exp(0.02 * rng.standard_normal(x.size))
  p = fit.fit_power(x, y)
  ci = fit.bootstrap(fit.fit_power, {"x": x, "y": y}, 100, seed=0)
  assert ci["k"][0] <= -0.527 <= ci["k"][1] and abs(p["k"] + 0.527) < 0.03


def test_qat_law_signs_and_exponents():
  rng = np.random.default_rng(3)
  n, d, g = (a.ravel() for a in np.meshgrid(np.geomspace(1e6, 1e8, 4), np.geomspace(1e8, 1e10, 3),
                                            [32.0, 128.0, 512.0]))
  gap = 0.5 * d ** 0.1 * np.log2(g) ** 0.6 / n ** 0.3 * np.exp(0.01 * rng.standard_normal(n.size))
  p = fit.fit_qat(n, d, g, gap)
  assert p["gamma_N"] == pytest.approx(0.3, abs=0.02)
  assert p["gamma_D"] == pytest.approx(0.1, abs=0.02)
  assert p["gamma_G"] == pytest.approx(0.6, abs=0.05)


def _write(path, header, rows):
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(header)
    w.writerows(rows)


def test_cli_end_to_end_and_errors(tmp_path):
  n, d, loss = _chinchilla_data()
  path = str(tmp_path / "results.csv")
  _write(path, ["params_non_embedding", "tokens", "eval/loss"], zip(n, d, loss))
  proc = run_module(["-m", "effjax.fit", f"--csv={path}", "--law=chinchilla", "--bootstrap=10",
                     f"--out={tmp_path / 'fit'}"])
  assert proc.returncode == 0, proc.stderr
  result = json.load(open(tmp_path / "fit" / "fit.json"))
  assert abs(result["params"]["alpha"] - 0.34) < 0.05 and os.path.exists(tmp_path / "fit" / "fit.png")
  missing = run_module(["-m", "effjax.fit", f"--csv={path}", "--law=chinchilla",
                        "--loss-col=val_loss"])
  assert missing.returncode == 2 and "val_loss" in missing.stderr and "eval/loss" in missing.stderr
  few = str(tmp_path / "few.csv")
  _write(few, ["params_non_embedding", "tokens", "eval/loss"], list(zip(n, d, loss))[:3])
  proc = run_module(["-m", "effjax.fit", f"--csv={few}", "--law=chinchilla"])
  assert proc.returncode == 2 and "at least 6" in proc.stderr
  proc = run_module(["-m", "effjax.fit", f"--csv={tmp_path / 'nope.csv'}", "--law=power",
                     "--x=a", "--y=b"])
  assert proc.returncode == 2 and "nope.csv" in proc.stderr


def test_one_data_size_gives_no_intervals_for_the_d_term(tmp_path):
  n, d, loss = _chinchilla_data()
  one = d == d[0]  # a single D: B, beta and E are not identifiable
  assert fit.unidentifiable("chinchilla", {"n": n[one], "d": d[one]}).keys() == {"B", "beta", "E"}
  assert fit.unidentifiable("chinchilla", {"n": n, "d": d}) == {}
  path = str(tmp_path / "results.csv")
  _write(path, ["params_non_embedding", "tokens", "eval/loss"], zip(n[one], d[one], loss[one]))
  proc = run_module(["-m", "effjax.fit", f"--csv={path}", "--law=chinchilla", "--bootstrap=10",
                     f"--out={tmp_path / 'fit'}"])
  assert proc.returncode == 0, proc.stderr
  assert "beta is not identifiable" in proc.stderr and "1 distinct D" in proc.stderr
  assert "not identifiable" in proc.stdout
  ci = json.load(open(tmp_path / "fit" / "fit.json"))["ci95"]
  assert ci["beta"] is None and ci["B"] is None and ci["E"] is None
  assert ci["alpha"] is not None and len(ci["alpha"]) == 2


def test_qat_rank_deficient_design_is_not_identifiable():
  n = np.geomspace(1e6, 1e8, 6)
  cols = {"n": n, "d": np.full(6, 1e9), "g": np.full(6, 32.0)}
  assert {"k", "gamma_D", "gamma_G"} <= set(fit.unidentifiable("qat", cols))

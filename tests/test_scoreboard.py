"""The scoreboard's defining arithmetic: a technique that reaches the dense loss of k times
its compute scores a multiplier of k; plus the pieces the driver relies on."""

import math

import numpy as np
import pytest

from effjax import checks
from effjax import config as config_lib
from effjax.experiments import scoreboard as sb
from effjax.experiments import scoreboard_fit as sf

TRUE = {"E": 1.2, "A": 40.0, "alpha": 0.34, "B": 400.0, "beta": 0.3}
FPT_C, FPT_K = 7.0, 1.02  # training FLOPs per token = FPT_C * N^FPT_K


def _dense_grid():
  n = np.repeat([2e4, 8e4, 3e5, 1e6], 3)
  d = np.tile([3e5, 1e6, 3e6], 4)
  loss = TRUE["E"] + TRUE["A"] / n ** TRUE["alpha"] + TRUE["B"] / d ** TRUE["beta"]
  return n, d, loss, FPT_C * n ** FPT_K * d


def _true_law():
  n, d, _, flops = _dense_grid()
  return sf.DenseLaw(TRUE, FPT_C, FPT_K, (n.min(), n.max()), (flops.min(), flops.max()))


@pytest.fixture(scope="module")
def law():
  return sf.fit_dense(*_dense_grid())


def test_fit_recovers_law_and_flop_model(law):
  for k in ("E", "alpha", "beta"):
    assert law.params[k] == pytest.approx(TRUE[k], rel=2e-2), k
  assert law.fpt_k == pytest.approx(FPT_K, rel=1e-6)
  assert law.fpt_c == pytest.approx(FPT_C, rel=1e-6)


@pytest.mark.parametrize("factor", [0.5, 2.0, 3.0])
def test_multiplier_of_known_factor(law, factor):
  """A run that spends C and reaches the frontier loss at factor * C scores `factor`."""
  truth = _true_law()
  c_t = 2e12
  loss_t = float(truth.frontier([factor * c_t])[0])
  m = sf.multiplier(law, [loss_t], c_t, [law])
  assert m.value == pytest.approx(factor, rel=3e-2)
  assert m.lo == pytest.approx(m.value) and m.hi == pytest.approx(m.value)


def test_dense_runs_score_at_most_one_and_the_optimum_scores_one():
  """Every dense run is at or above the frontier (multiplier <= 1); the compute-optimal
  model at a budget scores exactly 1 (up to the N grid's resolution)."""
  truth = _true_law()
  _, _, loss, flops = _dense_grid()
  assert max(truth.dense_compute(l)[0] / c for l, c in zip(loss, flops)) <= 1.0 + 1e-6
  c = 3e12
  loss_opt = float(truth.frontier([c])[0])
  c_back, n_opt = truth.dense_compute(loss_opt)
  assert c_back / c == pytest.approx(1.0, rel=1e-2)
  d_opt = c / truth.flops_per_token(n_opt)
  assert float(truth.loss(n_opt, d_opt)) == pytest.approx(loss_opt, rel=1e-3)


@pytest.mark.parametrize("factor", [0.5, 1.0, 2.0])
def test_size_matched_multiplier_is_the_token_factor_of_the_reference(law, factor):
  """A run of the reference model's cost that reaches the loss the reference model reaches
  with factor x the tokens scores `factor` size-matched, whatever the frontier says; the
  reference itself scores 1."""
  truth = _true_law()
  n_ref, d_ref = 4e5, 6e5
  fpt_ref = float(truth.flops_per_token(n_ref))
  c_t = fpt_ref * d_ref
  loss_t = float(truth.loss(n_ref, factor * d_ref))
  m = sf.multiplier(law, [loss_t], c_t, [law], ref=(n_ref, fpt_ref))
  assert m.value == pytest.approx(factor, rel=3e-2)
  frontier = sf.multiplier(law, [loss_t], c_t, [law])
  assert frontier.value != pytest.approx(m.value, rel=0.1)  # a different question


def test_verdict_from_interval():
  assert sf.Multiplier(1.3, 0.9, 1.8, 1.0, False).verdict() == (
      "no measurable effect at this scale")
  assert sf.Multiplier(1.3, 1.1, 1.8, 1.0, False).verdict() == "helps"
  assert sf.Multiplier(0.6, 0.4, 0.8, 1.0, False).verdict() == "costs compute"


def test_effective_params_inverts_the_law():
  truth = _true_law()
  target = TRUE["E"] + TRUE["B"] / 1e6 ** TRUE["beta"] + 0.5
  n_eff = truth.effective_params(target, 1e6)
  assert float(truth.loss(n_eff, 1e6)) == pytest.approx(target, rel=1e-9)
  assert truth.effective_params(TRUE["E"], 1e6) == math.inf


def test_bootstrap_interval_covers_and_has_width():
  n, d, loss, flops = _dense_grid()
  rng = np.random.default_rng(1)
  noisy = loss * (1 + 0.01 * rng.standard_normal(loss.shape))
  law = sf.fit_dense(n, d, noisy, flops)
  boots = sf.bootstrap_laws(n, d, noisy, flops, law, 12)
  loss_t = float(_true_law().frontier([4e12])[0])
  m = sf.multiplier(law, [loss_t, loss_t + 0.01], 2e12, boots)
  assert m.lo < m.value < m.hi


def test_envelope_keeps_only_improving_points():
  pts = [sb.Point(f"p{i}", "dense", 0, loss, flops, 1, 1, 1, 1)
         for i, (loss, flops) in enumerate([(3.0, 1), (2.5, 2), (2.7, 3), (2.0, 4)])]
  pts.append(sb.Point("p9_seed1", "dense", 1, 1.0, 5, 1, 1, 1, 1))
  assert [p.name for p in sb.envelope(pts)] == ["p0", "p1", "p3"]


def test_every_planned_run_is_a_valid_config():
  """Each dense and technique run (and the full stack) validates, at two scales."""
  for scale in (1.0, 0.5):
    plan = sb.Plan(scale)
    variants = plan.dense() + [plan.technique(t, s) for s in sb.TECH_STEPS
                               for t in sb.TECHNIQUES]
    names = [v.name for v in variants]
    assert len(set(names)) == len(names)
    for v in variants:
      checks.validate(config_lib.apply_overrides(config_lib.Config(), v.overrides), 1)


def test_emit_prints_one_train_command_per_run(capsys, tmp_path):
  plan = sb.Plan(1.0)
  assert sb.emit(plan, str(tmp_path)) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  expected = len(plan.dense()) + len(sb.TECHNIQUES) * (len(sb.TECH_STEPS) + 1)
  assert len(lines) == expected
  assert all(line.startswith("python -m effjax.train --workdir=") for line in lines)
  assert any("--config.quant.weight_bits=4" in line for line in lines)


def test_optimizer_flops_count_muon_newton_schulz():
  """Muon adds quintic Newton-Schulz FLOPs on the hidden matrices only (not the embedding,
  readout or norms); AdamW adds none; the spectral projection adds power iteration."""
  from effjax import models  # pylint: disable=g-import-not-at-top
  from effjax.train import flops as flops_lib  # pylint: disable=g-import-not-at-top
  base = {"model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "mlp_dim": 128}}
  adamw = config_lib.apply_overrides(config_lib.Config(), base)
  muon = config_lib.apply_overrides(adamw, {"optim": {"name": "muon", "muon_ns_steps": 5}})
  model = models.build(muon, 256, seed=0)
  count = lambda c: flops_lib.optimizer_flops_per_step(c, model.specs, model.initial_params)
  assert count(adamw) == 0
  ns = lambda a, b: 5 * (4 * a * a * b + 2 * a ** 3)  # a = short side, b = long side
  per_layer = 4 * ns(32, 32) + 3 * ns(32, 128)  # q, k, v, o; gate, up, down
  assert count(muon) == 2 * per_layer
  snorm = config_lib.apply_overrides(adamw, {"constraints": {"method": "spectral_normalize",
                                                             "power_iters": 3}})
  per_layer = 4 * (3 * 4 * 32 * 32 + 2 * 32 * 32) + 3 * (3 * 4 * 32 * 128 + 2 * 32 * 128)
  assert count(snorm) == 2 * per_layer


# slow (~55 s on 2 cores: three training runs): the default suite checks the per-interval
# sum against the per-step definition (test_phase_intervals_cover_the_steps_with_one_phase_
# each) and exact resume in general (test_train.py); this is the end-to-end count.
@pytest.mark.slow
def test_flops_seen_follows_the_topk_schedule_and_survives_resume(tmp_path):
  """perf/flops_seen = sum over steps of (FLOPs/token of that step's phase x tokens + the
  optimizer's matrix FLOPs), and a run stopped and resumed ends with the same count."""
  import json  # pylint: disable=g-import-not-at-top
  from effjax.train import trainer  # pylint: disable=g-import-not-at-top
  cfg = config_lib.apply_overrides(config_lib.Config(), {
      "model": {"d_model": 32, "n_layers": 4, "n_heads": 2,
                "moe": {"num_experts": 4, "top_k": 1, "topk_schedule": "0.5:2:0.5"}},
      "optim": {"name": "muon"},
      "train": {"steps": 6, "warmup_steps": 1, "batch_size": 2, "seq_len": 16, "log_every": 1,
                "eval_every": 6, "eval_batches": 1, "checkpoint_every": 3, "sample_tokens": 0,
                "plot": False}})

  def final(workdir):
    return json.loads((workdir / "final_metrics.json").read_text())

  whole, split = tmp_path / "whole", tmp_path / "split"
  trainer.train(cfg, str(whole), quiet=True)
  trainer.train(cfg, str(split), quiet=True, stop_at=3)
  trainer.train(cfg, str(split), quiet=True)
  info = json.loads((whole / "run_info.json").read_text())
  rows = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
  per_step = [b["perf/flops_seen"] - a["perf/flops_seen"]
              for a, b in zip([r for r in rows if "perf/flops_seen" in r],
                              [r for r in rows if "perf/flops_seen" in r][1:])]
  assert info["optimizer_flops_per_step"] > 0
  assert per_step[0] > per_step[-1]  # top-k 2 in the first half of the layers, then 1
  assert final(whole)["perf/flops_seen"] == final(split)["perf/flops_seen"]
  # run_info's FLOPs/token is the starting phase's: the first steps cost exactly that
  assert per_step[0] == pytest.approx(info["flops_per_token"] * 2 * 16
                                      + info["optimizer_flops_per_step"], rel=1e-9)


def _fake_run(runs, name, n, tokens, loss, flops, seed=0):
  """A finished run directory as read_point reads it."""
  import json  # pylint: disable=g-import-not-at-top
  wd = runs / name
  wd.mkdir(parents=True)
  (wd / "config.json").write_text(json.dumps({"seed": seed}))
  (wd / "metrics.jsonl").write_text(json.dumps({"step": 10, "perf/step_time_s": 0.1}) + "\n")
  (wd / "final_metrics.json").write_text(json.dumps({
      "eval/loss": loss, "perf/flops_seen": flops, "tokens": tokens,
      "params_active_non_embedding": n, "step": 10}))


def test_second_seeds_go_to_techniques_a_seed_could_move(tmp_path):
  """With dense runs on a known law, a technique at the reference model's own loss gets a
  second seed (its interval reaches 1), one far worse does not, and one not yet run does.
  The dense reference scores a size-matched multiplier of 1."""
  plan = sb.Plan(1.0)
  truth = _true_law()
  sizes = dict(zip(sb.DENSE_SIZES, (2e4, 8e4, 3e5, 1e6)))
  tokens = lambda steps: float(steps * sb.BATCH * sb.SEQ)
  for (d, layers), n in sizes.items():
    for steps in sb.DENSE_STEPS:
      t = tokens(steps)
      _fake_run(tmp_path, f"dense_d{d}_l{layers}_s{steps}", n, t, float(truth.loss(n, t)),
                float(truth.flops_per_token(n)) * t)
  n_ref, big = sizes[sb.REF_SIZE], sb.TECH_STEPS[-1]
  t, c = tokens(big), float(truth.flops_per_token(n_ref)) * tokens(big)
  good, bad = sb.TECHNIQUES[0].name, sb.TECHNIQUES[1].name
  _fake_run(tmp_path, f"{good}_s{big}", n_ref, t, float(truth.loss(n_ref, t)), c)
  _fake_run(tmp_path, f"{bad}_s{big}", n_ref, t, float(truth.loss(n_ref, t / 10)), c)
  chosen = [x.name for x in sb.second_seed_techniques(plan, str(tmp_path), resamples=4)]
  assert good in chosen and bad not in chosen
  assert sb.TECHNIQUES[2].name in chosen  # not run yet
  dense, _, _ = sb.collect(plan, str(tmp_path))
  law, boots, _ = sb.fit_dense_points(dense, 4)
  m = sf.multiplier(law, [float(truth.loss(n_ref, t))], c, boots, ref=sb.reference(plan, dense))
  assert m.value == pytest.approx(1.0, rel=3e-2)


def test_phase_intervals_cover_the_steps_with_one_phase_each():
  """flops_before sums FLOPs per interval of constant phase (not per step): the intervals
  tile [0, stop) and every step in one has the phase of its first step."""
  from effjax.train import extensions  # pylint: disable=g-import-not-at-top

  class Switch(extensions.Extension):
    def __init__(self, at, key):
      self.at, self.key = at, key

    def phase(self, step):
      return {self.key: int(step >= self.at)}

    def phase_changes(self):
      return (self.at,)

  exts = [Switch(4, "a"), Switch(9, "b"), Switch(50, "c")]
  for stop in (0, 3, 4, 10, 12):
    got = extensions.phase_intervals(exts, stop)
    assert [s for a, b in got for s in range(a, b)] == list(range(stop))
    for a, b in got:
      assert len({extensions.merged_phase(exts, s) for s in range(a, b)}) == 1
  assert extensions.phase_intervals(exts, 12) == [(0, 4), (4, 9), (9, 12)]

"""muP and weight-decay rules: per-role multipliers and the coordinate check (issue 7)."""

import jax
import numpy as np
import pytest

from effjax import config as C
from effjax import coord_check, models
from effjax.optim import multipliers_from_roles
from effjax.optim.scaling import adamw_timescale, base_weight_decay


def _cfg(*ov):
  return C.load(["--config=configs/tiny.py", *ov])[0]


def test_per_role_multipliers_follow_the_rules():
  cfg = _cfg("--config.model.param=mup", "--config.model.d_model=128",
             "--config.model.base_width=32", "--config.optim.wd_rule=mup")
  model = models.build(cfg, 257)
  lr, wd = multipliers_from_roles(cfg, model.specs)
  m = 4.0
  assert lr["blocks"]["layers"][0]["attn"]["q"]["kernel"] == pytest.approx(1 / m)   # hidden: 1/m
  # The down projection's fan_in is mlp_dim: 384 here, 128 at the base width (8/3 d rounded
  # up to a multiple of 64), so its multiplier is the fan_in ratio 1/3, not 1/m.
  assert lr["blocks"]["layers"][0]["ffn"]["down"]["kernel"] == pytest.approx(128 / 384)
  assert lr["embed"]["table"] == 1.0 and lr["head"]["kernel"] == 1.0     # embedding, readout
  assert lr["final_norm"]["scale"] == 1.0                                  # vector
  assert wd["blocks"]["layers"][0]["attn"]["q"]["kernel"] == pytest.approx(m)      # mup wd: x m
  assert wd["final_norm"]["scale"] == 0.0
  lw = _cfg("--config.model.d_model=128", "--config.model.base_width=32",
            "--config.optim.wd_rule=layerwise", "--config.optim.wd_exponent=0.5",
            "--config.optim.no_decay_roles=")
  _, wd = multipliers_from_roles(lw, models.build(lw, 257).specs)
  assert wd["blocks"]["layers"][0]["ffn"]["up"]["kernel"] == pytest.approx(2.0)    # m^0.5
  assert wd["final_norm"]["scale"] == 0.0                                  # vectors: 0
  sp = _cfg()
  lr, wd = multipliers_from_roles(sp, models.build(sp, 257).specs)
  assert set(jax.tree.leaves(lr)) == {1.0}


def test_layerwise_rule_gives_fan_et_al_hidden_lr_times_wd():
  """Fan et al. 2025: eta_2 ~ 1/d and lambda_2 ~ sqrt(d), so the hidden matrices' per-step
  decay eta*lambda falls as d^-1/2 from the base width: 1e-3, 7.1e-4, 5.0e-4 at widths
  64, 128, 256 (the mup rule keeps it at 1e-3; e = 1 made layerwise equal to it)."""
  got = {}
  for rule in ("layerwise", "mup"):
    for width in (64, 128, 256):
      cfg = _cfg("--config.model.param=mup", f"--config.model.d_model={width}",
                 "--config.model.base_width=64", f"--config.model.n_heads={width // 16}",
                 "--config.train.lr=1e-2", "--config.optim.weight_decay=0.1",
                 f"--config.optim.wd_rule={rule}")
      lr, wd = multipliers_from_roles(cfg, models.build(cfg, 257).specs)
      got[rule, width] = cfg.train.lr * lr["blocks"]["layers"][0]["attn"]["q"]["kernel"] * \
          base_weight_decay(cfg) * wd["blocks"]["layers"][0]["attn"]["q"]["kernel"]
  np.testing.assert_allclose([got["layerwise", w] for w in (64, 128, 256)],
                             [1e-3, 1e-3 / 2 ** 0.5, 5e-4], rtol=1e-6)
  np.testing.assert_allclose([got["mup", w] for w in (64, 128, 256)], [1e-3] * 3, rtol=1e-6)


def test_mup_init_and_output_multiplier():
  base = _cfg("--config.model.param=mup", "--config.model.d_model=32", "--config.model.base_width=32")
  wide = _cfg("--config.model.param=mup", "--config.model.d_model=128", "--config.model.base_width=32",
              "--config.model.n_heads=16")
  sb = np.std(models.build(base, 257).initial_params["blocks"]["layers"][0]["ffn"]["up"]["kernel"])
  sw = np.std(models.build(wide, 257).initial_params["blocks"]["layers"][0]["ffn"]["up"]["kernel"])
  assert sw / sb == pytest.approx(0.5, rel=0.1)  # variance ~ 1/fan_in: std x 1/sqrt(4)


def test_output_like_matrices_get_the_output_rule_from_their_shapes():
  """TP5 Table 3: a matrix whose fan_in grows with width but whose fan_out does not (the MoE
  router d -> E; the up/gate projections of a fixed-size MLP) is output-like: init std
  x 1/m (variance 1/fan_in^2), lr x 1/m. One whose fan_in is fixed (the down projection of a
  fixed-size MLP) keeps init and lr. Hidden matrices: std x 1/sqrt(m), lr x 1/m. Found from
  the shapes against the base-width model, not from names."""
  def build(width):
    cfg = _cfg("--config.model.param=mup", f"--config.model.d_model={width}",
               "--config.model.base_width=32", f"--config.model.n_heads={width // 8}",
               "--config.model.mlp_dim=64", "--config.model.moe.num_experts=4",
               "--config.model.moe.top_k=1", "--config.model.moe.expert_dim=48",
               "--config.model.moe.layers=1")
    model = models.build(cfg, 257)
    return model, multipliers_from_roles(cfg, model.specs)[0]

  (base, _), (wide, lr) = build(32), build(256)
  m = 8.0
  std = lambda model, *path: float(np.std(_at(model.initial_params, path)))
  ratio = lambda *path: std(wide, *path) / std(base, *path)
  dense, moe = ("blocks", "layers", 0, "ffn"), ("blocks", "layers", 1, "ffn")
  assert ratio(*dense, "up", "kernel") == pytest.approx(1 / m, rel=0.1)      # output-like
  assert ratio(*dense, "down", "kernel") == pytest.approx(1.0, rel=0.1)      # fan_in fixed
  assert ratio(*moe, "router") == pytest.approx(1 / m, rel=0.15)
  assert ratio(*moe, "w_up") == pytest.approx(1 / m, rel=0.1)
  assert ratio(*moe, "w_down") == pytest.approx(1.0, rel=0.1)
  assert ratio("blocks", "layers", 0, "attn", "q", "kernel") == pytest.approx(m ** -0.5, rel=0.1)
  assert _at(lr, dense + ("up", "kernel")) == pytest.approx(1 / m)
  assert _at(lr, dense + ("down", "kernel")) == 1.0
  assert _at(lr, moe + ("router",)) == pytest.approx(1 / m)
  assert _at(lr, moe + ("w_down",)) == 1.0
  assert _at(lr, ("embed", "table")) == 1.0


def _at(tree, path):
  for p in path:
    tree = tree[p]
  return tree


def test_power_lines_sets_wd_from_tau():
  cfg = _cfg("--config.optim.wd_rule=power_lines", "--config.optim.wd_tau=0.2",
             "--config.train.lr=0.01", "--config.train.steps=500")
  assert base_weight_decay(cfg) == pytest.approx(1 / (0.01 * 0.2 * 500))
  assert adamw_timescale(cfg) == pytest.approx(0.2)


def test_coordinate_check_slopes():
  """Tiny widths, a few steps at a large lr: muP keeps the logits and attention logits
  flat in width; SP's logits grow. (Seen: muP -0.01/-0.02, SP +0.6/+1.0 at widths
  32..256; thresholds leave room for the smaller grid used here.)"""
  base = _cfg("--config.train.batch_size=4")
  result = coord_check.run(base, [32, 64, 128], steps=3, lr=1e-2, head_dim=16, verbose=False)
  for m in ("logits", "attn_logits"):
    assert abs(result["mup"][m]["slope"]) < 0.2, (m, result["mup"][m]["slope"])
  assert result["sp"]["logits"]["slope"] > 0.3
  assert result["sp"]["attn_logits"]["slope"] > 0.5


@pytest.mark.slow  # ~100 s on the 2-core CI machine; test_coordinate_check_slopes stays default
def test_coordinate_check_growing_head_dim_catches_the_attention_scale():
  """At a fixed head count with head_dim growing, SP's 1/sqrt(d_head) lets the attention
  logits grow with width while muP's alpha/d_head keeps them flat; MoE FFNs (router and
  experts under the shape-derived rules) stay flat too."""
  base = _cfg("--config.train.batch_size=4", "--config.model.moe.num_experts=4",
              "--config.model.moe.top_k=1", "--config.model.moe.layers=1")
  result = coord_check.run(base, [32, 64, 128], steps=3, lr=1e-2, grow="head_dim", heads=2,
                           verbose=False)
  # Seen: muP slopes -0.45 (attention logits: the uncorrelated init part of q.k/d_head decays
  # as d_head^-1/2, the learned part is flat) to -0.01, nothing grows; SP attention logits
  # +1.7, logits +1.0.
  for m in coord_check.MODULES:
    assert result["mup"][m]["slope"] < 0.2, (m, result["mup"][m]["slope"])
  assert result["sp"]["attn_logits"]["slope"] > 1.0
  assert result["sp"]["logits"]["slope"] > 0.5


def test_power_iteration_matches_svd_and_spectral_metrics_logged(tmp_path):
  from effjax.train import spectral, trainer
  from effjax.train.metrics import read_metrics
  w = jax.random.normal(jax.random.PRNGKey(0), (48, 96))
  assert float(spectral.sigma_max(w, iters=50)) == pytest.approx(
      float(np.linalg.svd(np.asarray(w), compute_uv=False)[0]), rel=1e-3)
  cfg = _cfg("--config.train.steps=4", "--config.train.eval_every=2", "--config.train.warmup_steps=1")
  assert trainer.train(cfg, str(tmp_path), quiet=True).exit_code == 0
  rows = read_metrics(str(tmp_path / "metrics.jsonl"))
  evals = [r for r in rows if "eval/loss" in r]
  assert len(evals) == 2
  assert {"spec/sigma_max/q", "spec/sigma_max/down", "spec/sigma_max/up"} <= set(evals[-1])
  assert rows[0]["optim/tau"] == pytest.approx(1 / (cfg.train.lr * 0.1 * 4))

"""Weight constraints (issue 15): Muon, projections after each step, the Lipschitz
architecture and its certified bound, weight conditioning and weight normalisation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from effjax import checks
from effjax import config as C
from effjax import models
from effjax.optim import make_optimizer
from effjax.optim import muon
from effjax.optim.factory import muon_labels
from tests.conftest import TINY, tiny_step_setup


def _cfg(*overrides):
  return checks.validate(C.load(["--config=" + TINY, *overrides])[0], 1)


def _svals(w):
  return np.linalg.svd(np.asarray(w, np.float64), compute_uv=False)


# ----------------------------------------------------------------------------- Muon


def test_newton_schulz_snaps_singular_values_towards_one():
  # Input with singular values spread over 2 orders of magnitude, batched (2 "experts"). (Five
  # quintic steps lift sigma / ||x||_F >~ 1e-3 into the band; smaller ones need more steps.)
  rng = np.random.default_rng(0)
  u, _ = np.linalg.qr(rng.normal(size=(2, 48, 48)))
  v, _ = np.linalg.qr(rng.normal(size=(2, 32, 32)))
  s = np.logspace(-1, 1, 32)
  x = jnp.asarray(u[:, :, :32] * s @ np.swapaxes(v, -1, -2), jnp.float32)
  for i in range(2):
    assert _svals(x[i]).max() / _svals(x[i]).min() > 99
  quintic = muon.newton_schulz(x, muon.NS_COEFFS["quintic"], 5)
  cubic = muon.newton_schulz(x, muon.NS_COEFFS["cubic"], 40)
  for i in range(2):
    sq, sc = _svals(quintic[i]), _svals(cubic[i])
    # The quintic's known band (Jordan et al. 2024): ~[0.7, 1.2]; its singular vectors are x's.
    assert 0.6 < sq.min() and sq.max() < 1.25, sq
    np.testing.assert_allclose(sc, 1.0, atol=2e-3)
  assert muon.ns_max_gain() < 1.25 and muon.ns_max_gain(muon.NS_COEFFS["cubic"], 30) <= 1.0 + 1e-9
  orth = getattr(getattr(optax, "contrib", None), "orthogonalize_via_newton_schulz", None)
  if orth is not None:  # the same map as optax's on a 2-D matrix
    ref = orth(x[0], jnp.asarray(muon.NS_COEFFS["quintic"]), 5)
    np.testing.assert_allclose(quintic[0], ref, atol=2e-3)


def test_muon_routes_by_role_and_scales_by_shape():
  cfg = _cfg("--config.optim.name=muon", "--config.optim.weight_decay=0",
             "--config.optim.grad_clip=0", "--config.train.schedule=constant",
             "--config.train.warmup_steps=0", "--config.train.lr=0.01",
             "--config.optim.muon_nesterov=false")
  model = models.build(cfg, 257)
  labels = muon_labels(cfg, model.specs)
  layer = labels["blocks"]["layers"][0]
  assert layer["attn"]["q"]["kernel"] == "muon" and layer["ffn"]["down"]["kernel"] == "muon"
  assert labels["embed"]["table"] == "adam" and labels["head"]["kernel"] == "adam"
  assert layer["attn_norm"]["scale"] == "adam"
  tx, _ = make_optimizer(cfg, model.specs)
  params = model.initial_params
  grads = jax.tree.map(lambda p: jax.random.normal(jax.random.PRNGKey(p.size), p.shape), params)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  lr_muon = 0.01 * cfg.optim.muon_lr_mult
  for path in (("attn", "q"), ("ffn", "up"), ("ffn", "down")):
    g = grads["blocks"]["layers"][0][path[0]][path[1]]["kernel"]
    u = updates["blocks"]["layers"][0][path[0]][path[1]]["kernel"]
    fan_in, fan_out = g.shape
    expected = -lr_muon * np.sqrt(fan_out / fan_in) * muon.newton_schulz(g)
    np.testing.assert_allclose(u, expected, rtol=1e-4, atol=1e-7)
    # RMS->RMS norm of the update sqrt(in/out) sigma_max ~ lr (the quintic's band)
    rms_norm = np.sqrt(fan_in / fan_out) * _svals(u).max()
    assert 0.6 * lr_muon < rms_norm < 1.25 * lr_muon, (path, rms_norm)
  # AdamW on the embedding: the first Adam step is lr * g / (|g| + eps) = +-lr.
  np.testing.assert_allclose(np.abs(updates["embed"]["table"]), 0.01, rtol=1e-3)


def test_muon_refuses_adamw_weight_decay_rules():
  with pytest.raises(C.ConfigError, match="optim.wd_rule"):
    _cfg("--config.optim.name=muon", "--config.optim.wd_rule=mup")
  with pytest.raises(C.ConfigError, match="optim.muon_roles"):
    _cfg("--config.optim.name=muon", "--config.optim.muon_roles=hiden")

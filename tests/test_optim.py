"""Optimizer: role-derived multipliers, decoupled weight decay, schedules (issue 2, Optimizer)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from effjax import config as C
from effjax import models
from effjax.optim import make_optimizer, make_schedule, multipliers_from_roles


def test_no_decay_on_vector_params_by_default():
  cfg, _ = C.load(["--config=configs/tiny.py"])
  model = models.build(cfg, 257)
  _, wd = multipliers_from_roles(cfg, model.specs)
  assert wd["blocks"]["layers"][0]["attn_norm"]["scale"] == 0.0
  assert wd["final_norm"]["scale"] == 0.0
  assert wd["blocks"]["layers"][0]["attn"]["q"]["kernel"] == 1.0
  assert wd["embed"]["table"] == 1.0


def test_decoupled_decay_only_moves_decayed_leaves_when_grads_are_zero():
  cfg, _ = C.load(["--config=configs/tiny.py", "--config.optim.weight_decay=0.5",
                   "--config.train.schedule=constant", "--config.train.warmup_steps=0",
                   "--config.train.lr=0.1"])
  model = models.build(cfg, 257)
  tx, _ = make_optimizer(cfg, model.specs)
  params = model.initial_params
  grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  # p <- p - lr * wd * p for decayed leaves; vectors unchanged.
  np.testing.assert_allclose(new["embed"]["table"], params["embed"]["table"] * (1 - 0.1 * 0.5),
                             rtol=1e-6)
  np.testing.assert_array_equal(new["final_norm"]["scale"], params["final_norm"]["scale"])


def test_schedules():
  base = ["--config=configs/tiny.py", "--config.train.steps=100", "--config.train.warmup_steps=10",
          "--config.train.lr=1.0", "--config.train.min_lr_ratio=0.1"]
  cos = make_schedule(C.load(base + ["--config.train.schedule=cosine"])[0].train)
  assert abs(float(cos(0)) - 0.1) < 1e-6 and abs(float(cos(9)) - 1.0) < 1e-6
  assert abs(float(cos(100)) - 0.1) < 1e-6
  assert float(cos(30)) > float(cos(60)) > float(cos(90))
  wsd = make_schedule(C.load(base + ["--config.train.schedule=wsd",
                                     "--config.train.decay_fraction=0.2"])[0].train)
  assert float(wsd(50)) == 1.0 and float(wsd(80)) == 1.0
  assert abs(float(wsd(90)) - 0.55) < 1e-6 and abs(float(wsd(100)) - 0.1) < 1e-6

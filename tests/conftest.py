"""Shared test fixtures. Tests run on CPU with tiny models (docs/architecture.md)."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.py")


def run_module(args, *, env_extra=None, timeout=600, cwd=None):
  """Runs `python -m ...` in a subprocess (used for CLI and multi-device tests)."""
  env = dict(os.environ)
  env.update(env_extra or {})
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                        env=env, cwd=cwd or REPO)


@pytest.fixture
def tiny_config_path():
  return TINY


def tiny_step_setup(cfg, *, seq_len=32, batch_size=8, **step_kwargs):
  """(model, extensions, jitted train step, batch, initial state) for unit tests that step a
  model by hand: the extensions' hooks, gradient hooks and step metrics are in the step
  (not donated, so tests may keep earlier states)."""
  import jax
  import jax.numpy as jnp
  from effjax import models
  from effjax.optim import make_optimizer
  from effjax.train.registry import build_extensions
  from effjax.train.state import TrainState
  from effjax.train.step import make_train_step
  m = models.build(cfg, 257)
  tx, schedule = make_optimizer(cfg, m.specs)
  exts = build_extensions(cfg, m)
  step_fn = jax.jit(make_train_step(
      m, tx, schedule, grad_accum=cfg.train.grad_accum,
      hooks=[h for e in exts for h in e.hooks()],
      grad_hooks=[h for e in exts for h in e.grad_hooks()],
      metric_fns=[e.step_metrics for e in exts], **step_kwargs))
  ids = jax.random.randint(jax.random.PRNGKey(0), (batch_size, seq_len + 1), 0, 256)
  batch = {"inputs": ids[:, :-1], "targets": ids[:, 1:],
           "segment_ids": jnp.ones((batch_size, seq_len), jnp.int32),
           "positions": jnp.broadcast_to(jnp.arange(seq_len), (batch_size, seq_len))}
  state = TrainState(step=jnp.int32(0), params=m.initial_params,
                     opt_state=tx.init(m.initial_params), buffers=m.initial_buffers,
                     rng=jax.random.PRNGKey(0))
  return m, exts, step_fn, batch, state

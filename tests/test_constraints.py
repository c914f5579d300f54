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


# ----------------------------------------------------------------------------- projections


def _matrix(shape, svals, seed=0):
  """A (in, out) matrix with the given singular values."""
  rng = np.random.default_rng(seed)
  u, _ = np.linalg.qr(rng.normal(size=(shape[0], shape[0])))
  v, _ = np.linalg.qr(rng.normal(size=(shape[1], shape[1])))
  r = len(svals)
  return jnp.asarray((u[:, :r] * np.asarray(svals)) @ v[:, :r].T, jnp.float32)


def _constrained_norms(cfg, params):
  from effjax import constraints
  from effjax.constraints.projections import rms_norms
  from effjax.models.index import get_path
  import dataclasses
  spec = models.build(cfg, 257).specs
  cfg = dataclasses.replace(cfg, constraints=dataclasses.replace(cfg.constraints,
                                                                method="svd_clip"))
  paths = constraints.constrained_paths(cfg, spec)  # every matrix of constraints.roles
  assert paths
  return np.concatenate([np.atleast_1d(rms_norms(get_path(params, p))) for p in paths])


def _run_steps(cfg, n):
  """The params after each of n steps (one compile)."""
  _, _, step_fn, batch, state = tiny_step_setup(cfg)
  out = []
  for _ in range(n):
    state, _ = step_fn(state, batch)
    out.append(state.params)
  return out


def test_unconstrained_steps_leave_the_bound_behind():
  """The control for the next test: without a projection, these steps break w_max = 0.5."""
  base = ("--config.train.lr=0.3", "--config.train.warmup_steps=0",
          "--config.train.log_spectral=false")
  for opt in ("adamw", "muon"):
    cfg = _cfg(*base, f"--config.optim.name={opt}")
    assert _constrained_norms(cfg, _run_steps(cfg, 3)[-1]).max() > 1.0


@pytest.mark.parametrize("method,opt,lr", [("spectral_normalize", "adamw", 0.01),
                                           ("hard_cap", "muon", 0.3), ("svd_clip", "muon", 0.3)])
def test_every_constrained_matrix_within_w_max_after_each_step(method, opt, lr):
  w_max = 0.3  # below the init's largest norm (0.33): active from step 1
  cfg = _cfg(f"--config.train.lr={lr}", "--config.train.warmup_steps=0",
             "--config.train.log_spectral=false", f"--config.optim.name={opt}",
             f"--config.constraints.w_max={w_max}", f"--config.constraints.method={method}")
  for step, params in enumerate(_run_steps(cfg, 3)):
    norms = _constrained_norms(cfg, params)
    # Power iteration estimates sigma_1 from below, so spectral_normalize overshoots by the
    # estimate's error: 8 x 16 iterations from the random start of step 1, then 16 warm-started
    # ones, leave < 1e-3 at a training lr (at lr 0.3, where each step rewrites the matrices and
    # the warm start is worthless, ~1% was seen). hard_cap's cubic Newton-Schulz never
    # overshoots (fp32 round-off only); svd_clip is exact.
    tol = {"spectral_normalize": 1e-3, "hard_cap": 5e-4, "svd_clip": 1e-5}[method]
    assert norms.max() <= w_max * (1 + tol), (step, norms.max())
    assert norms.max() > 0.9 * w_max  # the bound is active, not a collapse of the weights


def test_soft_cap_keeps_muon_at_its_coupled_bound():
  base = ("--config.optim.name=muon", "--config.train.lr=0.009", "--config.train.warmup_steps=0",
          "--config.train.schedule=constant", "--config.constraints.w_max=0.4",
          "--config.train.log_spectral=false")
  free = _constrained_norms(_cfg(*base), _run_steps(_cfg(*base), 4)[-1])
  assert free.max() > 0.41  # without the cap Muon's steps leave the bound behind
  cfg = _cfg(*base, "--config.constraints.method=soft_cap")
  init = _constrained_norms(cfg, models.build(cfg, 257).initial_params)
  assert init.max() <= 0.4  # the coupling holds from matrices that start inside the bound
  for step, params in enumerate(_run_steps(cfg, 4)):
    norms = _constrained_norms(cfg, params)
    assert norms.max() <= 0.4 * (1 + 1e-4), (step, norms.max())


def test_soft_cap_alpha_solves_the_coupling_equation():
  from effjax.constraints import projections as P
  # Within the guaranteed range k <= 1.3 w_max (constraints.SOFT_CAP_MAX_STEP) ...
  for w_max, k in ((1.0, 1.1), (2.0, 2.05), (0.5, 0.65), (1.0, 1.3)):
    alpha = P.soft_cap_alpha(jnp.float32(w_max), jnp.float32(k))
    np.testing.assert_allclose(P.soft_cap_poly(k, alpha), w_max, rtol=1e-5)
    # f never exceeds w_max on [0, k] (so every sigma <= k lands within the bound)
    assert float(jnp.max(P.soft_cap_poly(jnp.linspace(0, k, 1001), alpha))) <= w_max * (1 + 1e-5)
  assert float(P.soft_cap_alpha(jnp.float32(1.0), jnp.float32(0.9))) < 1e-12  # no cap needed
  # ... and beyond it f overshoots below k, so such an lr is refused.
  alpha = P.soft_cap_alpha(jnp.float32(0.5), jnp.float32(0.9))
  assert float(jnp.max(P.soft_cap_poly(jnp.linspace(0, 0.9, 1001), alpha))) > 0.55
  with pytest.raises(C.ConfigError, match="soft_cap"):
    _cfg("--config.optim.name=muon", "--config.constraints.method=soft_cap",
         "--config.constraints.w_max=0.1", "--config.train.lr=0.01")


def test_hammer_moves_only_sigma_1_and_experts_are_projected_one_by_one():
  from effjax.constraints import projections as P
  svals = [5.0, 2.0, 1.5, 1.0, 0.5]
  w = jnp.stack([_matrix((12, 20), svals, 0), _matrix((12, 20), [s / 10 for s in svals], 1)])
  s = 1.2  # sigma bound: expert 0 is above it, expert 1 below
  sigma, u, v = P.power_iteration(w, jnp.ones((2, 20)), 30)
  np.testing.assert_allclose(sigma, [5.0, 0.5], rtol=1e-5)
  hammered = P.spectral_hammer(w, sigma, u, v, s)
  np.testing.assert_allclose(sorted(_svals(hammered[0]), reverse=True)[:5],
                             [2.0, 1.5, 1.2, 1.0, 0.5], atol=1e-4)
  assert np.linalg.matrix_rank(np.asarray(hammered[0] - w[0]), tol=1e-4) == 1
  np.testing.assert_array_equal(hammered[1], w[1])  # within the bound: untouched
  normalized = P.spectral_normalize(w, sigma, s)
  np.testing.assert_allclose(_svals(normalized[0])[:5], np.asarray(svals) * s / 5.0, rtol=1e-4)
  np.testing.assert_array_equal(normalized[1], w[1])
  clipped = P.svd_clip(w, s)
  np.testing.assert_allclose(_svals(clipped[0])[:5], [1.2, 1.2, 1.2, 1.0, 0.5], atol=1e-4)
  capped = P.hard_cap(w, s)
  np.testing.assert_allclose(_svals(capped[0])[:5], [1.2, 1.2, 1.2, 1.0, 0.5], atol=2e-3)
  decayed = P.spectral_weight_decay(w, sigma, u, v, 0.1)
  np.testing.assert_allclose(_svals(decayed[0])[:5], [4.5, 2.0, 1.5, 1.0, 0.5], atol=1e-4)


def _power_iteration_config():
  return _cfg("--config.train.steps=4", "--config.train.warmup_steps=1",
              "--config.train.log_every=1", "--config.train.checkpoint_every=100",
              "--config.train.eval_every=2", "--config.constraints.method=spectral_normalize",
              "--config.constraints.w_max=0.5", "--config.train.lr=0.005",
              "--config.optim.name=muon")  # + Muon's masked state


def test_power_iteration_buffer_is_in_the_state():
  """The power iteration's vector is a model buffer (so TrainState checkpoints it, as the
  default suite checks for the ALF bias buffer in test_moe.py), one per constrained kernel."""
  m = models.build(_power_iteration_config(), 257)
  q = m.initial_buffers["blocks"]["layers"][0]["attn"]["q"]
  kernel = m.initial_params["blocks"]["layers"][0]["attn"]["q"]["kernel"]
  assert q["kernel_sv"].shape == (kernel.shape[-1],)  # the top right-singular vector


# slow (~60 s on 2 cores: three training runs): exact resume with constraint buffers and
# Muon; the default suite has the buffer check above and exact resume with a buffer (the
# ALF bias, test_moe.py) and without (test_train.py).
@pytest.mark.slow
def test_power_iteration_resume_is_exact(tmp_path):
  import os
  from effjax.train import trainer
  from effjax.train.metrics import read_metrics
  cfg = _power_iteration_config()
  data = trainer.load_data(cfg)
  straight, chunked = str(tmp_path / "straight"), str(tmp_path / "chunked")
  assert trainer.train(cfg, straight, data=data, quiet=True).exit_code == 0
  assert trainer.train(cfg, chunked, data=data, quiet=True, stop_at=2).exit_code == 75
  assert trainer.train(cfg, chunked, data=data, quiet=True).exit_code == 0
  a = read_metrics(os.path.join(straight, "metrics.jsonl"))
  b = read_metrics(os.path.join(chunked, "metrics.jsonl"))
  keys = ("train/loss", "train/param_norm", "eval/loss", "constraints/max_rms_norm")
  pick = lambda rows: {(r["step"], k): r[k] for r in rows for k in keys if k in r}
  assert len(pick(a)) == 4 * 2 + 2 * 2 and pick(a) == pick(b)
  assert max(r.get("constraints/max_rms_norm", 0) for r in a) <= 0.5 * (1 + 1e-3)


# ----------------------------------------------------------------------------- Lipschitz


def _scaled(params, head=1.0, **layer_mults):
  """params with the head and per-layer kernels ('attn.q', 'ffn.up', ...) multiplied."""
  params = jax.tree.map(lambda x: x, params)
  params["head"]["kernel"] = params["head"]["kernel"] * head
  for layer in params["blocks"]["layers"].values():
    for name, mult in layer_mults.items():
      mod, slot = name.split("_")
      layer[mod][slot]["kernel"] = layer[mod][slot]["kernel"] * mult
  return params


def _measured_ratio(f, params, shape=(2, 16, 32)):
  """The largest output/input change ratio of x -> f(params, x) (max-over-tokens RMS norms)
  over random pairs in the unit ball and small steps along each pair's top l2 Jacobian
  direction."""
  from effjax.models.lipschitz import token_rms
  best = 0.0
  g = lambda x: f(params, x)
  for seed in range(2):
    x, y = (jax.random.normal(jax.random.PRNGKey(seed + k), shape) for k in (0, 50))
    x, y = (0.9 * z / token_rms(z)[..., None] for z in (x, y))
    d = jax.random.normal(jax.random.PRNGKey(seed + 100), x.shape)
    for _ in range(12):  # power iteration on J^T J at x
      d = jax.vjp(g, x)[1](jax.jvp(g, (x,), (d,))[1])[0]
      d = d / jnp.linalg.norm(d)
    for a, b in ((x, y), (x, x + 1e-2 * d / jnp.max(token_rms(d)))):
      best = max(best, float(jnp.max(token_rms(g(a) - g(b))) / jnp.max(token_rms(a - b))))
  return best


def test_certified_bound_holds_and_needs_every_term():
  from effjax.constraints import lipschitz as LB
  cfg = _cfg("--config.model.arch=lipschitz")
  m = models.build(cfg, 257)
  f = jax.jit(lambda p, x: LB.logits_from_residual(m, p, m.initial_buffers, x))
  bound = jax.jit(lambda p, omit=(): LB.certified_bound(m, p, a0=1.0, omit=omit),
                  static_argnums=1)
  measured = lambda params: _measured_ratio(f, params)

  # Each case makes one term dominate; leaving that term out puts the bound below what is
  # measured, so a bound missing it would fail here.
  cases = {
      "init": ({}, None),
      "unembed": (dict(head=50.0), "unembed"),
      "mlp": (dict(head=50.0, attn_o=0.0, ffn_up=100.0, ffn_down=300.0), "mlp"),
      "value": (dict(head=50.0, attn_q=0.0, attn_o=300.0, attn_v=100.0, ffn_down=0.0), "value"),
      "softmax": (dict(head=50.0, attn_q=200.0, attn_k=200.0, attn_o=300.0, attn_v=50.0,
                       ffn_down=0.0), "softmax"),
  }
  for name, (mults, term) in cases.items():
    params = _scaled(m.initial_params, **mults)
    full = float(bound(params)["constraints/lipschitz_bound_residual"])
    seen = measured(params)
    assert seen <= full, (name, seen, full)
    if term is not None:
      without = float(bound(params, (term,))["constraints/lipschitz_bound_residual"])
      assert without < seen, (name, term, without, seen)


def test_logit_scale_multiplies_the_certified_bound():
  """model.output_mult (the logit scale, an inverse temperature) multiplies the logits, so the
  certified bound must carry it: with a scale of 6 the bound is 6x the unscaled one and still
  above the measured ratio, which exceeds the bound that leaves the scale out."""
  from effjax.constraints import lipschitz as LB
  cfgs = {s: _cfg("--config.model.arch=lipschitz", f"--config.model.output_mult={s}")
          for s in (1.0, 6.0)}
  ms = {s: models.build(c, 257) for s, c in cfgs.items()}
  # The same weights in both models (the scale is no parameter); a large readout makes the
  # readout term dominate, where the bound is tightest.
  params = _scaled(ms[1.0].initial_params, head=50.0)
  bounds = {s: float(LB.certified_bound(m, params, a0=1.0)["constraints/lipschitz_bound_residual"])
            for s, m in ms.items()}
  np.testing.assert_allclose(bounds[6.0], 6.0 * bounds[1.0], rtol=1e-6)
  m6 = ms[6.0]
  seen = _measured_ratio(jax.jit(lambda p, x: LB.logits_from_residual(m6, p, m6.initial_buffers,
                                                                      x)), params)
  assert bounds[1.0] < seen <= bounds[6.0], (bounds, seen)


def test_lipschitz_embedding_rows_start_and_stay_at_embed_max():
  """model.arch=lipschitz: every token embedding starts at RMS norm constraints.embed_max (the
  paper's unit-RMS embedding; a standard model keeps its std-init_std table), and after every
  optimizer step the rows are projected back to RMS <= embed_max (rows below stay as they are);
  constraints.embed_max=0 starts at unit RMS and does not project. The embedding and readout
  take optim.io_lr_mult (auto: 10 here, 1 for the standard model)."""
  from effjax.constraints.projections import cap_row_rms
  from effjax.models.lipschitz import token_rms
  from effjax.optim.factory import multipliers_from_roles
  std = models.build(_cfg(), 257)
  np.testing.assert_allclose(float(jnp.mean(token_rms(std.initial_params["embed"]["table"]))),
                             0.02, rtol=0.1)
  t = jnp.asarray(np.random.default_rng(0).normal(size=(6, 8)) * [[0.1], [0.5], [1], [2], [3],
                                                                   [9]], jnp.float32)
  capped = cap_row_rms(t, 1.5)
  rms_in, rms_out = np.asarray(token_rms(t)), np.asarray(token_rms(capped))
  np.testing.assert_allclose(rms_out, np.minimum(rms_in, 1.5), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(capped) / np.asarray(t),  # a rescaling of each row
                             np.broadcast_to((np.minimum(rms_in, 1.5) / rms_in)[:, None],
                                             t.shape), rtol=1e-5)
  for embed_max, lr in ((0.5, 0.05), (0.0, 0.05)):
    cfg = _cfg("--config.model.arch=lipschitz", "--config.optim.name=muon",
               f"--config.constraints.embed_max={embed_max}", f"--config.train.lr={lr}",
               "--config.train.warmup_steps=0")
    m, _, step_fn, batch, state = tiny_step_setup(cfg)
    target = embed_max or 1.0
    np.testing.assert_allclose(token_rms(state.params["embed"]["table"]), target, rtol=1e-5)
    lr_mult = multipliers_from_roles(cfg, m.specs)[0]
    assert lr_mult["embed"]["table"] == 10.0 and lr_mult["head"]["kernel"] == 10.0
    for _ in range(3):
      state, _ = step_fn(state, batch)
    rms = np.asarray(token_rms(state.params["embed"]["table"]))
    if embed_max:
      assert rms.max() <= embed_max * (1 + 1e-5) and rms.min() < 0.999 * embed_max
    else:
      assert rms.max() > 1.001  # AdamW at lr x 10 moves the rows; nothing projects them
  assert multipliers_from_roles(_cfg(), std.specs)[0]["head"]["kernel"] == 1.0


# ----------------------------------------------------------------------------- reparam


def test_weight_conditioning_gives_unit_rows_and_lowers_kappa():
  from effjax.constraints.reparam import WeightCond, condition
  hook = WeightCond(24, axes=("embed", "mlp"), gain=False, stop_grad=False)
  rng = np.random.default_rng(0)
  for seed in range(20):
    # random matrices whose output units (columns here, rows of the paper's W) differ in scale
    scales = np.exp(rng.uniform(-2, 2, size=24))
    w = jnp.asarray(rng.normal(size=(40, 24)) * scales, jnp.float32)
    cond = hook.weight(w)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(cond), axis=0), 1.0, rtol=1e-5)
    assert float(condition(cond)) <= float(condition(w)), seed


def test_weight_norm_forward_is_g_v_over_norm_v_and_conditioning_gradients():
  cfg = _cfg("--config.constraints.reparam=weight_norm")
  plain_cfg = _cfg()
  m, plain = models.build(cfg, 257), models.build(plain_cfg, 257)
  params = jax.tree.map(lambda x: x, m.initial_params)
  rng = np.random.default_rng(1)
  q = params["blocks"]["layers"][0]["attn"]["q"]
  q["reparam"]["gain"] = jnp.asarray(rng.uniform(0.5, 2.0, q["reparam"]["gain"].shape),
                                     jnp.float32)
  # The plain model with every block kernel replaced by g V / ||V|| (columns = output units).
  plain_params = jax.tree.map(lambda x: x, plain.initial_params)
  for i, layer in params["blocks"]["layers"].items():
    for mod, slots in (("attn", "qkvo"), ("ffn", ("gate", "up", "down"))):
      for slot in slots:
        lin = layer[mod][slot]
        v = np.asarray(lin["kernel"], np.float64)
        w = np.asarray(lin["reparam"]["gain"]) * v / np.linalg.norm(v, axis=0)
        plain_params["blocks"]["layers"][i][mod][slot]["kernel"] = jnp.asarray(w, jnp.float32)
  for key in ("embed", "head", "final_norm"):
    plain_params[key] = params[key]
  ids = jax.random.randint(jax.random.PRNGKey(0), (2, 16), 0, 256)
  got = m.apply(params, m.initial_buffers, ids)[0]
  want = plain.apply(plain_params, plain.initial_buffers, ids)[0]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)

  # Weight conditioning: with the gradient through E the loss is invariant to each column's
  # scale, so dL/dW_j is orthogonal to W_j; with stop-gradient it is E dL/dW~, which is not.
  def column_dots(extra):
    c = _cfg("--config.constraints.reparam=weight_cond", *extra)
    mc = models.build(c, 257)
    loss = lambda p: jnp.mean(mc.apply(p, mc.initial_buffers, ids)[0] ** 2)
    g = jax.grad(loss)(mc.initial_params)["blocks"]["layers"][0]["ffn"]["up"]["kernel"]
    w = mc.initial_params["blocks"]["layers"][0]["ffn"]["up"]["kernel"]
    return np.abs(np.sum(np.asarray(g) * np.asarray(w), axis=0)) / (
        np.linalg.norm(g, axis=0) * np.linalg.norm(w, axis=0))
  assert column_dots(()).max() < 1e-4
  assert column_dots(("--config.constraints.cond_stop_grad=true",)).max() > 1e-2


def test_lipschitz_block_matrices_start_orthogonal_at_w_max():
  """model.arch=lipschitz: every block matrix starts with all singular values equal and its
  RMS->RMS norm sqrt(d_in/d_out) sigma_max at constraints.w_max (a standard model: Gaussian)."""
  for arch, w_max in (("lipschitz", 1.0), ("lipschitz", 0.5), ("standard", 1.0)):
    cfg = _cfg(f"--config.model.arch={arch}", f"--config.constraints.w_max={w_max}")
    m = models.build(cfg, 257)
    kernels = [(k, v) for k, v in jax.tree_util.tree_flatten_with_path(m.initial_params)[0]
               if "blocks" in jax.tree_util.keystr(k) and v.ndim == 2 and v.shape[0] > 1
               and "kernel" in jax.tree_util.keystr(k)]
    assert len(kernels) >= 4 * cfg.model.n_layers
    for _, w in kernels:
      sv = _svals(w)
      rms_norm = (w.shape[0] / w.shape[1]) ** 0.5 * sv[0]
      if arch == "lipschitz":
        np.testing.assert_allclose(rms_norm, w_max, rtol=1e-4)
        np.testing.assert_allclose(sv[-1], sv[0], rtol=1e-4)
      else:
        assert sv[-1] < 0.9 * sv[0]  # a Gaussian's spread of singular values


def test_lipschitz_run_logs_its_certificate(tmp_path):
  """A Lipschitz transformer trained with Muon + soft cap: every eval logs the certified bound
  with per-block terms, the activation bound sits above the activations seen on the eval
  batches, and the constrained matrices stay within w_max."""
  from effjax.train import trainer
  cfg = _cfg("--config.model.arch=lipschitz", "--config.optim.name=muon",
             "--config.constraints.method=soft_cap", "--config.constraints.w_max=1.0",
             "--config.train.lr=0.005", "--config.train.steps=4", "--config.train.warmup_steps=0",
             "--config.train.eval_every=2", "--config.train.checkpoint_every=100",
             "--config.train.log_spectral=false")
  result = trainer.train(cfg, str(tmp_path), data=trainer.load_data(cfg), quiet=True)
  assert result.exit_code == 0
  last = result.final_metrics
  for key in ("constraints/lipschitz_bound", "constraints/lipschitz_bound_residual",
              "constraints/lipschitz/attn/layer1", "constraints/lipschitz/mlp/layer0"):
    assert key in last and last[key] > 0, key
  assert 0 < last["constraints/max_activation_norm"] <= last["constraints/activation_bound"]
  assert last["constraints/max_rms_norm"] <= 1.0 + 1e-4


# slow (~50 s on 2 cores: two subprocesses, one on 8 devices): the default suite checks
# 8-device runs against one device for the dense model (test_train.py) and expert
# parallelism (test_moe.py); this adds Muon's masked state and sharded power iteration.
@pytest.mark.slow
def test_eight_device_constrained_muon_run_matches_one_device(tmp_path):
  """Muon (masked optimizer state) + spectral normalisation (power-iteration buffers sharded
  along each kernel's output axis) on an fsdp x tensor mesh of 8 CPU devices equals 1 device."""
  import json
  from tests.conftest import run_module
  from tests.test_train import _SHARDED, _train_losses
  extra = ["--config.optim.name=muon", "--config.constraints.method=spectral_normalize",
           "--config.constraints.w_max=0.5", "--config.train.lr=0.005",
           "--config.train.warmup_steps=1"]
  one = run_module(["-c", _SHARDED, str(tmp_path / "one"), *extra])
  assert one.returncode == 0, one.stderr[-3000:]
  eight = run_module(["-c", _SHARDED, str(tmp_path / "eight"), *extra, "--config.mesh.fsdp=4",
                      "--config.mesh.tensor=2"],
                     env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  assert eight.returncode == 0, eight.stderr[-3000:]
  assert json.loads(eight.stdout.strip().splitlines()[-1])["devices"] == 8
  a, b = _train_losses(tmp_path / "one"), _train_losses(tmp_path / "eight")
  assert sorted(a) == sorted(b) == list(range(1, 7))
  # As in tests/test_train.py: sharded reductions sum in another order (fp32 round-off).
  np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)], rtol=1e-4)

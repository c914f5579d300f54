"""QAT quantizers (docs/qat.md): QuEST, StatsQ, LSQ, the Hadamard rotation, the hooks."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax import config as C
from effjax import models
from effjax.quant import (ALPHA, block_hadamard, hadamard_matrix, lsq_quantize, quest_quantize,
                          quest_rotated, statsq_quantize)
from effjax.quant.statsq import statsq_codes


def _heavy(shape, seed=0):
  """Student-t-like rows: enough outliers that the clip is reached and the trust mask bites."""
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  return jax.random.normal(k1, shape) / jnp.sqrt(jax.random.gamma(k2, 2.0, shape) / 2.0)


@pytest.mark.parametrize("bits", range(1, 9))
def test_quest_has_2_pow_b_levels_and_no_zero(bits):
  x = _heavy((2, 65536), seed=bits)
  q = quest_quantize(x, bits, hadamard_block=None)
  for row in np.asarray(q):
    levels = np.unique(row)
    assert len(levels) == 2 ** bits, (bits, len(levels))
    assert not np.any(levels == 0)
    np.testing.assert_allclose(levels, -levels[::-1], rtol=1e-5)  # symmetric grid
    if bits > 1:  # uniform step 2 s / (2^b - 1)
      np.testing.assert_allclose(np.diff(levels), np.diff(levels)[0], rtol=1e-3)


def _gaussian_mse(alpha: float, bits: int) -> float:
  """E[(Q(z) - z)^2], z ~ N(0, 1), mid-rise b-bit grid clipped at alpha (quadrature)."""
  z = np.linspace(-10, 10, 100_001)
  pdf = np.exp(-z * z / 2) / math.sqrt(2 * math.pi)
  if bits == 1:
    q = np.where(z >= 0, alpha, -alpha)
  else:
    step = 2 * alpha / (2 ** bits - 1)
    k = np.clip(np.floor(np.clip(z, -alpha, alpha) / step), -(2 ** (bits - 1)),
                2 ** (bits - 1) - 1)
    q = (k + 0.5) * step
  return float(np.sum((q - z) ** 2 * pdf) * (z[1] - z[0]))


@pytest.mark.parametrize("bits", range(1, 9))
def test_alpha_b_is_the_gaussian_mse_optimal_clip(bits):
  """alpha_b minimises the Gaussian MSE of the b-bit grid. Found by quadrature: the
  constants of docs/qat.md match the optimum to 1e-4 up to 6 bits; at 7 and 8 bits the
  published values sit 0.3% / 1% below it (excess MSE 1e-4 / 1.5e-3 relative: the curve is
  flat there), hence the 0.2% MSE bound next to the location bound for b <= 6."""
  a = ALPHA[bits]
  grid = a + np.linspace(-0.08, 0.08, 81)
  mses = np.array([_gaussian_mse(x, bits) for x in grid])
  best = grid[np.argmin(mses)]
  assert _gaussian_mse(a, bits) <= mses.min() * 1.002, (bits, a, best)
  if bits <= 6:  # 0.002 grid resolution + the 0.0014 offset of the 6-bit constant
    assert abs(best - a) <= 0.004, (bits, a, best)
  if bits == 1:  # closed form: E|z| = sqrt(2 / pi)
    assert a == pytest.approx(math.sqrt(2 / math.pi), abs=1e-6)


@pytest.mark.parametrize("bits", [2, 4])
def test_quest_gradient_is_identity_inside_trust_region_and_zero_outside(bits):
  x = _heavy((8, 512), seed=3)
  cot = jax.random.normal(jax.random.PRNGKey(1), x.shape)
  grad = jax.grad(lambda x: jnp.sum(quest_quantize(x, bits, hadamard_block=None) * cot))(x)
  sigma = jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True))
  q = quest_quantize(x, bits, hadamard_block=None)
  inside = jnp.abs(q - x) <= ALPHA[bits] / (2 ** bits - 1) * sigma
  assert 0.9 < float(inside.mean()) < 1.0  # both cases occur
  np.testing.assert_array_equal(np.asarray(grad)[~np.asarray(inside)], 0.0)
  np.testing.assert_array_equal(np.asarray(grad)[np.asarray(inside)], np.asarray(cot)[np.asarray(inside)])
  # A larger trust factor passes more gradient; sigma carries none.
  _, stats_wide = quest_rotated(x, bits, trust=4.0)
  _, stats = quest_rotated(x, bits)
  assert float(stats_wide["trusted"]) > float(stats["trusted"])


def test_quest_one_bit_is_sign_times_alpha_sigma_with_clip_mask():
  x = _heavy((2, 1024), seed=5)
  q = quest_quantize(x, 1, hadamard_block=None)
  sigma = jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True))
  np.testing.assert_allclose(q, jnp.sign(x) * ALPHA[1] * sigma, rtol=1e-6)
  grad = jax.grad(lambda x: jnp.sum(quest_quantize(x, 1, hadamard_block=None)))(x)
  np.testing.assert_array_equal(grad, (jnp.abs(x) <= 1.3 * ALPHA[1] * sigma).astype(jnp.float32))


def test_hadamard_is_orthogonal_and_half_hadamard_identity_holds():
  h = hadamard_matrix(128)
  np.testing.assert_allclose(h @ h.T, np.eye(128), atol=1e-6)
  np.testing.assert_allclose(h, h.T)
  x = jax.random.normal(jax.random.PRNGKey(0), (5, 256))
  w = jax.random.normal(jax.random.PRNGKey(1), (256, 48))
  np.testing.assert_allclose(block_hadamard(block_hadamard(x, 128), 128), x, atol=1e-5)
  # x W^T in the paper's (out, in) layout is x W for a Flax (in, out) kernel:
  np.testing.assert_allclose(block_hadamard(x, 128, -1) @ block_hadamard(w, 128, 0), x @ w,
                             rtol=1e-4, atol=1e-4)


def test_quest_rotation_spreads_outliers_and_lowers_error():
  """A row with one huge outlier: quantizing in the Hadamard basis has lower MSE."""
  x = jax.random.normal(jax.random.PRNGKey(2), (16, 512)).at[:, 7].set(40.0)
  err_rot = jnp.mean((quest_quantize(x, 4, hadamard_block=128) - x) ** 2)
  err_plain = jnp.mean((quest_quantize(x, 4, hadamard_block=None) - x) ** 2)
  assert float(err_rot) < 0.5 * float(err_plain)


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_statsq_scale_levels_and_identity_gradient(bits):
  w = jax.random.normal(jax.random.PRNGKey(bits), (256, 8)) * 0.02
  codes, s = statsq_codes(w, bits)
  np.testing.assert_allclose(s[0], 2 * jnp.mean(jnp.abs(w), axis=0), rtol=1e-6)
  q = statsq_quantize(w, bits)
  n = 2 ** (bits - 1)
  for col in range(w.shape[1]):
    levels = np.unique(np.asarray(q[:, col]))
    grid = float(s[0, col]) * (np.arange(-n, n) + 0.5) / n  # 2^b levels, none at zero
    assert len(levels) <= 2 ** bits and not np.any(levels == 0)
    np.testing.assert_allclose(levels, grid[np.searchsorted(grid, levels - 1e-9)], rtol=1e-6)
  assert len(np.unique(np.asarray(q[:, 0]))) == 2 ** bits
  grad = jax.grad(lambda w: jnp.sum(statsq_quantize(w, bits) * 3.0))(w)
  np.testing.assert_array_equal(grad, 3.0)


def test_lsq_grid_and_step_gradient_scale():
  x = jax.random.normal(jax.random.PRNGKey(0), (64, 32))
  step = jnp.asarray(0.3)
  q = lsq_quantize(x, step, 3, numel=32)
  codes = np.asarray(q / 0.3)
  np.testing.assert_allclose(codes, np.round(codes), atol=1e-5)
  assert codes.min() >= -4 and codes.max() <= 3
  # d/ds is LSQ's (round(v) - v inside, the clip bound outside) times 1 / sqrt(numel Q_p).
  g = jax.grad(lambda s: jnp.sum(lsq_quantize(x, s, 3, numel=32)))(step)
  v = np.clip(np.asarray(x) / 0.3, -4, 3)
  raw = np.where((np.asarray(x) / 0.3 > -4) & (np.asarray(x) / 0.3 < 3), np.round(v) - v, v)
  np.testing.assert_allclose(float(g), raw.sum() / math.sqrt(32 * 3), rtol=1e-4)


def _logits(overrides, ids):
  cfg, _ = C.load(["--config=configs/tiny.py", "--config.model.d_model=128", *overrides])
  m = models.build(cfg, 257)
  return m.apply(m.initial_params, m.initial_buffers, ids)[0]


def test_model_quantization_error_shrinks_with_bits_and_half_equals_full():
  ids = jax.random.randint(jax.random.PRNGKey(0), (2, 32), 0, 257)
  ref = _logits([], ids)
  err = {}
  for bits in (2, 4, 8):
    out = _logits(["--config.quant.method=quest", f"--config.quant.weight_bits={bits}",
                   f"--config.quant.act_bits={bits}"], ids)
    err[bits] = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
  # Relative logit error at init (d_model 128, 2 blocks, 6 quantized matmuls each): measured
  # 0.021 / 0.20 / 0.53 for W8A8 / W4A4 / W2A2; the bound checks the ordering and a small W8A8.
  assert err[8] < 0.05 and 5 * err[8] < err[4] < err[2], err
  # full (rotate back) and half (multiply in the rotated basis) compute the same product up
  # to fp32 rounding (test_half_and_full_hadamard_linears_agree), but in a model that
  # rounding flips grid decisions downstream: 65 of 8192 codes of block 1's attention-output
  # quantizer flipped from a 3e-7 input difference (many values sit at grid boundaries
  # there; not understood yet). Measured whole-model gap 0.073 vs the 0.198 W4A4 error, so
  # the bound only says the two variants are the same model, not bit-equal.
  full = _logits(["--config.quant.method=quest", "--config.quant.hadamard=full"], ids)
  half = _logits(["--config.quant.method=quest", "--config.quant.hadamard=half"], ids)
  assert float(jnp.linalg.norm(full - half) / jnp.linalg.norm(ref)) < 0.5 * err[4]


def test_half_and_full_hadamard_linears_agree():
  from flax import nnx
  from effjax.models.layers import Linear
  from effjax.quant.hooks import make_hooks
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 256))
  out = {}
  for mode in ("full", "half"):
    q = C.QuantConfig(method="quest", weight_bits=3, act_bits=3, hadamard=mode)
    hooks = make_hooks(q, 256, 64, std=0.05, axes=("embed", "mlp"))
    out[mode] = Linear(256, 64, rngs=nnx.Rngs(params=0), hooks=hooks)(x)
  np.testing.assert_allclose(out["full"], out["half"], rtol=1e-4, atol=1e-5)


def test_only_the_named_block_linears_are_hooked():
  cfg, _ = C.load(["--config=configs/tiny.py", "--config.quant.method=lsq",
                   "--config.quant.weight_bits=2", "--config.quant.act_bits=4",
                   "--config.quant.hadamard=none", "--config.quant.layers=mlp"])
  m = models.build(cfg, 257)
  steps = [k for k in jax.tree_util.tree_leaves_with_path(m.initial_params)
           if "step" in jax.tree_util.keystr(k[0])]
  paths = [jax.tree_util.keystr(p) for p, _ in steps]
  assert paths and all("ffn" in p for p in paths), paths
  assert len(paths) == 2 * 3 * cfg.model.n_layers  # weight + input step, gate/up/down


def test_quant_config_errors_name_the_key():
  with pytest.raises(C.ConfigError, match="quant.layers"):
    C.load(["--config=configs/tiny.py", "--config.quant.method=quest", "--config.quant.layers=lm_head"])
  with pytest.raises(C.ConfigError, match="quant.weight_bits"):
    C.load(["--config=configs/tiny.py", "--config.quant.method=lsq", "--config.quant.weight_bits=1"])
  with pytest.raises(C.ConfigError, match="quant.hadamard"):
    C.load(["--config=configs/tiny.py", "--config.quant.method=statsq", "--config.quant.hadamard=half"])


def test_oscillation_tracking_counts_code_flips_only():
  """A weight pushed back and forth across a StatsQ boundary accumulates flips in its EMA;
  weights whose codes never change stay at 0 (docs/qat.md)."""
  from effjax.models.index import set_path
  from effjax.train.quant_extension import OSC_MOMENTUM, QuantExtension
  from effjax.train.state import TrainState
  cfg, _ = C.load(["--config=configs/tiny.py", "--config.quant.method=statsq",
                   "--config.quant.weight_bits=2", "--config.quant.act_bits=8",
                   "--config.quant.layers=mlp"])
  m = models.build(cfg, 257)
  ext = QuantExtension(cfg, m)
  (track,) = ext.hooks()
  params = m.initial_params
  w = params["blocks"]["layers"][0]["ffn"]["up"]["kernel"]
  s = 2 * float(jnp.mean(jnp.abs(w[:, 0])))
  state = TrainState(step=jnp.int32(0), params=params, opt_state=(), buffers=m.initial_buffers,
                     rng=jax.random.PRNGKey(0))
  for t in range(10):  # the 2-bit grid has a boundary at 0: w[0, 0] = +-1e-3 s alternates codes
    kernel = w.at[0, 0].set((-1) ** t * 1e-3 * s)
    params = set_path(params, ("blocks", "layers", 0, "ffn", "up", "kernel"), kernel)
    state = track(state.replace(params=params), state, {})
  ema = state.buffers["blocks"]["layers"][0]["ffn"]["up"]["weight_quant"]["osc_ema"]
  flips = 8  # calls 3..10: the first sets the code, the second sets the direction
  assert float(ema[0, 0]) == pytest.approx(1 - (1 - OSC_MOMENTUM) ** flips, rel=1e-5)
  assert float(jnp.sum(ema)) == pytest.approx(float(ema[0, 0]), rel=1e-6)
  frac = ext.buffer_metrics(state.buffers)["quant/osc/mlp"]
  assert frac == pytest.approx(1 / sum(b["weight_quant"]["osc_ema"].size for blk in
                                       state.buffers["blocks"]["layers"].values()
                                       for b in blk["ffn"].values()))


def test_cga_freezes_clipped_weights_and_keeps_interior_boundaries_trainable():
  """OFQ's criterion: only interior rounding boundaries u = i + 1/2 (-n <= i <= n-2) make a
  weight low-confidence; clipped weights (|W| >= s = 2 mean|W|) sit at the clip ends, which
  are no boundary, so they are frozen (the old criterion kept every clipped weight training)."""
  from effjax.train.quant_extension import cga_confident
  bits, br = 2, 0.01  # n = 2: boundaries at W/s = -0.5, 0, 0.5 (u = -1.5, -0.5, 0.5)
  # One output column; s = 2 mean|W| = 1.0 exactly for these values (mean |W| = 0.5).
  w = jnp.array([-1.2, 1.1, 0.0, 0.5, -0.5, 0.25, 0.3, -0.15], jnp.float32)[:, None]
  assert float(2 * jnp.mean(jnp.abs(w))) == pytest.approx(1.0, rel=1e-6)
  conf = np.asarray(cga_confident(w, bits, br))[:, 0]
  #                    clip- clip+  0    .5   -.5  .25  .3   -.15
  np.testing.assert_array_equal(conf, [1, 1, 0, 0, 0, 1, 1, 1])
  # Gaussian kernels at BR 0.005: about 1% low-confidence (OFQ: 0.8%), never ~12%.
  g = jax.random.normal(jax.random.PRNGKey(0), (256, 384))
  for b in (2, 3, 4):
    trainable = 1 - float(jnp.mean(cga_confident(g, b, 0.005)))
    assert 0.002 < trainable < 0.03, (b, trainable)
    clipped = jnp.abs(g) >= 2 * jnp.mean(jnp.abs(g), axis=0, keepdims=True)
    assert float(jnp.mean(cga_confident(g, b, 0.005)[clipped])) == 1.0


def _cga_run(steps=6):
  from tests.conftest import tiny_step_setup
  cfg, _ = C.load(["--config=configs/tiny.py", "--config.quant.method=statsq",
                   "--config.quant.weight_bits=2", "--config.quant.act_bits=8",
                   "--config.quant.cga_start=0.1", "--config.quant.cga_br=0.1",
                   "--config.optim.weight_decay=0.1", "--config.train.steps=20"])
  m, exts, step_fn, batch, state = tiny_step_setup(cfg)
  import optax
  kernels, masks, first_moments = [m.initial_params["blocks"]["layers"][0]["ffn"]["up"]["kernel"]], [], []
  for _ in range(steps):  # CGA starts with the third step (0.1 x 20 = step index 2)
    state, _ = step_fn(state, batch)
    kernels.append(state.params["blocks"]["layers"][0]["ffn"]["up"]["kernel"])
    # The mask stored by the step is the one that step used.
    masks.append(np.asarray(state.buffers["blocks"]["layers"][0]["ffn"]["up"]["weight_quant"]["cga_frozen"]) > 0)
    adam = [x for x in jax.tree.leaves(state.opt_state,
                                       is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
            if isinstance(x, optax.ScaleByAdamState)]
    first_moments.append(adam[0].mu["blocks"]["layers"][0]["ffn"]["up"]["kernel"])
  return cfg, exts, state, [np.asarray(k) for k in kernels], masks, first_moments


def test_cga_frozen_weights_are_bit_exact_across_adamw_steps():
  """In the CGA phase, the weights frozen for a step keep their values bit-exactly through
  AdamW (momentum and weight decay would move them) and get zero gradients; the
  low-confidence ones keep training."""
  cfg, _, _, kernels, masks, first_moments = _cga_run()
  # kernels[k + 1] is the state after step k; masks[k] the mask step k used.
  assert not masks[0].any() and not masks[1].any()  # before the phase nothing is frozen
  for k in range(2, len(masks)):
    frozen = masks[k]
    assert 0.5 < frozen.mean() < 1.0  # most weights frozen, some still training
    np.testing.assert_array_equal(kernels[k + 1][frozen], kernels[k][frozen])
    assert np.abs(kernels[k + 1] - kernels[k])[~frozen].max() > 0
    # Their gradients are zeroed too: Adam's first moment only decays, mu <- b1 mu (exact).
    np.testing.assert_array_equal(np.asarray(first_moments[k])[frozen],
                                  np.asarray(cfg.optim.b1 * first_moments[k - 1])[frozen])
  # Before the phase the same (later frozen) weights still moved.
  assert not np.array_equal(kernels[2][masks[2]], kernels[1][masks[2]])


def test_cga_mask_is_recomputed_every_step_and_the_trainable_set_only_shrinks():
  """OFQ's annealing: the mask follows the current weights at every step of the phase (a
  weight that leaves the boundary band freezes where it is), so the trainable set shrinks
  monotonically, and the eval metric reports the trainable fraction."""
  _, exts, state, _, masks, _ = _cga_run(steps=8)
  phase = masks[2:]
  for before, after in zip(phase, phase[1:]):
    assert not (before & ~after).any()  # once frozen, stays frozen
  assert any((after & ~before).any() for before, after in zip(phase, phase[1:])), \
      "the mask never changed after the phase start: it is not recomputed"
  quant = next(e for e in exts if e.name == "quant")
  trainable = quant.buffer_metrics(state.buffers)["quant/cga_trainable"]
  assert 0 < trainable < 0.5


@pytest.mark.parametrize("method, extra", [
    ("quest", ["--config.quant.weight_bits=3", "--config.quant.act_bits=4"]),
    ("quest", ["--config.quant.weight_bits=2", "--config.quant.hadamard=half"]),
    ("statsq", ["--config.quant.weight_bits=2", "--config.quant.act_bits=8"]),
    ("lsq", ["--config.quant.weight_bits=3", "--config.quant.act_bits=8",
             "--config.quant.hadamard=none"]),
    ("statsq", ["--config.quant.weight_bits=2", "--config.quant.act_bits=8",
                "--config.model.position=learned", "--config.quant.qkr=true"]),
])
def test_export_round_trip_gives_the_qat_model(tmp_path, method, extra):
  """Integer codes + scales written and loaded back dequantized, run with
  quant.weights_on_grid=true, give the QAT model's loss (codes fit in int8)."""
  from effjax.quant import export
  args = ["--config=configs/tiny.py", "--config.model.d_model=64", f"--config.quant.method={method}",
          *extra]
  cfg, _ = C.load(args)
  m = models.build(cfg, 257)
  params = jax.tree.map(lambda x: x * 1.3 + 0.01, m.initial_params)  # not the init values
  path = str(tmp_path / "q.npz")
  meta = export.export(cfg, params, path, m.index)
  assert meta["kernels"] and all(k.endswith("kernel") for k in meta["kernels"])
  loaded, _ = export.load(path)
  cfg_grid, _ = C.load(args + ["--config.quant.weights_on_grid=true"])
  m_grid = models.build(cfg_grid, 257)
  ids = jax.random.randint(jax.random.PRNGKey(0), (2, 32), 0, 257)

  def loss(model, p):
    logits = model.apply(p, model.initial_buffers, ids[:, :-1])[0]
    return float(jnp.mean(jax.nn.logsumexp(logits, -1)
                          - jnp.take_along_axis(logits, ids[:, 1:, None], -1)[..., 0]))

  assert loss(m_grid, loaded) == pytest.approx(loss(m, params), rel=1e-5, abs=1e-6)
  # Without weights_on_grid the loaded weights would be quantized again (not idempotent for
  # QuEST/StatsQ: the scales come from the quantized weights' statistics).


# ----------------------------------------------------------------------------- QKR


def _attention_pair(n_heads, n_kv, qk_hooks):
  """A QKR attention and a plain one with the same weights (absolute positions, no RoPE)."""
  from flax import nnx
  from effjax.models.attention import Attention
  from effjax.models.layers import plain_linear
  from effjax.models.qkr import QKRAttention
  kw = dict(config=C.AttentionConfig(), rope_theta=1e4, init_std=0.3, n_layers=2, norm_eps=1e-6,
            use_rope=False)
  plain = Attention(32, n_heads, n_kv, 8, linear=plain_linear(nnx.Rngs(params=1)), **kw)
  rngs = nnx.Rngs(params=1)
  qkr = QKRAttention(32, n_heads, n_kv, 8, linear=plain_linear(rngs),
                     plain_linear=plain_linear(rngs), qk_hooks=qk_hooks, **kw)
  return plain, qkr


@pytest.mark.parametrize("n_heads, n_kv", [(4, 4), (4, 2)])
def test_qkr_without_quantization_equals_q_dot_k(n_heads, n_kv):
  """QKR computes scores as (x W_q W_k^T) . x: with identity quantizers the attention output
  equals the usual softmax(q k^T) v (GQA included), and the product is W_q^h W_k^hT."""
  plain, qkr = _attention_pair(n_heads, n_kv, {})
  x = jax.random.normal(jax.random.PRNGKey(2), (2, 12, 32))
  pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
  np.testing.assert_array_equal(np.asarray(plain.q.kernel[...]), np.asarray(qkr.q.kernel[...]))
  np.testing.assert_allclose(np.asarray(qkr(x, positions_BxL=pos)),
                             np.asarray(plain(x, positions_BxL=pos)), rtol=2e-5, atol=2e-6)
  w = np.asarray(qkr.qk_product()).reshape(32, n_heads, 32)
  wq = np.asarray(plain.q.kernel[...]).reshape(32, n_heads, 8)
  wk = np.asarray(plain.k.kernel[...]).reshape(32, n_kv, 8)
  h = n_heads - 1
  np.testing.assert_allclose(w[:, h], wq[:, h] @ wk[:, h // (n_heads // n_kv)].T, rtol=1e-5,
                             atol=1e-6)


def test_qkr_quantizes_the_product_not_the_factors():
  """With StatsQ 2-bit QKR the per-head product sits on a 4-level grid per output column,
  while W_q and W_k stay full precision; QKR with RoPE or QK-norm is refused by name."""
  from effjax.quant.hooks import make_hooks
  q_cfg = C.QuantConfig(method="statsq", weight_bits=2, act_bits=0, qkr=True)
  _, qkr = _attention_pair(4, 2, make_hooks(q_cfg, 32, 4 * 32, std=0.3 * 0.3 * 8 ** 0.5,
                                            axes=("embed", "heads"), derived=True))
  w = np.asarray(qkr.qk_product())
  assert max(len(np.unique(w[:, j])) for j in range(w.shape[1])) == 4
  assert len(np.unique(np.asarray(qkr.q.kernel[...]))) > 100
  with pytest.raises(C.ConfigError, match="model.position=rope"):
    C.load(["--config=configs/tiny.py", "--config.quant.method=statsq", "--config.quant.qkr=true"])
  with pytest.raises(C.ConfigError, match="qk_norm"):
    C.load(["--config=configs/tiny.py", "--config.quant.method=statsq", "--config.quant.qkr=true",
            "--config.model.position=learned", "--config.model.attention.qk_norm=true"])


def test_model_with_learned_positions_and_qkr_trains(tmp_path):
  from effjax.train import trainer
  from effjax.train.metrics import read_metrics
  cfg, _ = C.load(["--config=configs/tiny.py", "--config.model.position=learned",
                   "--config.quant.method=statsq", "--config.quant.weight_bits=4",
                   "--config.quant.act_bits=8", "--config.quant.qkr=true",
                   "--config.train.steps=30", "--config.train.eval_every=30"])
  assert trainer.train(cfg, str(tmp_path), quiet=True).exit_code == 0
  rows = read_metrics(str(tmp_path / "metrics.jsonl"))
  losses = [r["train/loss"] for r in rows if "train/loss" in r]
  assert losses[-1] < losses[0] - 0.5, losses
  last_eval = [r for r in rows if "quant/weight_rel_mse/qk" in r][-1]
  assert 0 < last_eval["quant/weight_rel_mse/qk"] < 0.1  # 4-bit error, relative
  m = models.build(C.validate(cfg), 257)
  assert m.initial_params["positions"]["table"].shape == (cfg.train.seq_len, cfg.model.d_model)
  assert m.specs["positions"]["table"].role == "embedding"


def test_export_command_on_a_workdir(tmp_path, capsys):
  """`python -m effjax.quant.export --workdir=W` restores the latest checkpoint, writes the
  export and checks the loaded model's eval loss against the checkpoint's (exit 0)."""
  from effjax.quant import export
  from effjax.train import trainer
  cfg, _ = C.load(["--config=configs/tiny.py", "--config.quant.method=statsq",
                   "--config.quant.weight_bits=2", "--config.quant.act_bits=8",
                   "--config.train.steps=6", "--config.train.sample_tokens=0"])
  assert trainer.train(cfg, str(tmp_path), quiet=True).exit_code == 0
  assert export.main([f"--workdir={tmp_path}", "--eval_batches=2"]) == 0
  table = capsys.readouterr().out
  rows = {l.split("|")[1].strip(): float(l.split("|")[2]) for l in table.splitlines()
          if l.startswith("| ") and "loss" not in l}
  assert rows["loaded export (weights_on_grid)"] == pytest.approx(rows["QAT checkpoint"], rel=1e-4)
  assert (tmp_path / "quantized.npz").exists()
  assert export.main([f"--workdir={tmp_path / 'nope'}"]) == 2

"""Model properties: causality, document masking, GQA, roles and axes (issue 2, Model)."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax import config as C
from effjax import models
from effjax.models.layers import ROLES
from effjax.models.attention import xla_softmax_attention


def _tiny(**model_overrides):
  cfg, _ = C.load(["--config=configs/tiny.py"] + [f"--config.model.{k}={v}"
                                                  for k, v in model_overrides.items()])
  return cfg


def _apply(model, ids, **kw):
  return model.apply(model.initial_params, model.initial_buffers, ids, **kw)[0]


def test_changing_a_future_token_leaves_earlier_logits_unchanged():
  model = models.build(_tiny(), 257)
  ids = jax.random.randint(jax.random.PRNGKey(0), (2, 32), 0, 257)
  base = _apply(model, ids)
  for t in (5, 20, 31):
    changed = ids.at[:, t].set((ids[:, t] + 7) % 257)
    out = _apply(model, changed)
    np.testing.assert_allclose(out[:, :t], base[:, :t], atol=1e-6, rtol=0)
    assert not np.allclose(out[:, t:], base[:, t:])  # the change is visible from t on


def test_document_mask_isolates_packed_documents():
  model = models.build(_tiny(), 257)
  ids = jax.random.randint(jax.random.PRNGKey(1), (1, 32), 0, 257)
  seg = jnp.asarray([[1] * 12 + [2] * 20])
  pos = jnp.asarray([list(range(12)) + list(range(20))])
  packed = _apply(model, ids, positions_BxL=pos, segment_ids_BxL=seg)
  # The second document alone, run as its own sequence, gives the same logits.
  alone = _apply(model, ids[:, 12:])
  np.testing.assert_allclose(packed[:, 12:], alone, atol=1e-5, rtol=1e-5)
  # Changing document 1 does not affect document 2.
  other = _apply(model, ids.at[:, 3].set((ids[:, 3] + 1) % 257), positions_BxL=pos,
                 segment_ids_BxL=seg)
  np.testing.assert_allclose(other[:, 12:], packed[:, 12:], atol=1e-6, rtol=0)


def test_gqa_equals_mha_with_repeated_kv_heads():
  key = jax.random.split(jax.random.PRNGKey(2), 3)
  q = jax.random.normal(key[0], (2, 10, 4, 8))
  k = jax.random.normal(key[1], (2, 10, 2, 8))
  v = jax.random.normal(key[2], (2, 10, 2, 8))
  gqa = xla_softmax_attention(q, k, v, scale=8 ** -0.5)
  mha = xla_softmax_attention(q, jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2),
                              scale=8 ** -0.5)
  np.testing.assert_allclose(gqa, mha, atol=1e-6)
  # and it matches a direct per-head computation
  s = jnp.einsum("bqhd,bkhd->bhqk", q, jnp.repeat(k, 2, axis=2)) * 8 ** -0.5
  s = jnp.where(jnp.tril(jnp.ones((10, 10), bool)), s, -jnp.inf)
  ref = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), jnp.repeat(v, 2, axis=2))
  np.testing.assert_allclose(gqa, ref, atol=1e-5)


@pytest.mark.parametrize("tie", [False, True])
def test_every_param_has_role_and_axes_and_count_matches_formula(tie):
  cfg = _tiny(tie_embeddings=str(tie).lower(), **{"attention.qk_norm": "true"})
  model = models.build(cfg, 257)
  specs = jax.tree.leaves(model.specs, is_leaf=lambda s: isinstance(s, models.ParamSpec))
  shapes = jax.tree.leaves(model.initial_params)
  assert len(specs) == len(shapes)
  for spec, x in zip(specs, shapes):
    assert spec.role in ROLES and len(spec.axes) == x.ndim
  n = sum(x.size for x in shapes)
  qk_norm_params = 2 * cfg.model.n_layers * model.dims.head_dim
  assert n == models.count_params(model.dims, tie)["total"] + qk_norm_params
  roles = {s.role for s in specs}
  assert roles == ({"embedding", "hidden", "vector"} | (set() if tie else {"readout"}))


def test_bf16_compute_dtype_runs_and_is_close():
  model32 = models.build(_tiny(compute_dtype="float32"), 257)
  model16 = models.build(_tiny(compute_dtype="bfloat16"), 257)
  ids = jax.random.randint(jax.random.PRNGKey(3), (2, 16), 0, 257)
  a, b = _apply(model32, ids), _apply(model16, ids)
  assert b.dtype == jnp.float32  # logits are returned in fp32
  assert float(jnp.max(jnp.abs(a - b))) < 0.1  # bf16 has ~3 significant digits


@pytest.mark.parametrize("score", ["lssa", "lssar"])
def test_model_trains_with_softplus_scores(tmp_path, score):
  """model.attention.score=lssa|lssar trains: the loss falls from ln(257) at init."""
  from effjax.train import trainer
  from effjax.train.metrics import read_metrics
  cfg, _ = C.load(["--config=configs/tiny.py", f"--config.model.attention.score={score}",
                   "--config.model.attention.lssar_p=3", "--config.train.steps=40"])
  assert trainer.train(cfg, str(tmp_path), quiet=True).exit_code == 0
  losses = [r["train/loss"] for r in read_metrics(str(tmp_path / "metrics.jsonl"))
            if "train/loss" in r]
  assert losses[0] > 4.5 and losses[-1] < 3.8, losses  # ln(257) = 5.55 at init


def test_eval_score_trains_lssa_and_evaluates_with_lssar_reweighting(tmp_path):
  """model.attention.eval_score=lssar on an LSSA model (the re-weighting at inference only):
  training is untouched (same train losses), evaluation runs the LSSAR model on the same
  parameters (eval loss differs from plain LSSA evaluation)."""
  from effjax.train import trainer
  from effjax.train.metrics import read_metrics
  common = ["--config=configs/tiny.py", "--config.model.attention.score=lssa",
            "--config.model.attention.lssar_p=3", "--config.train.steps=10",
            "--config.train.eval_every=10", "--config.train.log_every=1"]
  rows = {}
  for name, extra in (("plain", []), ("reweighted", ["--config.model.attention.eval_score=lssar"])):
    cfg, _ = C.load(common + extra)
    assert trainer.train(cfg, str(tmp_path / name), quiet=True).exit_code == 0
    rows[name] = read_metrics(str(tmp_path / name / "metrics.jsonl"))
  pick = lambda key, name: [r[key] for r in rows[name] if key in r]
  assert pick("train/loss", "plain") == pick("train/loss", "reweighted")
  assert pick("eval/loss", "plain")[-1] != pick("eval/loss", "reweighted")[-1]
  # The eval model is the LSSAR model on the LSSA model's parameters.
  cfg, _ = C.load(common + ["--config.model.attention.eval_score=lssar"])
  lssa, lssar = models.build(cfg, 257), models.build(models.for_evaluation(cfg), 257)
  assert models.for_evaluation(cfg).model.attention.score == "lssar"
  ids = jax.random.randint(jax.random.PRNGKey(3), (2, 16), 0, 257)
  want = _apply(lssar, ids)
  got = lssar.apply(lssa.initial_params, lssa.initial_buffers, ids)[0]
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert float(jnp.max(jnp.abs(_apply(lssa, ids) - want))) > 1e-4


def test_remat_gives_the_same_loss_and_gradients_and_recomputes():
  """model.remat=true recomputes each block's activations in the backward pass: the loss and
  the gradients equal the plain model's, and the backward jaxpr contains the remat."""
  ids = jax.random.randint(jax.random.PRNGKey(3), (2, 17), 0, 257)
  seg = jnp.ones((2, 16), jnp.int32)

  def grads(remat):
    m = models.build(_tiny(remat=remat), 257)

    def loss(params):
      logits = m.apply(params, m.initial_buffers, ids[:, :-1], segment_ids_BxL=seg)[0]
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], -1))

    jaxpr = str(jax.make_jaxpr(jax.grad(loss))(m.initial_params))
    return jax.value_and_grad(loss)(m.initial_params), jaxpr

  (l0, g0), plain = grads(False)
  (l1, g1), remat = grads(True)
  assert "remat" in remat and "remat" not in plain
  assert float(l1) == pytest.approx(float(l0), rel=1e-6)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_learned_positions_enter_the_output_and_are_bounded():
  """model.position=learned adds a [max_positions, d] table to the embedding (no RoPE):
  changing one row changes exactly the logits from that position on; a longer input than
  the table is refused, as are a table smaller than train.seq_len and a table size under
  RoPE."""
  cfg = _tiny(position="learned")
  m = models.build(cfg, 257)
  ids = jax.random.randint(jax.random.PRNGKey(4), (1, 16), 0, 257)
  base = _apply(m, ids)
  params = jax.tree.map(lambda x: x, m.initial_params)
  params["positions"]["table"] = params["positions"]["table"].at[5].add(1.0)
  moved = m.apply(params, m.initial_buffers, ids)[0]
  np.testing.assert_array_equal(np.asarray(moved[:, :5]), np.asarray(base[:, :5]))
  assert not np.allclose(np.asarray(moved[:, 5]), np.asarray(base[:, 5]))
  too_long = jnp.zeros((1, cfg.model.max_positions + 1), jnp.int32)
  with pytest.raises(ValueError, match="model.max_positions"):
    _apply(m, too_long)
  with pytest.raises(C.ConfigError, match="smaller than train.seq_len"):
    _tiny(position="learned", max_positions=8)
  with pytest.raises(C.ConfigError, match="needs model.position=learned"):
    _tiny(max_positions=64)

"""MASA (dictionary-shared attention) and its parameter-sharing baselines (issue 14):
weights built from atoms, folded == unfolded, init std, parameter counts and FLOPs, QAT on the
built weights, roles and sharding, composition with GQA / MoE / LSSA / scan."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax import config as C
from effjax import models
from effjax.models import masa
from effjax.models.index import flatten
from effjax.train import flops as flops_lib

SLOT_KIND = {"q": "qkv", "k": "qkv", "v": "qkv", "o": "attn_out"}


def _cfg(**overrides):
  base = {"model.vocab_size": 128, "model.d_model": 32, "model.n_layers": 6, "model.n_heads": 4,
          "model.n_kv_heads": 2, "train.seq_len": 16, "train.batch_size": 4}
  return C.validate(C.apply_overrides(C.Config(), {**base, **overrides}))


def _ids(b=2, l=16, seed=0):
  return jax.random.randint(jax.random.PRNGKey(seed), (b, l), 0, 128)


def _logits(model, params, ids, buffers=None):
  apply = jax.jit(lambda p, b, x: model.apply(p, b, x)[0])
  return apply(params, model.initial_buffers if buffers is None else buffers, ids)


def _built(model, params):
  """{slot: W [L, in, out]} the model's stack builds this step."""
  return {k: np.asarray(v) for k, v in model.module(params).blocks.shared().items()}


def _as_dense(shared_cfg, model, params):
  """The dense model of the same dims whose q/k/v/o kernels are the shared model's built
  weights, and its params (everything else copied)."""
  dense_cfg = C.apply_overrides(shared_cfg, {"model.attention.sharing": "none"})
  dense = models.build(dense_cfg, None)
  built = _built(model, params)
  p = jax.tree.map(lambda x: x, dense.initial_params)
  for key in ("embed", "final_norm", "head"):
    p[key] = params[key]
  for i, layer in params["blocks"]["layers"].items():
    target = p["blocks"]["layers"][i]
    for name in ("attn_norm", "ffn_norm", "ffn"):
      target[name] = layer[name]
    for slot in "qkvo":
      if slot in built:
        target["attn"][slot]["kernel"] = jnp.asarray(built[slot][i])
      else:
        target["attn"][slot] = layer["attn"][slot]
  return dense_cfg, dense, p


# ------------------------------------------------------------------------------- config


@pytest.mark.parametrize("overrides, key", [
    ({"model.masa.projections": "qkx"}, "model.masa.projections"),
    ({"model.masa.projections": "qq"}, "model.masa.projections"),
    ({"model.masa.atoms": -1}, "model.masa.atoms"),
    ({"model.masa.coef_mlp_width": 0}, "model.masa.coef_mlp_width"),
    ({"model.attention.sharing": "repeat_all_over", "model.masa.groups": 7}, "model.masa.groups"),
    ({"model.attention.sharing": "lowrank", "model.masa.rank": 33}, "model.masa.rank"),
    ({"model.attention.sharing": "masa", "model.zero_init_query": True}, "zero_init_query"),
    ({"model.attention.sharing": "masa", "quant.method": "quest", "quant.qkr": True}, "quant.qkr"),
])
def test_bad_sharing_configs_name_the_key(overrides, key):
  with pytest.raises(C.ConfigError, match=key.replace(".", r"\.")):
    _cfg(**overrides)
  with pytest.raises(C.ConfigError, match="must be one of"):
    _cfg(**{"model.attention.sharing": "tied"})


def test_default_atoms_and_groups_are_a_third_of_the_layers():
  assert [C.MasaConfig().resolved_atoms(n) for n in (1, 2, 6, 12, 24)] == [1, 1, 2, 4, 8]
  assert C.MasaConfig(atoms=3).resolved_atoms(12) == 3


# ------------------------------------------------------------------------------- MASA


def test_masa_builds_every_layer_weight_from_the_shared_atoms():
  """W_l^P = sum_s c_{l,s} D_s^P and the MASA model computes exactly what a dense model with
  those kernels computes."""
  cfg = _cfg(**{"model.attention.sharing": "masa", "model.masa.projections": "qkvo"})
  model = models.build(cfg, None)
  params = model.initial_params
  # perturb the coefficient MLP so C is not its init (W3 = 0 there)
  shared = params["blocks"]["shared"]
  shared["coef_mlp"]["w3"] = 0.1 * jax.random.normal(jax.random.PRNGKey(3),
                                                     shared["coef_mlp"]["w3"].shape)
  c = np.asarray(model.module(params).blocks.shared.coefficient_values())
  assert c.shape == (6, 4, 2)  # L, projections, S = 6 / 3
  built = _built(model, params)
  for p, slot in enumerate("qkvo"):
    atoms = np.asarray(shared["atoms"][slot])
    for layer in range(6):
      want = sum(c[layer, p, s] * atoms[s] for s in range(2))
      np.testing.assert_allclose(built[slot][layer], want, rtol=1e-5, atol=1e-7)
  assert not set("qkvo") & set(params["blocks"]["layers"][0].get("attn", {}))  # no per-layer weights
  _, dense, dense_params = _as_dense(cfg, model, params)
  ids = _ids()
  np.testing.assert_allclose(_logits(model, params, ids), _logits(dense, dense_params, ids),
                             rtol=1e-5, atol=1e-5)


def test_masa_qkv_keeps_o_dense_per_layer():
  cfg = _cfg(**{"model.attention.sharing": "masa", "model.masa.projections": "qkv"})
  model = models.build(cfg, None)
  assert set(model.initial_params["blocks"]["shared"]["atoms"]) == {"q", "k", "v"}
  assert "kernel" in model.initial_params["blocks"]["layers"][0]["attn"]["o"]
  assert "q" not in model.initial_params["blocks"]["layers"][0]["attn"]  # no per-layer q


def test_folded_model_gives_the_unfolded_outputs_without_the_mlp():
  cfg = _cfg(**{"model.attention.sharing": "masa"})
  model = models.build(cfg, None)
  params = model.initial_params
  mlp = params["blocks"]["shared"]["coef_mlp"]
  for name in ("w1", "w3"):
    mlp[name] = 0.3 * jax.random.normal(jax.random.PRNGKey(4), mlp[name].shape)
  folded_cfg, folded_params = masa.fold(cfg, model, params)
  assert folded_cfg.model.masa.folded
  assert "coef_mlp" not in folded_params["blocks"]["shared"]
  folded = models.build(folded_cfg, None)
  assert jax.tree.structure(folded.initial_params) == jax.tree.structure(folded_params)
  ids = _ids()
  np.testing.assert_allclose(_logits(folded, folded_params, ids), _logits(model, params, ids),
                             rtol=1e-6, atol=1e-6)
  n = lambda p: sum(x.size for x in jax.tree.leaves(p))
  assert n(folded_params) < n(params)
  assert n(folded_params) == models.count_params(folded.dims, False, folded_cfg.model)["total"]
  assert masa.fold(folded_cfg, folded, folded_params)[1] is folded_params  # folding twice: no-op


@pytest.mark.parametrize("sharing", ["masa", "repeat_all_over", "sequential", "lowrank"])
def test_every_layer_weight_has_the_dense_init_std(sharing):
  """Each built W_l (q: init_std, o: init_std / sqrt(2L)) has the dense init std, and layers
  differ. MASA: atoms N(0, std^2), c_l a unit vector at init, so W_l ~ N(0, std^2)."""
  cfg = _cfg(**{"model.d_model": 128, "model.n_heads": 4, "model.n_kv_heads": 4,
                "model.n_layers": 6, "model.attention.sharing": sharing, "model.masa.atoms": 4})
  model = models.build(cfg, None)
  std = {"q": 0.02, "o": 0.02 / math.sqrt(12)}
  if sharing == "lowrank":
    layers = model.module(model.initial_params).blocks.layers
    built = {s: np.stack([np.asarray(getattr(b.attn, s).effective_weight()) for b in layers])
             for s in std}
  else:
    built = _built(model, model.initial_params)
  for slot, want in std.items():
    w = built[slot]
    assert w.shape == (6, 128, 128)
    for layer in range(6):  # 16k entries: the sample std is within ~1% of the true std
      assert abs(w[layer].std() / want - 1) < 0.05, (slot, layer, w[layer].std(), want)
    if sharing != "sequential":  # sequential: layers 0 and 1 share a matrix by design
      assert not np.allclose(w[0], w[1])


def test_matrix_set_baselines_use_their_layer_pattern():
  np.testing.assert_array_equal(masa.layer_groups("sequential", 6, 2), [0, 0, 0, 1, 1, 1])
  np.testing.assert_array_equal(masa.layer_groups("repeat_all_over", 6, 2), [0, 1, 0, 1, 0, 1])
  for sharing, pattern in (("sequential", [0, 0, 0, 1, 1, 1]),
                           ("repeat_all_over", [0, 1, 0, 1, 0, 1])):
    cfg = _cfg(**{"model.attention.sharing": sharing, "model.masa.groups": 2})
    model = models.build(cfg, None)
    mats = model.initial_params["blocks"]["shared"]["matrices"]
    built = _built(model, model.initial_params)
    for slot in "qkvo":
      assert mats[slot].shape[0] == 2
      for layer, g in enumerate(pattern):
        np.testing.assert_array_equal(built[slot][layer], np.asarray(mats[slot][g]))
    _, dense, dense_params = _as_dense(cfg, model, model.initial_params)
    ids = _ids()
    np.testing.assert_allclose(_logits(model, model.initial_params, ids),
                               _logits(dense, dense_params, ids), rtol=1e-5, atol=1e-5)


def test_lowrank_projection_has_the_configured_rank():
  cfg = _cfg(**{"model.attention.sharing": "lowrank", "model.masa.projections": "qkvo"})
  model = models.build(cfg, None)
  attn = model.module(model.initial_params).blocks.layers[0].attn
  for slot in "qkvo":
    w = np.asarray(getattr(attn, slot).effective_weight())
    assert np.linalg.matrix_rank(w) == 32 // 3


# ------------------------------------------------------------------------------- accounting


@pytest.mark.parametrize("overrides", [
    {"model.attention.sharing": "masa"},
    {"model.attention.sharing": "masa", "model.masa.projections": "qkv", "model.masa.atoms": 4},
    {"model.attention.sharing": "masa", "model.masa.folded": True},
    {"model.attention.sharing": "lowrank", "model.masa.rank": 5},
    {"model.attention.sharing": "sequential"},
    {"model.attention.sharing": "repeat_all_over", "model.masa.projections": "ko"},
    {"model.attention.sharing": "masa", "model.moe.num_experts": 4, "model.scan_layers": True},
])
def test_parameter_counts_match_the_built_model(overrides):
  cfg = _cfg(**overrides)
  model = models.build(cfg, None)
  n = sum(x.size for x in jax.tree.leaves(model.initial_params))
  counts = models.count_params(model.dims, False, cfg.model)
  assert n == counts["total"]
  attn = masa.attention_param_counts(cfg.model, model.dims)
  flat = flatten(model.initial_params)
  in_attn = sum(v.size for k, v in flat.items() if "attn" in k or "shared" in k)
  assert attn["total"] == in_attn == counts["attention"]


def test_attention_parameter_counts_by_hand():
  """d=32, h=4, kv=2 (head 8): q, o 32x32, k, v 32x16; L=6, S=2, MLP width 64, P=4."""
  cfg = _cfg(**{"model.attention.sharing": "masa"})
  counts = masa.attention_param_counts(cfg.model, models.resolve_dims(cfg.model))
  assert counts["q"] == counts["o"] == 2 * 32 * 32 and counts["k"] == counts["v"] == 2 * 32 * 16
  assert counts["coef"] == 6 * 8 + 8 * 64 + 64 + 64 * 64 + 64 + 64 * 8
  assert counts["dense"] == 6 * (2 * 32 * 32 + 2 * 32 * 16)
  cfg = _cfg(**{"model.attention.sharing": "lowrank"})
  counts = masa.attention_param_counts(cfg.model, models.resolve_dims(cfg.model))
  assert counts["q"] == 6 * 10 * (32 + 32) and counts["k"] == 6 * 10 * (32 + 16)


def test_flops_count_the_atom_einsum_by_hand():
  cfg = _cfg(**{"model.attention.sharing": "masa", "model.masa.projections": "qkvo",
                "model.masa.folded": True})
  dims = models.resolve_dims(cfg.model)
  dense = flops_lib.flops_per_token(dims, 16, tie_embeddings=False)
  got = flops_lib.flops_per_token(dims, 16, tie_embeddings=False,
                                  **masa.flop_terms(cfg.model, dims, cfg.train))
  # einsum 'ls,sio->lio': 2 L S in out per projection, forward; x3 for training; per token of
  # the 4 x 16 step
  einsum = 2 * 6 * 2 * (32 * 32 + 32 * 16 + 32 * 16 + 32 * 32)
  assert got - dense == pytest.approx(3 * einsum / 64)
  # low rank: each projection costs 2 r (in + out) per token instead of 2 in out
  cfg = _cfg(**{"model.attention.sharing": "lowrank", "model.masa.projections": "q"})
  got = flops_lib.flops_per_token(dims, 16, tie_embeddings=False,
                                  **masa.flop_terms(cfg.model, dims, cfg.train))
  assert dense - got == pytest.approx(3 * 2 * 6 * (32 * 32 - 10 * 64))


# ------------------------------------------------------------------------------- roles, QAT


def test_atoms_and_coefficients_have_roles_sharded_like_their_projections():
  cfg = _cfg(**{"model.attention.sharing": "masa", "model.param": "mup",
                "model.base_width": 16, "model.n_kv_heads": 4})
  model = models.build(cfg, None)
  specs = model.specs["blocks"]["shared"]
  assert specs["atoms"]["q"].role == "atom" and specs["atoms"]["q"].axes == (None, "embed", "heads")
  assert specs["atoms"]["o"].axes == (None, "heads", "embed")
  assert specs["atoms"]["q"].fan_in_mult == 2.0  # muP: the atoms are hidden matrices
  assert all(s.role == "coeff" and s.fan_in_mult == 1.0
             for s in jax.tree.leaves(specs["coef_mlp"], is_leaf=lambda x: hasattr(x, "role")))
  from effjax.optim import scaling
  assert scaling.lr_multiplier(specs["atoms"]["q"], cfg) == 0.5
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("fsdp", "tensor"))
  from effjax.parallel import sharding
  spec = sharding.logical_to_spec(specs["atoms"]["q"].axes, (2, 32, 32), mesh)
  assert tuple(spec) == (None, "fsdp", "tensor")


def test_qat_quantizes_the_built_weights_not_the_atoms(tmp_path):
  """With quant.method=quest the MASA model computes what a dense QuEST model with kernels
  W_l computes: the hook quantizes each built W_l."""
  cfg = _cfg(**{"model.attention.sharing": "masa", "quant.method": "quest",
                "quant.weight_bits": 2, "quant.act_bits": 8})
  model = models.build(cfg, None)
  params = model.initial_params
  dense_cfg, dense, dense_params = _as_dense(cfg, model, params)
  ids = _ids()
  got = _logits(model, params, ids)
  np.testing.assert_allclose(got, _logits(dense, dense_params, ids, dense.initial_buffers),
                             rtol=1e-5, atol=1e-5)
  unquantized = models.build(C.apply_overrides(cfg, {"quant.method": "none"}), None)
  assert not np.allclose(got, _logits(unquantized, params, ids), atol=1e-3)
  from effjax.quant.export import export  # it reads stored kernels: refuses, not silently wrong
  with pytest.raises(ValueError, match="model.attention.sharing"):
    export(cfg, params, str(tmp_path / "q.npz"), model.index)


# ------------------------------------------------------------------------------- composition


@pytest.mark.parametrize("overrides", [
    {"model.attention.score": "lssa", "model.moe.num_experts": 4, "model.n_kv_heads": 1},
    {"model.scan_layers": True, "model.remat": True},
])
def test_masa_composes_with_gqa_moe_lssa_and_scan(overrides):
  cfg = _cfg(**{"model.attention.sharing": "masa", **overrides})
  model = models.build(cfg, None)
  params = model.initial_params
  ids = _ids()

  def loss(p):
    logits, _ = model.apply(p, model.initial_buffers, ids)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
        logits, ids[..., None], -1)[..., 0])

  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  assert np.isfinite(value)
  g = grads["blocks"]["shared"]
  for leaf in (g["atoms"]["q"], g["atoms"]["o"], g["coef_mlp"]["w3"], g["coef_mlp"]["embedding"]):
    assert float(jnp.abs(leaf).max()) > 0
  if cfg.model.scan_layers:  # the scanned stack computes what the plain stack computes
    plain = models.build(C.apply_overrides(cfg, {"model.scan_layers": False}), None)
    from effjax.models.stack import unstack_layers
    np.testing.assert_allclose(_logits(model, params, ids),
                               _logits(plain, unstack_layers(params, 6), ids),
                               rtol=1e-5, atol=1e-5)


def test_study_baselines_are_at_an_equal_attention_budget():
  """Study A's equal-budget group (MASA-QKVO S = L/3, low-rank at the matched rank,
  sequential and repeat-all-over with L/3 sets) is within 5% of one attention budget, a
  third of dense; MASA's coefficient MLP is the only extra."""
  from effjax.experiments import masa as study
  base = study.base_config()
  budgets = {v.name: study.attention_budget(C.apply_overrides(base, v.overrides))
             for v in study.variants_a(base)}
  masa_qkvo = budgets["masa_qkvo"]["total"]
  for name in study.EQUAL_BUDGET:
    assert abs(budgets[name]["total"] / masa_qkvo - 1) < 0.05, (name, budgets[name])
  assert budgets["masa_qkvo"]["total"] - budgets["masa_qkvo"]["coef"] == \
      budgets["dense"]["total"] // 3
  assert budgets["dense"]["total"] == budgets["dense"]["dense"]


@pytest.mark.parametrize("score", ["softmax", "lssar"])
def test_query_chunked_attention_equals_the_full_reference(score):
  """model.attention.query_chunk (long evaluation, Study B) computes the same attention."""
  from effjax.models.attention import attend
  q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (2, 40, 4, 8)) for i in range(3))
  full = C.AttentionConfig(score=score, impl="xla")
  chunked = C.AttentionConfig(score=score, impl="xla", query_chunk=16)
  np.testing.assert_allclose(attend(q, k, v, config=chunked), attend(q, k, v, config=full),
                             rtol=1e-5, atol=1e-5)


_RUN = r"""
import json, sys
import jax
from effjax import checks
from effjax.train import trainer
cfg, _ = checks.load(["--config=configs/tiny.py", "--config.train.steps=5",
                      "--config.train.log_every=1", "--config.train.eval_every=5",
                      "--config.model.n_layers=3", "--config.model.attention.sharing=masa"]
                     + sys.argv[2:], num_devices=jax.device_count())
print(json.dumps({"exit": trainer.train(cfg, sys.argv[1], quiet=True).exit_code}))
"""


@pytest.mark.slow
def test_masa_on_8_devices_matches_1(tmp_path):
  """Atoms sharded like their projections (fsdp x tensor): the same losses as one device.
  (slow: two trainer subprocesses, ~1 min on 2 idle cores)"""
  from effjax.train.metrics import read_metrics
  from tests.conftest import run_module
  one = run_module(["-c", _RUN, str(tmp_path / "one")])
  assert one.returncode == 0, one.stderr[-3000:]
  eight = run_module(["-c", _RUN, str(tmp_path / "eight"), "--config.mesh.fsdp=4",
                      "--config.mesh.tensor=2"],
                     env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  assert eight.returncode == 0, eight.stderr[-3000:]
  get = lambda d: [r["train/loss"] for r in read_metrics(str(d) + "/metrics.jsonl")
                   if "train/loss" in r]
  # reduction order differs across shardings: same tolerance as the MoE 8-device test
  np.testing.assert_allclose(get(tmp_path / "eight"), get(tmp_path / "one"), rtol=1e-4)

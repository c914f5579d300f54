"""Mixture-of-Recursions (issue 13, docs/mor.md): sharing schedules, plain recursion,
expert-choice capacities / hierarchical top-k / sorted gather, the causal threshold rule,
token-choice balance, FLOPs, and composition with MoE."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax import config as C
from effjax import models
from effjax.models import mor as mor_lib
from effjax.models.stack import Context

VOCAB = 257


def _cfg(**over):
  base = {"model.d_model": 32, "model.n_layers": 3, "model.n_heads": 4, "model.n_kv_heads": 2,
          "model.mor.recursions": 3, "train.seq_len": 16}
  return C.validate(C.apply_overrides(C.Config(), {**base, **over}))


def _ids(seed=0, b=2, l=16):
  return jax.random.randint(jax.random.PRNGKey(seed), (b, l), 0, 256)


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("over, match", [
    ({"model.mor.sharing": "spiral"}, "model.mor.sharing"),
    ({"model.mor.recursions": 1}, "model.mor.recursions >= 2"),
    ({"model.n_layers": 2}, "model.n_layers >= 3"),
    ({"model.scan_layers": True}, "model.scan_layers=false"),
    ({"model.mor.recursions": -1}, "model.mor.recursions must be >= 0"),
    ({"model.mor.router": "token", "model.mor.rule": "threshold"}, "model.mor.rule"),
])
def test_bad_configs_name_the_key(over, match):
  with pytest.raises(C.ConfigError, match=match):
    _cfg(**over)


def test_off_by_default():
  assert not C.Config().model.mor.enabled
  m = models.build(C.validate(C.apply_overrides(C.Config(), {"model.d_model": 32,
                                                             "model.n_layers": 2})), VOCAB)
  assert "routers" not in m.initial_params["blocks"]


# ----------------------------------------------------------------------------- schedules


def test_sharing_schedules():
  s = mor_lib.recursion_schedule
  assert s("cycle", 2, 3) == ((), ((0, 1),) * 3, ())
  assert s("sequence", 2, 3) == ((), ((0, 0), (0, 1), (1, 1)), ())
  assert s("sequence", 3, 2) == ((), ((0, 0, 1), (1, 2, 2)), ())
  assert s("middle_cycle", 4, 2) == ((0,), ((1, 2), (1, 2)), (3,))
  assert s("middle_sequence", 4, 2) == ((0,), ((1, 1), (2, 2)), (3,))


def _unrolled_config(cfg, depth):
  return dataclasses.replace(cfg, model=dataclasses.replace(
      cfg.model, n_layers=depth, mor=C.MoRConfig()))


@pytest.mark.parametrize("sharing", ["cycle", "sequence", "middle_cycle", "middle_sequence"])
def test_plain_recursion_equals_hand_unrolled_shared_stack(sharing):
  """router=none: the model equals a plain stack whose layer j holds the weights of the
  unique layer the schedule applies at depth j."""
  cfg = _cfg(**{"model.mor.router": "none", "model.mor.sharing": sharing,
                "model.n_layers": 4, "model.mor.recursions": 2})
  prefix, blocks, suffix = mor_lib.recursion_schedule(sharing, 4, 2)
  order = list(prefix) + [i for b in blocks for i in b] + list(suffix)
  m = models.build(cfg, VOCAB)
  plain = models.build(_unrolled_config(cfg, len(order)), VOCAB)
  layers = m.initial_params["blocks"]["layers"]
  params = {**m.initial_params, "blocks": {"layers": {j: layers[i] for j, i in enumerate(order)}}}
  ids = _ids()
  got, _ = m.apply(m.initial_params, m.initial_buffers, ids)
  want, _ = plain.apply(params, plain.initial_buffers, ids)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert len(order) > 4  # the shared layers really ran more than once


# ----------------------------------------------------------------------------- expert choice


def test_capacities_exact():
  assert mor_lib.capacities(3) == (1.0, 2 / 3, 1 / 3)
  assert mor_lib.capacities(2) == (1.0, 0.5)
  assert mor_lib.capacity_k(64, 3) == (64, 43, 21)
  assert mor_lib.capacity_k(16, 4) == (16, 12, 8, 4)


def test_hierarchical_top_k_only_among_active_and_sorted():
  logits = jax.random.normal(jax.random.PRNGKey(3), (3, 20))
  active = jax.random.bernoulli(jax.random.PRNGKey(4), 0.6, (3, 20)).at[:, :8].set(True)
  idx, sel = mor_lib.select_top_k(logits, active, 5)
  for b in range(3):
    a = np.flatnonzero(np.asarray(active[b]))
    want = np.sort(a[np.argsort(-np.asarray(logits[b])[a], kind="stable")[:5]])
    np.testing.assert_array_equal(np.asarray(idx[b]), want)  # sorted: causal order
    np.testing.assert_array_equal(np.flatnonzero(np.asarray(sel[b])), want)
  assert not bool(jnp.any(sel & ~active))


def test_selected_counts_per_recursion_are_the_capacities():
  cfg = _cfg(**{"model.mor.router": "expert"})
  m = models.build(cfg, VOCAB)
  _, aux = m.apply(m.initial_params, m.initial_buffers, _ids(b=2, l=16))
  np.testing.assert_array_equal(np.asarray(aux["stat/mor_selected"]),
                                2 * np.asarray(mor_lib.capacity_k(16, 3), np.float32))
  assert float(aux["loss/mor_bce"]) > 0


def _stack_and_inputs(cfg, seed=0):
  m = models.build(cfg, VOCAB)
  stack = m.module(m.initial_params, m.initial_buffers).blocks
  b, l, d = 2, 16, cfg.model.d_model
  x = jax.random.normal(jax.random.PRNGKey(seed), (b, l, d))
  # two packed documents per row, positions restarting at each
  seg = jnp.asarray(np.repeat([[1] * 7 + [2] * 9], b, 0), jnp.int32)
  pos = jnp.asarray(np.repeat([list(range(7)) + list(range(9))], b, 0), jnp.int32)
  return stack, x, pos, seg


def test_sorted_gather_keeps_positions_and_documents():
  """The gathered update (block on the selected tokens only) equals the full-length update
  whose attention is restricted to the selected tokens, with the original RoPE positions
  and document ids; unselected tokens are unchanged. A gather that renumbered positions
  0..k-1 or dropped the document ids would differ (RoPE, document mask)."""
  stack, x, pos, seg = _stack_and_inputs(_cfg(**{"model.mor.router": "expert"}))
  logits = jax.random.normal(jax.random.PRNGKey(5), x.shape[:2])
  shape = x.shape[:2]
  idx, sel = mor_lib.select_top_k(logits, jnp.ones(shape, bool), 6)
  gate = 0.1 * jax.nn.sigmoid(logits)
  acc = mor_lib._Aux()
  gathered = stack._update_gathered(1, x, idx, mor_lib._take(gate, idx), pos, seg,
                                    Context(), acc)
  masked = stack._update_masked(1, x, sel, gate, pos, seg, Context(), acc)
  np.testing.assert_allclose(gathered, masked, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(gathered)[~np.asarray(sel)],
                                np.asarray(x)[~np.asarray(sel)])
  assert np.all(np.diff(np.asarray(mor_lib._take(pos, idx))[:, :], axis=1)[
      np.diff(np.asarray(mor_lib._take(seg, idx)), axis=1) == 0] > 0)
  # a gather that renumbered the selected tokens 0..k-1 (positions as if they were adjacent)
  rows = jnp.arange(shape[0])[:, None]
  renumbered_pos = jnp.zeros(shape, jnp.int32).at[rows, idx].set(jnp.arange(idx.shape[1]))
  renumbered = stack._update_gathered(1, x, idx, mor_lib._take(gate, idx), renumbered_pos,
                                      seg, Context(), acc)
  assert float(jnp.max(jnp.abs(renumbered - gathered))) > 1e-6


def _logits_after_changing_future(cfg, t, new_token, router_scale=30.0, seed=0):
  m = models.build(cfg, VOCAB)
  params = m.initial_params
  routers = params["blocks"]["routers"]
  params = {**params, "blocks": {**params["blocks"], "routers": jax.tree.map(
      lambda w: w * router_scale, routers)}}  # spread the router scores
  ids = _ids(seed, b=1, l=16)
  changed = ids.at[0, t].set(new_token)
  a, _ = m.apply(params, m.initial_buffers, ids)
  b, _ = m.apply(params, m.initial_buffers, changed)
  return float(jnp.max(jnp.abs(a[0, :t] - b[0, :t])))


def test_threshold_rule_is_causal():
  cfg = _cfg(**{"model.mor.router": "expert", "model.mor.rule": "threshold"})
  for t, tok in [(15, 3), (15, 200), (10, 7), (4, 99)]:
    assert _logits_after_changing_future(cfg, t, tok) == 0.0


def test_top_k_rule_leaks_the_future():
  """Expert-choice top-k ranks a token against later ones: changing a future token changes
  which earlier tokens are selected, hence their outputs (the leak the BCE rule removes)."""
  cfg = _cfg(**{"model.mor.router": "expert", "model.mor.rule": "topk"})
  leaks = [_logits_after_changing_future(cfg, 15, tok) for tok in (3, 50, 120, 200, 250)]
  assert max(leaks) > 1e-4, leaks


def test_eval_model_runs_threshold_rule():
  cfg = _cfg(**{"model.mor.router": "expert"})
  assert models.for_evaluation(cfg).model.mor.rule == "threshold"
  cfg_topk = _cfg(**{"model.mor.router": "expert", "model.mor.eval_rule": "topk"})
  assert models.for_evaluation(cfg_topk) is cfg_topk


# ----------------------------------------------------------------------------- token choice


def test_token_choice_depths_and_balance_loss():
  """Depth = argmax of the softmax router; recursion r updates exactly the tokens of depth
  >= r; the Switch loss is N_r * sum_j f_j P_j and the z-loss mean(logsumexp(z)^2)."""
  cfg = _cfg(**{"model.mor.router": "token"})
  m = models.build(cfg, VOCAB)
  module = m.module(m.initial_params, m.initial_buffers)
  ids = _ids()
  _, aux = m.apply(m.initial_params, m.initial_buffers, ids)
  # the hidden state entering the recursions = after the unique first layer (middle_cycle)
  x = module.embed(ids, jnp.float32)
  x, _ = module.blocks.layers[0](x, jnp.broadcast_to(jnp.arange(16), ids.shape), None, Context())
  z = np.asarray(x @ module.blocks.router.kernel[...], np.float64)
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  depth = p.argmax(-1)
  counts = np.bincount(depth.ravel(), minlength=3)
  np.testing.assert_allclose(aux["stat/mor_depth_counts"], counts)
  np.testing.assert_allclose(aux["stat/mor_selected"], [(depth >= r).sum() for r in range(3)])
  f, pm = counts / depth.size, p.reshape(-1, 3).mean(0)
  np.testing.assert_allclose(float(aux["loss/mor_balance"]), 0.1 * 3 * np.sum(f * pm), rtol=1e-4)
  lse = np.log(np.exp(z).sum(-1))
  np.testing.assert_allclose(float(aux["loss/mor_z"]), 1e-5 * np.mean(lse ** 2), rtol=1e-4)


def test_token_choice_loss_free_bias_moves_toward_balance():
  from tests.conftest import tiny_step_setup
  cfg = _cfg(**{"model.mor.router": "token", "model.mor.token_balance": "alf",
                "model.mor.bias_update_rate": 0.05})
  _, exts, step, batch, state = tiny_step_setup(cfg, seq_len=16, batch_size=4)
  assert "mor" in [e.name for e in exts]
  new, _ = step(state, batch)
  bias = np.asarray(new.buffers["blocks"]["depth_bias"])
  # the over-loaded depths go down, the under-loaded up (sign rule)
  m = models.build(cfg, VOCAB)
  _, aux = m.apply(state.params, state.buffers, batch["inputs"],
                   positions_BxL=batch["positions"], segment_ids_BxL=batch["segment_ids"])
  c = np.asarray(aux["stat/mor_depth_counts"])
  np.testing.assert_allclose(bias, 0.05 * np.sign(c.mean() - c))
  assert "loss/mor_balance" not in aux


# ----------------------------------------------------------------------------- FLOPs


def test_flops_count_applied_recursions_by_hand():
  from effjax.train import flops
  cfg = _cfg(**{"model.mor.router": "expert", "model.n_layers": 4, "model.mor.recursions": 2,
                "model.mor.sharing": "middle_cycle"})
  dims = models.resolve_dims(cfg.model, VOCAB)
  d, T, v = 32, 16, dims.vocab
  ffn = 3 * d * dims.mlp_dim
  proj = d * 4 * 8 * 2 + d * 2 * 8 * 2  # q, o: 4 heads of 8; k, v: 2 kv heads of 8
  attn = 2 * 2 * T * 4 * 8 / 2
  # layers 0 and 3 once on every token; layers 1, 2 at recursion 0 (cap 1) and 1 (cap 1/2)
  matmul = 2 * (proj + ffn) + 2 * (1 + 0.5) * (proj + ffn) + d * v + 2 * d
  attention = 2 * attn + 2 * (1 + 0.25) * attn
  want = 3 * (2 * matmul + attention)
  got = flops.flops_per_token(dims, T, tie_embeddings=False, mor=cfg.model.mor)
  assert got == pytest.approx(want, rel=1e-12)
  # plain recursion (every token, depth 6) costs more; a dense stack of the 4 unique layers less
  plain = flops.flops_per_token(dims, T, tie_embeddings=False,
                                mor=dataclasses.replace(cfg.model.mor, router="none"))
  dense = flops.flops_per_token(dims, T, tie_embeddings=False)
  assert plain > got > dense
  assert flops.isoflop_token_ratio(plain, got) == pytest.approx(plain / got)


def test_param_count_includes_routers():
  for router, extra in [("none", 0), ("expert", 3 * 32), ("token", 32 * 3)]:
    cfg = _cfg(**{"model.mor.router": router})
    m = models.build(cfg, VOCAB)
    n = sum(x.size for x in jax.tree.leaves(m.initial_params))
    dims = models.resolve_dims(cfg.model, VOCAB)
    assert models.count_params(dims, False, cfg.model)["total"] == n
    assert models.count_params(dims, False, C.Config().model)["total"] + extra == n


# ----------------------------------------------------------------------------- composition


def test_mor_with_moe_trains_a_step_and_routes_every_application():
  from tests.conftest import tiny_step_setup
  cfg = _cfg(**{"model.mor.router": "expert", "model.moe.num_experts": 4, "model.moe.top_k": 1,
                "model.moe.balance": "alf+aux", "model.mor.recursions": 2})
  _, exts, step, batch, state = tiny_step_setup(cfg, seq_len=16, batch_size=4)
  assert {"moe", "mor"} <= {e.name for e in exts}
  new, metrics = step(state, batch)
  assert np.isfinite(float(metrics["train/loss"]))
  assert "train/loss/mor_bce" in metrics and "train/loss/moe_aux/layer1" in metrics
  # layer 1 (shared) ran at recursion 0 on all 64 tokens and at recursion 1 on 32 of them
  m = models.build(cfg, VOCAB)
  _, aux = m.apply(state.params, state.buffers, batch["inputs"],
                   positions_BxL=batch["positions"], segment_ids_BxL=batch["segment_ids"])
  assert float(aux["stat/moe_counts/layer1"].sum()) == 64 + 32
  assert float(aux["stat/moe_counts/layer0"].sum()) == 64
  assert not np.array_equal(new.buffers["blocks"]["layers"][1]["ffn"]["bias"],
                            state.buffers["blocks"]["layers"][1]["ffn"]["bias"])


def test_mor_with_qat_and_loss_falls():
  from tests.conftest import tiny_step_setup
  cfg = _cfg(**{"model.mor.router": "expert", "quant.method": "quest", "train.lr": 1e-2,
                "train.warmup_steps": 0})
  _, _, step, batch, state = tiny_step_setup(cfg, seq_len=16, batch_size=4)
  losses = []
  for _ in range(8):
    state, metrics = step(state, batch)
    losses.append(float(metrics["train/loss"]))
  assert losses[-1] < losses[0] - 0.2, losses


def _trainer_args(*extra):
  from tests.conftest import TINY
  return ["--config=" + TINY, "--config.model.n_layers=3", "--config.model.mor.recursions=2",
          "--config.train.steps=4", "--config.train.warmup_steps=1", "--config.train.eval_every=2",
          "--config.train.log_every=1", "--config.train.checkpoint_every=100",
          "--config.train.seq_len=16", "--config.train.batch_size=4",
          "--config.train.eval_batches=1", *extra]


def test_trainer_eval_reports_both_rules(tmp_path):
  """eval/loss under the causal threshold rule and eval/mor/topk/loss under top-k, with the
  eval-set routing metrics."""
  from effjax.train import trainer
  from effjax.train.metrics import read_metrics
  cfg, _ = C.load(_trainer_args("--config.model.mor.router=expert"))
  assert trainer.train(cfg, str(tmp_path), quiet=True).exit_code == 0
  last = read_metrics(str(tmp_path / "metrics.jsonl"))[-1]
  for key in ("eval/loss", "eval/mor/topk/loss", "eval/mor/router_acc", "eval/mor/bce",
              "eval/mor/selected/rec1", "eval/mor/dead_tokens", "mor/selected/rec1"):
    assert np.isfinite(last[key]), key
  assert last["mor/selected/rec1"] == 0.5  # top-k in training: exactly cap_1 = 1/2


@pytest.mark.slow
def test_token_choice_resume_is_exact(tmp_path):
  """2N steps in one go == N, stop, resume: the token-choice depth bias (ALF-LB buffer) is
  checkpointed and restored (slow: three short runs)."""
  from effjax.train import trainer
  from effjax.train.metrics import read_metrics
  cfg, _ = C.load(_trainer_args("--config.model.mor.router=token",
                                "--config.model.mor.token_balance=alf"))
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  assert trainer.train(cfg, a, quiet=True).exit_code == 0
  assert trainer.train(cfg, b, quiet=True, stop_at=2).step == 2
  assert trainer.train(cfg, b, quiet=True).step == 4
  ra, rb = read_metrics(a + "/metrics.jsonl"), read_metrics(b + "/metrics.jsonl")
  keys = ("train/loss", "eval/loss", "mor/selected/rec1", "mor/depth_maxvio")
  pick = lambda rows: {(r["step"], k): r[k] for r in rows for k in keys if k in r}
  assert len(pick(ra)) == 4 * 3 + 2 and pick(ra) == pick(rb)


_SHARDED = r"""
import json, sys
import jax
from effjax import checks
from effjax.train import trainer
cfg, _ = checks.load(["--config=configs/tiny.py", "--config.train.steps=4",
                      "--config.train.warmup_steps=1", "--config.train.log_every=1",
                      "--config.train.eval_every=4", "--config.model.d_model=64",
                      "--config.model.n_heads=4", "--config.model.n_kv_heads=2",
                      "--config.model.n_layers=3", "--config.model.mor.recursions=3",
                      "--config.model.mor.router=expert"] + sys.argv[2:],
                     num_devices=jax.device_count())
r = trainer.train(cfg, sys.argv[1], quiet=True)
print(json.dumps({"devices": jax.device_count(), "exit": r.exit_code}))
"""


@pytest.mark.slow
def test_eight_device_fsdp_tensor_run_matches_one_device(tmp_path):
  """The gather / scatter of expert-choice under an fsdp x tensor mesh (slow: two runs)."""
  import os
  from effjax.train.metrics import read_metrics
  from tests.conftest import run_module
  one = run_module(["-c", _SHARDED, str(tmp_path / "one")])
  assert one.returncode == 0, one.stderr[-3000:]
  eight = run_module(["-c", _SHARDED, str(tmp_path / "eight"), "--config.mesh.fsdp=4",
                      "--config.mesh.tensor=2"],
                     env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  assert eight.returncode == 0, eight.stderr[-3000:]
  losses = lambda d: [r["train/loss"] for r in read_metrics(os.path.join(d, "metrics.jsonl"))
                      if "train/loss" in r]
  a, b = losses(tmp_path / "one"), losses(tmp_path / "eight")
  assert len(a) == len(b) == 4
  # as tests/test_train.py: sharded reductions sum in another order (fp32 round-off)
  np.testing.assert_allclose(b, a, rtol=1e-4)

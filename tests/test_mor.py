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

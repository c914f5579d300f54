"""MoE: routing, dropless dispatch, balance losses, ALF-LB bias, top-k schedule (issue 5)."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effjax import config as C
from effjax.config import MoEConfig
from effjax.models import moe as moe_lib
from effjax.models.moe import MoE, alf_bias_update, route, topk_schedule


def _layer(seed=0, d=16, **cfg):
  cfg = MoEConfig(**{"num_experts": 8, "top_k": 2, **cfg})
  return MoE(d, cfg, expert_dim=24, init_std=0.5, n_layers=2, rngs=nnx.Rngs(params=seed))


def _per_token_reference(layer: MoE, x_BxLxD, top_k=None):
  """Loop over tokens: y_t = sum_k g_tk * SwiGLU_{e_tk}(x_t) (+ shared)."""
  cfg = layer.cfg
  k = top_k or cfg.top_k
  x = np.asarray(x_BxLxD, np.float64).reshape(-1, x_BxLxD.shape[-1])
  logits = x @ np.asarray(layer.router[...], np.float64)
  if cfg.router == "sigmoid":
    s = 1 / (1 + np.exp(-logits))
  else:
    s = np.exp(logits - logits.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
  bias = np.asarray(layer.bias[...], np.float64) if "alf" in cfg.balance else 0.0
  wg, wu, wd = (np.asarray(w[...], np.float64) for w in (layer.w_gate, layer.w_up, layer.w_down))
  out = np.zeros_like(x)
  for t in range(x.shape[0]):
    idx = np.argsort(-(s[t] + bias), kind="stable")[:k]
    g = s[t, idx]
    if cfg.router == "sigmoid" and k > 1:
      g = g / g.sum()
    for e, ge in zip(idx, g * cfg.route_scale):
      h = x[t] @ wg[e]
      h = h / (1 + np.exp(-h)) * (x[t] @ wu[e])
      out[t] += ge * (h @ wd[e])
  return out.reshape(x_BxLxD.shape)


@pytest.mark.parametrize("dispatch", ["blocks", "ragged_dot"])
@pytest.mark.parametrize("router, k", [("sigmoid", 2), ("softmax", 1), ("sigmoid", 3)])
def test_dropless_output_equals_per_token_loop(dispatch, router, k):
  layer = _layer(router=router, top_k=k, dispatch=dispatch, block_size=8)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 13, 16))
  y, aux = layer(x)
  np.testing.assert_allclose(y, _per_token_reference(layer, x), rtol=2e-4, atol=2e-5)
  assert float(aux["stat/moe_counts"].sum()) == 2 * 13 * k


def test_capacity_path_without_drops_equals_dropless_and_counts_drops():
  x = jax.random.normal(jax.random.PRNGKey(2), (2, 16, 16))
  dropless, _ = _layer()(x)
  roomy, aux = _layer(capacity_factor=8.0)(x)  # C = T*k: nothing can be dropped
  np.testing.assert_allclose(roomy, dropless, rtol=1e-5, atol=1e-6)
  assert float(aux["moe/dropped_frac"]) == 0.0
  tight, aux = _layer(capacity_factor=0.5)(x)
  assert float(aux["moe/dropped_frac"]) >= 0.5  # at most half of the assignments fit
  assert not np.allclose(tight, dropless)


def test_gates_use_unbiased_scores_selection_uses_biased():
  scores = jnp.asarray([[0.9, 0.8, 0.1, 0.2]])
  bias = jnp.asarray([0.0, 0.0, 5.0, 0.0])
  idx, gates = route(scores, bias, 2, renormalize=True, scale=1.0)
  assert set(np.asarray(idx[0]).tolist()) == {2, 0}  # expert 2 chosen only because of its bias
  np.testing.assert_allclose(gates[0], np.array([0.1, 0.9]) / 1.0 if idx[0, 0] == 2
                             else np.array([0.9, 0.1]), rtol=1e-6)


def test_router_gets_gradients():
  for router, k in (("sigmoid", 2), ("softmax", 1)):
    layer = _layer(router=router, top_k=k)
    g, p, rest = nnx.split(layer, nnx.Param, ...)
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 8, 16))

    def loss(params):
      return jnp.sum(nnx.merge(g, params, rest)(x)[0] ** 2)

    grads = jax.grad(loss)(p)
    assert float(jnp.abs(grads["router"][...]).sum()) > 1e-6, router


def test_alf_bias_moves_a_skewed_router_to_balance():
  """A fixed input stream and a router skewed toward expert 0: the ALF-LB bias alone
  (no training of weights) must drive MaxVio far down."""
  layer = _layer(balance="alf", router="sigmoid", top_k=2)
  skew = jnp.zeros((16, 8)).at[:, 0].set(3.0).at[:, 1].set(1.5)
  layer.router[...] = layer.router[...] * 0.3 + jnp.ones((16, 1)) * skew[0] * 0.1
  x = jax.random.normal(jax.random.PRNGKey(4), (4, 32, 16)) + 1.0
  _, aux = layer(x)
  start = float(aux["moe/maxvio"])
  assert start > 1.0
  for _ in range(300):
    _, aux = layer(x)
    layer.bias[...] = alf_bias_update(layer.bias[...], aux["stat/moe_counts"], rate=1e-2,
                                      rule="sign")
  end = float(aux["moe/maxvio"])
  assert end < 0.35 * start and end < 0.6, (start, end)
  # the most loaded expert ended with the lowest bias
  assert int(jnp.argmin(layer.bias[...])) == 0


def test_balance_losses_at_perfect_balance():
  """Switch aux = alpha when f = P = 1/N; the top-1 LBL is minimal (= alpha / pbar) when
  the tempered router distribution is uniform."""
  layer = _layer(balance="aux+seq_aux+global_aux+top1_lbl", router="softmax", top_k=1)
  layer.router[...] = jnp.zeros_like(layer.router[...])  # uniform probabilities
  x = jax.random.normal(jax.random.PRNGKey(5), (2, 8, 16))
  _, aux = layer(x)
  # with all-equal scores top_k picks expert 0 for every token: f = (1,0,...), P = 1/N
  np.testing.assert_allclose(aux["loss/moe_aux"], 1e-2 * 8 * (1.0 * 1 / 8), rtol=1e-5)
  np.testing.assert_allclose(aux["loss/moe_top1_lbl"], 1e-2 * 8 * (8 * (1 / 8) ** 2) / (1 / 8),
                             rtol=1e-5)
  np.testing.assert_allclose(aux["loss/moe_seq_aux"], 1e-4 * (8 / 1) * (1 / 8), rtol=1e-5)


def test_topk_schedule_parses_and_switches():
  cfg = MoEConfig(num_experts=8, top_k=1, topk_schedule="0.25:4:0.3")
  switch, before, after = topk_schedule(cfg, 8, 1000)
  assert switch == 300 and before == (4, 4, 1, 1, 1, 1, 1, 1) and after == (1,) * 8
  with pytest.raises(ValueError, match="topk_schedule"):
    topk_schedule(dataclasses.replace(cfg, topk_schedule="4@0.3"), 8, 1000)
  with pytest.raises(ValueError, match="model.moe.balance"):
    moe_lib.balance_methods(dataclasses.replace(cfg, balance="alf+magic"))

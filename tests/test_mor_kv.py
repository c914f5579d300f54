"""Mixture-of-Recursions KV strategies for incremental decoding (issue 13, docs/mor.md).

The defining property: prefill + token-by-token decoding against the strategy's caches gives
the logits of the full forward (same causal routing rule, same strategy), for expert-choice
(threshold rule), token-choice and plain recursion, under middle_cycle sharing; recursion-wise
caches hold fewer entries at deeper recursions; `python -m effjax.generate` decodes a MoR run
with the cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax import config as C
from effjax import load, models, sampling
from effjax.models import kv_cache
from effjax.models import mor as mor_lib
from effjax.models.stack import Context
from effjax.train import trainer
from tests.conftest import TINY, run_module
from tests.test_generate import _incremental

VOCAB = 257
ROUTERS = {"expert": {"model.mor.router": "expert", "model.mor.rule": "threshold"},
           "token": {"model.mor.router": "token"},
           "none": {"model.mor.router": "none"}}


def _model(**over):
  # init_std 0.3: peaked attention and spread router scores, so a wrong key or a wrong
  # routing decision shows in the logits
  base = {"model.d_model": 32, "model.n_layers": 4, "model.n_heads": 4, "model.n_kv_heads": 2,
          "model.mor.recursions": 3, "model.mor.sharing": "middle_cycle",
          "train.seq_len": 16, "model.init_std": 0.3}
  cfg = C.validate(C.apply_overrides(C.Config(), {**base, **over}))
  m = models.build(cfg, VOCAB)
  return m, m.initial_params, m.initial_buffers


def _ids(b=2, l=11):
  return jax.random.randint(jax.random.PRNGKey(1), (b, l), 0, 256)


@pytest.mark.parametrize("router", sorted(ROUTERS))
@pytest.mark.parametrize("strategy", ["recursion_wise", "shared"])
def test_incremental_decoding_equals_the_full_forward(strategy, router):
  m, params, buffers = _model(**ROUTERS[router], **{"model.mor.kv_strategy": strategy})
  assert sampling.decode_unsupported(m, params, buffers) is None
  ids = _ids()
  full, aux = m.apply(params, buffers, ids)
  inc = _incremental(m, params, buffers, ids, prefill=4)
  scale = float(jnp.max(jnp.abs(full)))
  np.testing.assert_allclose(inc, full, rtol=1e-5, atol=1e-5 * scale)  # fp32 summation order
  assert float(jnp.std(full)) > 0.5  # logits far from uniform: the check has teeth
  if router != "none":  # the routing is not trivial: deeper recursions drop tokens
    assert 0.0 < float(aux["mor/selected/rec2"]) < 1.0


def test_the_two_strategies_are_different_models():
  """Recursive KV sharing changes the forward (same parameters, other logits), which is why
  it is a training-time choice; recursion_wise is the default model."""
  assert C.Config().model.mor.kv_strategy == "recursion_wise"
  ids = _ids()
  m, params, buffers = _model(**ROUTERS["expert"])
  shared, _, _ = _model(**ROUTERS["expert"], **{"model.mor.kv_strategy": "shared"})
  a, _ = m.apply(params, buffers, ids)
  b, _ = shared.apply(params, buffers, ids)
  assert float(jnp.max(jnp.abs(a - b))) > 1e-3


def test_recursion_wise_caches_hold_fewer_entries_at_deeper_recursions():
  """Each routed recursion's cache stores only the tokens that recursion selected (the
  threshold rule among those still active): its entry count equals the full forward's
  selected count and shrinks with depth. Shared: one set of recursion-0 caches."""
  for router in ("expert", "token"):
    m, params, buffers = _model(**ROUTERS[router])
    ids = _ids(b=1, l=12)
    cache = m.init_cache(1, 16)
    _, cache = m.decode(params, buffers, ids[:, :5], cache, start=0)
    for t in range(5, 12):
      _, cache = m.decode(params, buffers, ids[:, t:t + 1], cache, start=t)
    _, recs, _ = cache
    _, aux = m.apply(params, buffers, ids)
    entries = [12] + [int(recs[r][0].count_B[0]) for r in range(1, 3)]
    assert isinstance(recs[0][0], kv_cache.KVCache)  # recursion 0: every token
    assert all(isinstance(c, kv_cache.CompactKVCache) for r in (1, 2) for c in recs[r])
    assert entries == [int(aux["stat/mor_selected"][r]) for r in range(3)], entries
    assert entries[0] >= entries[1] >= entries[2] and entries[2] < entries[0], entries
    # the filled slots hold exactly those tokens' positions, in order; the rest is empty
    pos = np.asarray(recs[2][0].kv_pos_BxT[0])
    assert np.all(pos[entries[2]:] == kv_cache.EMPTY)
    assert np.all(np.diff(pos[:entries[2]]) > 0)
  m, params, buffers = _model(**ROUTERS["expert"], **{"model.mor.kv_strategy": "shared"})
  _, recs, _ = m.init_cache(1, 16)
  assert len(recs) == 1  # recursion 0's caches, read by every later recursion


def test_topk_expert_choice_falls_back_to_the_full_forward():
  """Expert-choice top-k (the training rule) is not causal: no incremental decoding."""
  m, params, buffers = _model(**{"model.mor.router": "expert"})
  assert "model.mor.rule=threshold" in sampling.decode_unsupported(m, params, buffers)


def test_threshold_rule_is_causal_at_every_length():
  """The threshold rule decides per token for any length (also where k_r rounds up to T):
  each prefix's logits equal the whole sequence's at the same positions."""
  m, params, buffers = _model(**ROUTERS["expert"], **{"model.mor.recursions": 4})
  ids = _ids(b=1, l=8)
  full, _ = m.apply(params, buffers, ids)
  for t in (1, 2, 3):
    part, _ = m.apply(params, buffers, ids[:, :t])
    np.testing.assert_allclose(part, full[:, :t], rtol=1e-5, atol=1e-5)


def test_shared_gather_equals_masked_update_with_documents():
  """Recursive KV sharing in training: the gathered (top-k) update equals the full-length
  one (queries at their sequence slots attend to recursion 0's keys of their own document,
  causally), and the result depends on recursion 0's keys."""
  m, params, buffers = _model(**{"model.mor.router": "expert", "model.mor.kv_strategy": "shared"})
  stack = m.module(params, buffers).blocks
  b, l = 2, 16
  x = jax.random.normal(jax.random.PRNGKey(0), (b, l, 32))
  seg = jnp.asarray(np.repeat([[1] * 7 + [2] * 9], b, 0), jnp.int32)
  pos = jnp.asarray(np.repeat([list(range(7)) + list(range(9))], b, 0), jnp.int32)
  acc, first = mor_lib._Aux(), mor_lib._FirstRecursionKV(seg)
  x0 = stack._recursion(0, x, pos, seg, Context(), acc, first)
  logits = jax.random.normal(jax.random.PRNGKey(5), (b, l))
  idx, sel = mor_lib.select_top_k(logits, jnp.ones((b, l), bool), 6)
  gate = 0.1 * jax.nn.sigmoid(logits)
  gathered = stack._update_gathered(1, x0, idx, mor_lib._take(gate, idx), pos, seg,
                                    Context(), acc, first)
  masked = stack._update_masked(1, x0, sel, gate, pos, seg, Context(), acc, first)
  np.testing.assert_allclose(gathered, masked, rtol=1e-5, atol=1e-6)
  other = mor_lib._FirstRecursionKV(seg)
  stack._recursion(0, x * 1.5, pos, seg, Context(), acc, other)
  moved = stack._update_masked(1, x0, sel, gate, pos, seg, Context(), acc, other)
  assert float(jnp.max(jnp.abs(moved - masked))) > 1e-4


def test_shared_kv_flops_by_hand():
  """Recursive KV sharing: recursions r >= 1 project no keys/values and their cap_r * T
  queries attend over all T tokens (cap_r of a full attention instead of cap_r^2)."""
  from effjax.train import flops
  over = {"model.mor.router": "expert", "model.n_layers": 4, "model.mor.recursions": 2,
          "model.d_model": 32, "model.n_heads": 4, "model.n_kv_heads": 2,
          "model.mor.sharing": "middle_cycle", "train.seq_len": 16}
  cfg = C.validate(C.apply_overrides(C.Config(), {**over, "model.mor.kv_strategy": "shared"}))
  dims = models.resolve_dims(cfg.model, VOCAB)
  d, T, v = 32, 16, dims.vocab
  ffn = 3 * d * dims.mlp_dim
  qo, kv = d * 4 * 8 * 2, d * 2 * 8 * 2  # q, o: 4 heads of 8; k, v: 2 kv heads of 8
  attn = 2 * 2 * T * 4 * 8 / 2
  # layers 0, 3 once; layers 1, 2 at recursion 0 (cap 1, own k/v) and 1 (cap 1/2, reads)
  matmul = 2 * (qo + kv + ffn) + 2 * (qo + kv + ffn) + 2 * 0.5 * (qo + ffn) + d * v + 2 * d
  attention = 2 * attn + 2 * (1 + 0.5) * attn
  got = flops.flops_per_token(dims, T, tie_embeddings=False, mor=cfg.model.mor)
  assert got == pytest.approx(3 * (2 * matmul + attention), rel=1e-12)
  recursion_wise = flops.flops_per_token(
      dims, T, tie_embeddings=False,
      mor=C.validate(C.apply_overrides(C.Config(), over)).model.mor)
  assert got != recursion_wise


def test_bad_kv_strategy_names_the_key():
  with pytest.raises(C.ConfigError, match="model.mor.kv_strategy"):
    C.apply_overrides(C.Config(), {"model.mor.kv_strategy": "paged"})


@pytest.mark.parametrize("strategy", ["recursion_wise", "shared"])
def test_greedy_generation_with_the_cache_matches_the_full_forward_fallback(strategy):
  m, params, buffers = _model(**ROUTERS["expert"], **{"model.mor.kv_strategy": strategy})
  kw = dict(max_tokens=8, context=16, rng=jax.random.PRNGKey(0), temperature=0.0, vocab=256)
  cached = sampling.generate(m, params, buffers, [5, 6, 7], **kw)
  full = sampling._generate_full(m, params, buffers, [5, 6, 7], top_k=0, top_p=1.0,
                                 stop_id=None, **kw)
  assert cached == full  # no window slide within 3 + 8 tokens: every token must agree


@pytest.mark.slow
def test_generate_cli_decodes_a_mor_run_with_the_cache(tmp_path):
  """Train a tiny MoR run, then `python -m effjax.generate` decodes it with the cache (its
  eval model runs the threshold rule). Slow (~45 s); the fast property is the test above."""
  over = ["--config.model.mor.recursions=2", "--config.model.mor.sharing=cycle",
          "--config.model.mor.router=expert", "--config.model.mor.kv_strategy=shared",
          "--config.model.remat=true"]
  cfg, _ = C.load(["--config=" + TINY, "--config.train.steps=2", "--config.train.eval_every=2",
                   "--config.train.checkpoint_every=2", "--config.train.warmup_steps=1", *over])
  assert trainer.train(cfg, str(tmp_path), quiet=True).exit_code == 0
  run = load.load_run(str(tmp_path))
  assert run.config.model.mor.rule == "topk"  # the training rule in config.json ...
  assert sampling.decode_unsupported(run.model, run.params, run.buffers) is None  # ... eval: threshold
  proc = run_module(["-m", "effjax.generate", f"--workdir={tmp_path}", "--prompt=def f(",
                     "--max_tokens=20", "--temperature=0"])
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.startswith("def f(")
  assert "full forward" not in proc.stderr  # the KV cache, not the fallback

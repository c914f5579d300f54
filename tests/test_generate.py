"""KV-cache decoding and `python -m effjax.generate` (issue 20; docs/generate.md).

The defining property: decoding token by token against the cache gives the logits of the
full forward at every position, for every model variant (the score functions, MoE, QAT
fake-quant, QKR, GQA, RoPE and learned positions, the scanned stack)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax import config as C
from effjax import models, sampling
from effjax.train import trainer
from tests.conftest import TINY, run_module

# init_std 0.3 (not 0.02): peaked attention, so a wrong key, position or mask shows.
VARIANTS = {
    "softmax_rope_gqa": [],
    "lssa": ["--config.model.attention.score=lssa"],
    "lssar_scanned": ["--config.model.attention.score=lssar", "--config.model.scan_layers=true"],
    "moe": ["--config.model.moe.num_experts=4", "--config.model.moe.top_k=2",
            "--config.model.moe.balance=alf+seq_aux"],
    "quest_w4a4": ["--config.quant.method=quest"],
    "learned_qkr": ["--config.model.position=learned", "--config.quant.method=statsq",
                    "--config.quant.qkr=true"],
    "log_n_tied_qknorm": ["--config.model.attention.log_n_scale=true",
                          "--config.model.tie_embeddings=true",
                          "--config.model.attention.qk_norm=true"],
    "lipschitz": ["--config.model.arch=lipschitz", "--config.model.init_std=2.0"],
}


def _model(*overrides):
  cfg, _ = C.load(["--config=" + TINY, "--config.model.init_std=0.3", *overrides])
  m = models.build(cfg, 257)
  return m, m.initial_params, m.initial_buffers


def _incremental(m, params, buffers, ids_BxL, *, prefill: int, start_shift: int = 0):
  """Logits of ids: the first `prefill` tokens at once, then one token at a time."""
  cache = m.module(params, buffers).init_cache(ids_BxL.shape[0], ids_BxL.shape[1] + 4)
  logits, cache = m.decode(params, buffers, ids_BxL[:, :prefill], cache, start=0)
  outs = [logits]
  for t in range(prefill, ids_BxL.shape[1]):
    logits, cache = m.decode(params, buffers, ids_BxL[:, t:t + 1], cache,
                             start=t + start_shift)
    outs.append(logits)
  return jnp.concatenate(outs, axis=1)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_incremental_decoding_equals_the_full_forward(name):
  m, params, buffers = _model(*VARIANTS[name])
  ids = jax.random.randint(jax.random.PRNGKey(1), (2, 11), 0, 256)
  full, _ = m.apply(params, buffers, ids)
  inc = _incremental(m, params, buffers, ids, prefill=4)
  # fp32; the only differences are summation order (LSSAR's power 15 amplifies them most)
  np.testing.assert_allclose(inc, full, atol=1e-4, rtol=1e-4)
  assert float(jnp.std(full)) > 0.5  # logits far from uniform: the check has teeth


def test_a_wrong_cache_position_changes_the_logits():
  """The equality above is not automatic: decoding at shifted positions (RoPE and the causal
  mask read them) gives other logits."""
  m, params, buffers = _model()
  ids = jax.random.randint(jax.random.PRNGKey(1), (1, 8), 0, 256)
  full, _ = m.apply(params, buffers, ids)
  shifted = _incremental(m, params, buffers, ids, prefill=4, start_shift=1)
  assert float(jnp.max(jnp.abs(shifted[:, 4:] - full[:, 4:]))) > 1e-2


def test_greedy_generation_matches_argmax_of_the_full_forward_with_a_sliding_window():
  m, params, buffers = _model()
  prompt, n, context = [5, 6, 7], 14, 8
  out = sampling.generate(m, params, buffers, prompt, max_tokens=n, rng=jax.random.PRNGKey(0),
                          temperature=0.0, context=context, vocab=256)
  # reference: the full forward over what the cache holds, which slides by context // 2
  ids, start, want = list(prompt), 0, []
  while len(want) < n:
    logits, _ = m.apply(params, buffers, jnp.asarray([ids[start:]]))
    full = len(ids) - start == context
    want.append(int(jnp.argmax(logits[0, -1, :256])))
    ids.append(want[-1])
    if full:  # the cache is refilled with the last context // 2 tokens
      start = len(ids) - context // 2
  assert start > 0  # the window slid
  assert out == want


def test_top_k_and_top_p_keep_the_most_likely_tokens():
  logits = jnp.log(jnp.asarray([[0.5, 0.05, 0.3, 0.15]]))
  keep = lambda **kw: np.isfinite(np.asarray(sampling.filter_logits(logits, **kw)))[0].tolist()
  assert keep(top_k=2) == [True, False, True, False]
  assert keep(top_p=0.5) == [True, False, False, False]      # 0.5 reached by the first
  assert keep(top_p=0.79) == [True, False, True, False]      # 0.5 + 0.3
  assert keep(top_p=0.81) == [True, False, True, True]
  draws = {int(sampling.sample(logits, jax.random.PRNGKey(i), temperature=1.0, top_k=2)[0])
           for i in range(40)}
  assert draws == {0, 2}


def test_generate_cli_from_a_checkpoint(tmp_path):
  cfg, _ = C.load(["--config=" + TINY, "--config.train.steps=2", "--config.train.eval_every=2",
                   "--config.train.checkpoint_every=2", "--config.train.warmup_steps=1"])
  assert trainer.train(cfg, str(tmp_path), quiet=True).exit_code == 0
  proc = run_module(["-m", "effjax.generate", f"--workdir={tmp_path}", "--prompt=def f(",
                     "--max_tokens=40", "--top_k=20", "--top_p=0.95", "--num_samples=2"])
  assert proc.returncode == 0, proc.stderr[-2000:]
  samples = proc.stdout.split("-" * 60 + "\n")
  assert len(samples) == 2 and all(s.startswith("def f(") for s in samples)
  missing = run_module(["-m", "effjax.generate", f"--workdir={tmp_path}", "--step=7"])
  assert missing.returncode == 2 and "available: 2" in missing.stderr
  assert "Traceback" not in missing.stderr


# Models without a KV cache (an expert-choice MoR under its top-k training rule, stack-built
# shared attention weights) sample with one full forward per token instead of failing; MoR
# decoding with its KV strategies is tested in tests/test_mor_kv.py.
NO_CACHE = {
    "mor": ["--config.model.mor.recursions=2", "--config.model.mor.router=expert",
            "--config.model.mor.sharing=cycle"],
    "masa": ["--config.model.n_layers=3", "--config.model.attention.sharing=masa"],
}


@pytest.mark.parametrize("name", sorted(NO_CACHE))
def test_models_without_a_cache_still_generate(name):
  m, params, buffers = _model(*NO_CACHE[name])
  assert sampling.decode_unsupported(m, params, buffers)
  out = sampling.generate(m, params, buffers, [5, 6, 7], max_tokens=3, context=8,
                          rng=jax.random.PRNGKey(0), temperature=0.0, vocab=256)
  assert len(out) == 3 and all(0 <= t < 256 for t in out)


def test_the_full_forward_fallback_gives_the_cached_tokens():
  m, params, buffers = _model()
  assert sampling.decode_unsupported(m, params, buffers) is None
  kw = dict(max_tokens=12, context=8, rng=jax.random.PRNGKey(0), temperature=0.0, vocab=256)
  cached = sampling.generate(m, params, buffers, [5, 6, 7], **kw)
  full = sampling._generate_full(m, params, buffers, [5, 6, 7], top_k=0, top_p=1.0,
                                 stop_id=None, **kw)
  # greedy, the window slides once: the cache re-prefills half the context, the fallback
  # keeps the last `context` tokens, so only the tokens before the first slide must agree
  assert cached[:5] == full[:5]

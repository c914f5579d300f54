"""Chunked LM head + cross-entropy (model.loss_chunk, effjax/models/lm_head.py): same loss and
gradients as the logits path, and no [B, L, V] logits in the compiled step."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax import config as C
from effjax import models
from effjax.train.step import make_loss_fn

B, L = 2, 32


def _model(chunk, tokenizer_vocab=257, **overrides):
  args = ["--config=configs/tiny.py", f"--config.model.loss_chunk={chunk}"]
  args += [f"--config.model.{k}={v}" for k, v in overrides.items()]
  cfg, _ = C.load(args)
  return models.build(cfg, tokenizer_vocab)


def _batch(vocab=257):
  ids = jax.random.randint(jax.random.PRNGKey(3), (B, L + 1), 0, vocab)
  seg = jnp.asarray([[1] * 10 + [2] * 22] * B)
  pos = jnp.asarray([list(range(10)) + list(range(22))] * B)
  return {"inputs": ids[:, :-1], "targets": ids[:, 1:], "positions": pos, "segment_ids": seg}


def _loss_and_grads(model, batch):
  fn = jax.value_and_grad(make_loss_fn(model), has_aux=True)
  (loss, (nll, _)), grads = jax.jit(fn)(model.initial_params, model.initial_buffers, batch)
  return loss, nll, grads


CASES = {
    "untied": {},
    "tied": {"tie_embeddings": True},
    "mup_output_mult": {"param": "mup", "base_width": 32, "output_mult": 2.5},
    "tied_mup": {"tie_embeddings": True, "param": "mup", "base_width": 32, "output_mult": 0.5},
}


# chunk 12 does not divide L = 32: a padded last chunk.
@pytest.mark.parametrize("name,chunk", [("untied", 12), ("tied", 8), ("mup_output_mult", 8),
                                        ("tied_mup", 12)])
def test_chunked_loss_and_gradients_match_the_logits_path(name, chunk):
  batch = _batch()
  plain = _model(0, **CASES[name])
  chunked = _model(chunk, **CASES[name])
  assert chunked.dims.vocab == 384  # tokenizer vocab 257 padded to a multiple of 128
  loss0, nll0, g0 = _loss_and_grads(plain, batch)
  loss1, nll1, g1 = _loss_and_grads(chunked, batch)
  np.testing.assert_allclose(nll1, nll0, rtol=1e-6)
  np.testing.assert_allclose(loss1, loss0, rtol=1e-6)
  flat0, flat1 = jax.tree.leaves_with_path(g0), jax.tree.leaves_with_path(g1)
  assert [p for p, _ in flat0] == [p for p, _ in flat1]
  for (path, a), (_, b) in zip(flat0, flat1):
    scale = float(jnp.max(jnp.abs(a))) or 1.0
    # fp32 sums in another order (the head's gradient is accumulated chunk by chunk).
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * scale, err_msg=jax.tree_util.keystr(path))


def _vocab_shapes(hlo: str, vocab: int) -> set:
  """Shapes 'b,l,v' of the fp32 tensors ending in the vocabulary (StableHLO text)."""
  return {m.replace("x", ",") for m in re.findall(r"tensor<([\dx]+)xf32>", hlo)
          if m.endswith(f"x{vocab}")}


def test_chunked_step_never_holds_full_length_logits():
  batch = _batch()
  for chunk, full_expected in ((0, True), (8, False)):
    model = _model(chunk)
    fn = jax.value_and_grad(make_loss_fn(model), has_aux=True)
    hlo = jax.jit(fn).lower(model.initial_params, model.initial_buffers, batch).as_text()
    shapes = _vocab_shapes(hlo, model.dims.vocab)
    assert (f"{B},{L},{model.dims.vocab}" in shapes) == full_expected, shapes
    if chunk:
      assert f"{B},{chunk},{model.dims.vocab}" in shapes, shapes


def test_eval_step_uses_the_chunked_head():
  from effjax.train.step import make_eval_step
  batch = _batch()
  sums = [jax.jit(make_eval_step(m, None))(m.initial_params, m.initial_buffers, batch)
          for m in (_model(0), _model(8))]
  np.testing.assert_allclose(sums[1]["nll_sum"], sums[0]["nll_sum"], rtol=1e-6)


def test_negative_loss_chunk_is_a_config_error():
  with pytest.raises(C.ConfigError, match="model.loss_chunk"):
    C.load(["--config=configs/tiny.py", "--config.model.loss_chunk=-1"])

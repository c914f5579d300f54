"""configs/gpt2_125m.py and gpt2_350m.py: GPT-2 small/medium shapes, built abstractly
(jax.eval_shape: no weights), and the built-in corpus BPE they use (effjax/data/bpe.py)."""

import os

import jax
import pytest

from effjax import config as C
from effjax import models
from effjax.data import bpe
from effjax.data import load_tokenizer


def _params(d, layers, ffn, vocab=50304):
  """Tied embedding + per block (q, k, v, o; SwiGLU gate, up, down; two RMSNorm gains) +
  the final norm, counted by hand."""
  return vocab * d + layers * (4 * d * d + 3 * d * ffn + 2 * d) + d


@pytest.mark.parametrize("name,expected", [("gpt2_125m", _params(768, 12, 2048)),
                                           ("gpt2_350m", _params(1024, 24, 2752))])
def test_gpt2_config_builds_with_the_gpt2_parameter_count(name, expected):
  cfg, _ = C.load([f"--config=configs/{name}.py"])
  assert cfg.data.tokenizer == "bpe:50257" and cfg.model.loss_chunk > 0
  shapes = jax.eval_shape(lambda: models.build(cfg, None).initial_params)
  n = sum(x.size for x in jax.tree.leaves(shapes))
  assert n == expected
  assert (120e6 < n < 130e6) if name == "gpt2_125m" else (350e6 < n < 360e6)


def test_builtin_bpe_trains_once_and_loads_as_a_tokenizer(tmp_path, monkeypatch):
  """bpe:N trains a byte-level BPE with EOS on the corpus's training files, caches it (a
  second load does not retrain), and merges bytes: fewer tokens than bytes, exact decode."""
  files = sorted(os.path.join(tmp_path, f) for f in ("a.py", "b.py"))
  text = "def forward(self, inputs):\n    return self.layer(inputs) + inputs\n" * 50
  for f in files:
    with open(f, "w") as fh:
      fh.write(text)
  monkeypatch.setattr(bpe, "_training_files", lambda val_percent: (files, "fixedprint"))
  tok = load_tokenizer("bpe:300", cache_dir=str(tmp_path))
  path = bpe.builtin_bpe(300, str(tmp_path))
  assert path.startswith(str(tmp_path / "tokenizers")) and os.path.isfile(path)
  mtime = os.path.getmtime(path)
  assert load_tokenizer("bpe:300", cache_dir=str(tmp_path)).identity == tok.identity
  assert os.path.getmtime(path) == mtime
  assert tok.vocab_size <= 300 and tok.eos_token == bpe.EOS
  ids = tok.encode(text[:200])
  assert len(ids) < len(text[:200].encode()) / 2
  assert tok.decode(ids) == text[:200]
  with pytest.raises(Exception, match="bpe:<vocab size>"):
    load_tokenizer("bpe:lots")

"""A byte-level BPE vocabulary trained on the built-in corpus (GPT-2-style, `tokenizers`).

  python -m effjax.data.bpe --vocab-size=50257        # trains once, prints the cached path

data.tokenizer=bpe:50257 loads it (training it first if the cache lacks it): a realistic
LM head (configs/gpt2_125m.py, configs/gpt2_350m.py) without downloading a vocabulary.
Trained on the built-in corpus's training files only (the validation files, chosen by
file hash as the corpus loader chooses them, stay unseen), byte-level pre-tokenisation
and decoder as GPT-2 (Radford et al. 2019), one special token <|endoftext|> (EOS). Cached
under <cache dir>/tokenizers/builtin-bpe<V>-<corpus fingerprint>.json; the fingerprint
covers the corpus files, so another Python's standard library gives another file.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys

from effjax.data import corpus as corpus_lib
from effjax.data.errors import DataError

EOS = "<|endoftext|>"
PREFIX = "bpe:"


def tokenizer_dir(cache_dir: str | None = None) -> str:
  """<cache_dir>/tokenizers; default ~/.cache/effjax/tokenizers (beside the corpora)."""
  base = cache_dir or os.path.dirname(corpus_lib.default_cache_dir())
  return os.path.join(base, "tokenizers")


def _training_files(val_percent: float) -> tuple[list[str], str]:
  root = corpus_lib.builtin_corpus_root()
  rels = [r for r in corpus_lib.builtin_corpus_files(root)
          if not corpus_lib.is_validation(r, val_percent)]
  hasher = hashlib.sha256(f"bpe-v1-val{val_percent:g}".encode())
  paths = []
  for rel in rels:
    path = os.path.join(root, rel)
    hasher.update(rel.encode() + b"\0" + str(os.path.getsize(path)).encode())
    paths.append(path)
  return paths, hasher.hexdigest()[:12]


def builtin_bpe(vocab_size: int, cache_dir: str | None = None, val_percent: float = 5) -> str:
  """Path of the cached tokenizer.json, training it first if missing (~1 min, 2 cores)."""
  if vocab_size < 257 + 1:
    raise DataError(f"a BPE vocabulary needs more than the 256 bytes + EOS; got {vocab_size}")
  paths, fingerprint = _training_files(val_percent)
  out = os.path.join(tokenizer_dir(cache_dir), f"builtin-bpe{vocab_size}-{fingerprint}.json")
  if os.path.isfile(out):
    return out
  try:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise DataError("data.tokenizer=bpe:N needs the `tokenizers` library "
                    "(pip install tokenizers)") from None
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train(paths, trainer)
  os.makedirs(os.path.dirname(out), exist_ok=True)
  tmp = f"{out}.tmp{os.getpid()}"
  tok.save(tmp)
  os.replace(tmp, out)
  return out


def resolve_spec(spec: str, cache_dir: str | None = None) -> str:
  """'bpe:N' -> the cached tokenizer.json path (trained if missing); other specs unchanged."""
  if not spec.startswith(PREFIX):
    return spec
  try:
    vocab = int(spec[len(PREFIX):])
  except ValueError:
    raise DataError(f"data.tokenizer={spec!r}: expected bpe:<vocab size>, e.g. bpe:50257") from None
  return builtin_bpe(vocab, cache_dir)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--vocab-size", type=int, default=50257)
  parser.add_argument("--cache-dir", default=None, help="default ~/.cache/effjax")
  args = parser.parse_args(argv)
  print(builtin_bpe(args.vocab_size, args.cache_dir))
  return 0


if __name__ == "__main__":
  sys.exit(main())

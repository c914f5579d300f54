"""Tokenizers: byte-level (the default) and Hugging Face `tokenizer.json` files.

Every tokenizer exposes the same small interface, used by the corpus loaders and
the trainer:

  vocab_size          number of ids (EOS included)
  eos_id              the document separator
  identity            a short string naming the tokenizer exactly (enters fingerprints)
  encode(str)         -> 1-D np.ndarray of ids (uint16 or uint32)
  encode_bytes(bytes) -> same, for raw file contents
  encode_batch(list[bytes]) -> list of arrays (HF: parallel in Rust)
  decode(ids)         -> str
  token_byte_lengths  float32 [vocab_size]: UTF-8 bytes each token stands for (EOS and
                      other special tokens: 0). eval/bpb = nats / ln 2 / bytes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re

import numpy as np

from effjax.data.errors import DataError

TOKENIZER_CHOICES = ("'byte', a path to a Hugging Face tokenizer.json file, or bpe:<vocab size> "
                     "(a BPE trained on the built-in corpus, effjax/data/bpe.py)")


class ByteTokenizer:
  """Ids 0..255 are raw UTF-8 bytes; id 256 is EOS, the document separator (0 bytes)."""

  name = "byte"
  identity = "byte-v1"
  vocab_size = 257
  eos_id = 256

  def encode(self, text: str) -> np.ndarray:
    return self.encode_bytes(text.encode("utf-8"))

  def encode_bytes(self, data: bytes) -> np.ndarray:
    return np.frombuffer(data, np.uint8).astype(np.uint16)

  def encode_batch(self, docs: list[bytes]) -> list[np.ndarray]:
    return [self.encode_bytes(d) for d in docs]

  def decode(self, ids) -> str:
    """Bytes back to text; EOS and out-of-range ids are dropped, bad UTF-8 replaced."""
    ids = np.asarray(ids).reshape(-1)
    keep = ids[(ids >= 0) & (ids < 256)].astype(np.uint8)
    return keep.tobytes().decode("utf-8", errors="replace")

  @functools.cached_property
  def token_byte_lengths(self) -> np.ndarray:
    lengths = np.ones(self.vocab_size, np.float32)
    lengths[self.eos_id] = 0.0
    return lengths

  def __repr__(self):
    return "ByteTokenizer(vocab_size=257, eos_id=256)"


# Tried in order when no eos_token is given.
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>")


def _byte_level_decoder() -> dict[str, int]:
  """GPT-2's printable-character alphabet for bytes (inverse of `bytes_to_unicode`)."""
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
      range(ord("®"), ord("ÿ") + 1))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return {chr(c): b for b, c in zip(bs, cs)}


_BYTE_FALLBACK = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


class HFTokenizer:
  """A Hugging Face `tokenizer.json`, loaded with the `tokenizers` library.

  Special tokens written literally in the text (e.g. "<|endoftext|>" inside a source
  file) are encoded as plain text, so only the corpus loader inserts EOS.
  """

  def __init__(self, path: str, eos_token: str | None = None):
    from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
    try:
      self._tok = Tokenizer.from_file(path)
    except Exception as e:  # the library raises plain Exceptions on bad files
      raise DataError(f"could not load tokenizer file '{path}': {e}") from None
    self._tok.encode_special_tokens = True
    self.path, self.name = path, os.path.basename(path)
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    candidates = (eos_token,) if eos_token else EOS_CANDIDATES
    found = [(c, self._tok.token_to_id(c)) for c in candidates]
    found = [(c, i) for c, i in found if i is not None]
    if not found:
      raise DataError(f"tokenizer '{path}' has no EOS token among {list(candidates)}; set "
                      "data.eos_token to the token that separates documents")
    self.eos_token, self.eos_id = found[0]
    with open(path, "rb") as f:
      raw = f.read()
    self._spec = json.loads(raw)
    self.identity = f"hf-{hashlib.sha256(raw).hexdigest()[:16]}-eos{self.eos_id}"
    self._dtype = np.uint16 if self.vocab_size <= 65536 else np.uint32

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, self._dtype)

  def encode_bytes(self, data: bytes) -> np.ndarray:
    return self.encode(data.decode("utf-8", errors="replace"))

  def encode_batch(self, docs: list[bytes]) -> list[np.ndarray]:
    texts = [d.decode("utf-8", errors="replace") for d in docs]
    encs = self._tok.encode_batch(texts, add_special_tokens=False)
    return [np.asarray(e.ids, self._dtype) for e in encs]

  def decode(self, ids) -> str:
    ids = np.asarray(ids).reshape(-1)
    return self._tok.decode([int(i) for i in ids if 0 <= i < self.vocab_size])

  @functools.cached_property
  def token_byte_lengths(self) -> np.ndarray:
    """UTF-8 bytes per token; special (added) tokens count 0.

    Exact for byte-level BPE vocabularies (GPT-2 / Llama-3 style: each character of a
    token string stands for one byte, so partial UTF-8 characters count correctly) and
    for byte-fallback tokens "<0xAB>". Otherwise each token is decoded alone (with the
    SentencePiece "▁" counted as a space), which is approximate: e.g. WordPiece
    continuation pieces and whitespace that decoders add or strip between tokens.
    """
    byte_level = "ByteLevel" in json.dumps(self._spec.get("decoder"))
    inverse = _byte_level_decoder() if byte_level else {}
    special = {t.get("id") for t in self._spec.get("added_tokens", []) if t.get("special")}
    lengths = np.zeros(self.vocab_size, np.float32)
    for i in range(self.vocab_size):
      piece = self._tok.id_to_token(i)
      if piece is None or i in special:
        continue
      if byte_level and all(c in inverse for c in piece):
        lengths[i] = len(piece)
      elif _BYTE_FALLBACK.match(piece):
        lengths[i] = 1
      elif "▁" in piece:
        lengths[i] = len(piece.replace("▁", " ").encode("utf-8"))
      else:
        lengths[i] = len(self._tok.decode([i], skip_special_tokens=False).encode("utf-8"))
    lengths[self.eos_id] = 0.0
    return lengths

  def __repr__(self):
    return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size}, eos={self.eos_token!r})"


def load_tokenizer(spec: str, eos_token: str | None = None, cache_dir: str | None = None):
  """'byte' -> ByteTokenizer; a tokenizer.json path (or a folder holding one) -> HFTokenizer;
  'bpe:N' -> the built-in corpus's BPE of N tokens (effjax/data/bpe.py; trained into
  cache_dir's tokenizers/ folder on first use).

  eos_token: for HF tokenizers, the token string that separates documents; default:
  the first of EOS_CANDIDATES the vocabulary has.
  """
  if spec == "byte":
    return ByteTokenizer()
  from effjax.data import bpe  # pylint: disable=g-import-not-at-top
  spec = bpe.resolve_spec(spec, cache_dir)
  path = os.path.expanduser(spec)
  if os.path.isdir(path) and os.path.isfile(os.path.join(path, "tokenizer.json")):
    path = os.path.join(path, "tokenizer.json")
  if path.endswith(".json"):
    if not os.path.isfile(path):
      raise DataError(f"tokenizer file '{spec}' (data.tokenizer) not found; data.tokenizer "
                      f"must be {TOKENIZER_CHOICES}")
    return HFTokenizer(path, eos_token)
  raise DataError(f"data.tokenizer must be {TOKENIZER_CHOICES}; got {spec!r}")

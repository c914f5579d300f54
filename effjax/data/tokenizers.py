"""Tokenizers: byte-level (default) and Hugging Face tokenizer.json files.

Every tokenizer exposes vocab_size, eos_id, encode, decode and token_byte_lengths
(UTF-8 bytes each token stands for; used for bits-per-byte).
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

from effjax.data.errors import DataError


class ByteTokenizer:
  """Ids 0..255 are raw UTF-8 bytes; 256 is EOS, the document separator (0 bytes)."""

  name = "byte"
  vocab_size = 257
  eos_id = 256

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.uint16)

  def encode_bytes(self, data: bytes) -> np.ndarray:
    return np.frombuffer(data, np.uint8).astype(np.uint16)

  def decode(self, ids) -> str:
    ids = np.asarray(ids).reshape(-1)
    return bytes(int(i) for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

  @property
  def token_byte_lengths(self) -> np.ndarray:
    lengths = np.ones(self.vocab_size, np.float32)
    lengths[self.eos_id] = 0.0
    return lengths

  @property
  def identity(self) -> str:
    return "byte-v1"


_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]")


class HFTokenizer:
  """A Hugging Face `tokenizer.json` (loaded with the `tokenizers` library)."""

  def __init__(self, path: str, eos_token: str | None = None):
    from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
    try:
      self._tok = Tokenizer.from_file(path)
    except Exception as e:  # the library raises plain Exceptions on bad files
      raise DataError(f"could not load tokenizer file '{path}': {e}") from None
    self.path, self.name = path, os.path.basename(path)
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    candidates = (eos_token,) if eos_token else _EOS_CANDIDATES
    ids = [self._tok.token_to_id(c) for c in candidates]
    found = [i for i in ids if i is not None]
    if not found:
      raise DataError(f"tokenizer '{path}' has no EOS token among {list(candidates)}; set "
                      "data.eos_token to the token that separates documents")
    self.eos_id = found[0]
    with open(path, "rb") as f:
      self._hash = hashlib.sha256(f.read()).hexdigest()[:16]

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.uint32)

  def encode_bytes(self, data: bytes) -> np.ndarray:
    return self.encode(data.decode("utf-8", errors="replace"))

  def decode(self, ids) -> str:
    return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)
                             if 0 <= i < self.vocab_size])

  @property
  def token_byte_lengths(self) -> np.ndarray:
    """UTF-8 length of each token decoded alone. Approximate for byte-level BPE pieces
    that are partial characters (they decode to U+FFFD, counted as 3 bytes)."""
    if not hasattr(self, "_lengths"):
      lengths = np.array([len(self._tok.decode([i]).encode("utf-8"))
                          for i in range(self.vocab_size)], np.float32)
      lengths[self.eos_id] = 0.0
      self._lengths = lengths
    return self._lengths

  @property
  def identity(self) -> str:
    return f"hf-{self._hash}"


def load_tokenizer(spec: str, eos_token: str | None = None):
  """'byte' -> ByteTokenizer; a path to a tokenizer.json -> HFTokenizer."""
  if spec == "byte":
    return ByteTokenizer()
  if spec.endswith(".json"):
    if not os.path.isfile(spec):
      raise DataError(f"tokenizer file '{spec}' (data.tokenizer) not found")
    return HFTokenizer(spec, eos_token)
  raise DataError(f"data.tokenizer must be 'byte' or a path to a tokenizer.json file; got {spec!r}")

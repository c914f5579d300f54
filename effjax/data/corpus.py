"""Corpora as flat token arrays: the built-in corpus, text files, and token shards.

Documents are joined with the tokenizer's EOS id between them. Every corpus carries a
fingerprint (sha256 over its file names and contents plus the tokenizer identity), so
a result can say exactly what it trained on.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import os
import sysconfig
import tempfile

import numpy as np

from effjax.data.errors import DataError

# Directories of the standard library left out of the built-in corpus: test suites (much
# generated or adversarial data), IDLE, lib2to3's test data, demos, caches, installed
# third-party packages.
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "idlelib",
                  "lib2to3", "turtledemo", "__pycache__", "ensurepip"}


@dataclasses.dataclass
class Corpus:
  name: str
  train_tokens: np.ndarray
  val_tokens: np.ndarray
  fingerprint: str
  num_files_train: int
  num_files_val: int
  num_bytes_train: int
  num_bytes_val: int
  description: str = ""


def is_validation(rel_path: str, val_percent: int) -> bool:
  """A file is in the validation split iff sha1(path) mod 100 < val_percent: stable under
  adding or removing other files and independent of file order."""
  h = int(hashlib.sha1(rel_path.encode("utf-8")).hexdigest(), 16)
  return h % 100 < val_percent


def builtin_corpus_files() -> tuple[str, list[str]]:
  """(stdlib root, sorted relative POSIX paths of the .py files in the built-in corpus).

  The running interpreter's standard-library sources (including the documentation
  topics in pydoc_data/topics.py), minus _EXCLUDED_DIRS anywhere in the path.
  """
  root = sysconfig.get_paths()["stdlib"]
  files = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDED_DIRS)
    for name in filenames:
      if name.endswith(".py"):
        rel = os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/")
        files.append(rel)
  return root, sorted(files)


def _cache_dir(cache_dir: str | None) -> str:
  return cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "effjax", "corpora")


def _save_npy_atomic(path: str, array: np.ndarray) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
  with os.fdopen(fd, "wb") as f:
    np.save(f, array)
  os.replace(tmp, path)  # atomic: concurrent writers race harmlessly


def _token_dtype(vocab_size: int):
  return np.uint16 if vocab_size <= 65536 else np.uint32


def _tokenize_documents(docs: list[bytes], tokenizer) -> np.ndarray:
  """Tokenises documents and joins them with EOS (one EOS between documents)."""
  dtype = _token_dtype(tokenizer.vocab_size)
  parts = []
  eos = np.asarray([tokenizer.eos_id], dtype)
  for i, doc in enumerate(docs):
    if i:
      parts.append(eos)
    parts.append(np.asarray(tokenizer.encode_bytes(doc), dtype))
  return np.concatenate(parts) if parts else np.zeros((0,), dtype)


def _load_text_files(name: str, rel_and_abs: list[tuple[str, str]], tokenizer, val_percent: int,
                     cache_dir: str | None, description: str) -> Corpus:
  hasher = hashlib.sha256(tokenizer.identity.encode())
  train_docs, val_docs = [], []
  for rel, path in rel_and_abs:
    try:
      with open(path, "rb") as f:
        data = f.read()
    except OSError as e:
      raise DataError(f"cannot read '{path}': {e}") from None
    hasher.update(rel.encode() + b"\0" + len(data).to_bytes(8, "little") + data)
    (val_docs if is_validation(rel, val_percent) else train_docs).append(data)
  if len(rel_and_abs) == 1 or not val_docs or not train_docs:
    # Too few files for a file-level split: split the joined text at a line boundary.
    joined = b"\n".join(train_docs + val_docs)
    cut = len(joined) - len(joined) * val_percent // 100
    cut = joined.rfind(b"\n", 0, cut) + 1 or cut
    train_docs, val_docs = [joined[:cut]], [joined[cut:]]
  n_train_bytes = sum(map(len, train_docs))
  n_val_bytes = sum(map(len, val_docs))
  if n_train_bytes == 0:
    raise DataError(f"corpus '{name}' is empty: {[p for _, p in rel_and_abs][:5]}")
  fingerprint = hasher.hexdigest()
  cache = os.path.join(_cache_dir(cache_dir), f"{name}-{fingerprint[:24]}")
  try:
    train = np.load(cache + "-train.npy")
    val = np.load(cache + "-val.npy")
  except (OSError, ValueError):
    train = _tokenize_documents(train_docs, tokenizer)
    val = _tokenize_documents(val_docs, tokenizer)
    try:
      _save_npy_atomic(cache + "-train.npy", train)
      _save_npy_atomic(cache + "-val.npy", val)
    except OSError:
      pass  # caching is an optimisation only
  return Corpus(name=name, train_tokens=train, val_tokens=val, fingerprint=fingerprint,
                num_files_train=len(train_docs), num_files_val=len(val_docs),
                num_bytes_train=n_train_bytes, num_bytes_val=n_val_bytes, description=description)


def _expand(paths) -> list[str]:
  if isinstance(paths, str):
    paths = [p.strip() for p in paths.split(",") if p.strip()]
  if not paths:
    raise DataError("no data paths given (data.paths)")
  files = []
  for pattern in paths:
    matches = sorted(glob.glob(os.path.expanduser(pattern)))
    if not matches:
      raise DataError(f"no file matches '{pattern}' (data.paths)")
    files += [m for m in matches if os.path.isfile(m)]
  return sorted(dict.fromkeys(files))


# llm.c / FineWeb token shards: 256 int32 header (magic, version, num_tokens), then tokens.
_SHARD_MAGIC, _HEADER_INTS = 20240520, 256


def read_token_shard(path: str, dtype: str, vocab_size: int) -> np.ndarray:
  """A flat uint16/uint32 token file, with or without the llm.c header."""
  itemsize = np.dtype(dtype).itemsize
  size = os.path.getsize(path)
  header = np.fromfile(path, np.int32, count=_HEADER_INTS) if size >= 4 * _HEADER_INTS else None
  if header is not None and header[0] == _SHARD_MAGIC:
    count = int(header[2])
    itemsize = 2 if header[1] == 1 else itemsize  # llm.c version 1 stores uint16
    expected = 4 * _HEADER_INTS + count * itemsize
    if size != expected:
      raise DataError(f"truncated shard '{path}': header says {count} tokens "
                      f"({expected} bytes), file has {size} bytes")
    tokens = np.fromfile(path, np.uint16 if itemsize == 2 else np.uint32, offset=4 * _HEADER_INTS)
  else:
    if size % itemsize:
      raise DataError(f"truncated shard '{path}': {size} bytes is not a multiple of the "
                      f"{dtype} size {itemsize} (data.token_dtype)")
    tokens = np.fromfile(path, dtype)
  if tokens.size == 0:
    raise DataError(f"token shard '{path}' is empty")
  top = int(tokens.max())
  if top >= vocab_size:
    raise DataError(f"token id {top} in '{path}' is >= the tokenizer's vocabulary size "
                    f"{vocab_size} (data.tokenizer)")
  return tokens


def load_corpus(corpus: str, paths, tokenizer, *, val_percent: int = 5,
                token_dtype: str = "uint16", cache_dir: str | None = None) -> Corpus:
  """corpus: 'builtin' | 'text' (files/globs) | 'tokens' (token shards)."""
  if corpus == "builtin":
    root, files = builtin_corpus_files()
    if not files:
      raise DataError(f"the built-in corpus found no .py files under '{root}'")
    return _load_text_files("builtin", [(f, os.path.join(root, f)) for f in files], tokenizer,
                            val_percent, cache_dir,
                            f"Python standard library sources under {root} ({len(files)} files)")
  if corpus == "text":
    files = _expand(paths)
    common = os.path.commonpath(files) if len(files) > 1 else os.path.dirname(files[0])
    rel = [(os.path.relpath(f, common).replace(os.sep, "/"), f) for f in files]
    return _load_text_files("text", rel, tokenizer, val_percent, cache_dir,
                            f"{len(files)} text files under {common}")
  if corpus == "tokens":
    files = _expand(paths)
    val_files = [f for f in files if "val" in os.path.basename(f)] or files[-1:]
    train_files = [f for f in files if f not in val_files] or files
    hasher = hashlib.sha256(tokenizer.identity.encode())
    arrays = {}
    for f in files:
      arrays[f] = read_token_shard(f, token_dtype, tokenizer.vocab_size)
      hasher.update(os.path.basename(f).encode() + b"\0" + arrays[f].tobytes())
    eos = np.asarray([tokenizer.eos_id], arrays[files[0]].dtype)
    join = lambda fs: np.concatenate([x for f in fs for x in (arrays[f], eos)][:-1])
    return Corpus(name="tokens", train_tokens=join(train_files), val_tokens=join(val_files),
                  fingerprint=hasher.hexdigest(), num_files_train=len(train_files),
                  num_files_val=len(val_files), num_bytes_train=0, num_bytes_val=0,
                  description=f"{len(files)} token shards")
  raise DataError(f"data.corpus must be one of builtin, text, tokens; got {corpus!r}")

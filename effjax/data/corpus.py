"""Corpora as flat 1-D token arrays: the built-in corpus, text files, and token shards.

  load_corpus("builtin", None, tok)            Python's standard library, nothing downloaded
  load_corpus("text", "data/*.txt", tok)       plain text files or globs (comma separated)
  load_corpus("tokens", "fw/*.bin", tok)       pre-tokenised uint16/uint32 shards (llm.c format)

Text documents (one per file) are joined with the tokenizer's EOS between them. Every
corpus has a fingerprint (sha256 over the tokenizer identity, then each file's relative
name, length and bytes in corpus order), computed before any tokenising, so a run
records exactly what it trained on (with data.val_percent from its config) and the
tokenised arrays are cached under (fingerprint, val_percent).

Train/validation split, text corpora: by file, a file is validation iff
sha1(relative path) mod 100 < val_percent, so a file's side never depends on file order
or on which other files exist. When that leaves one side empty (e.g. a single file),
the last val_percent of the bytes (cut at a line boundary) becomes validation instead.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import os
import re
import sysconfig
import tempfile

import numpy as np

from effjax.data.errors import DataError

CORPUS_CHOICES = ("builtin", "text", "tokens")

# Built-in corpus rule: every "*.py" file under the running interpreter's stdlib directory
# (sysconfig.get_paths()["stdlib"]; pydoc_data/topics.py carries the documentation
# topics), skipping any file with one of these names as a directory component of its
# path: installed third-party packages, test suites (much generated or deliberately
# malformed data), IDLE, lib2to3 (incl. its test data), demos, caches, bundled wheels.
BUILTIN_EXCLUDED_DIRS = frozenset({
    "site-packages", "dist-packages", "test", "tests", "idle_test", "idlelib", "lib2to3",
    "turtledemo", "__pycache__", "ensurepip"})


@dataclasses.dataclass
class Corpus:
  """A tokenised corpus. Token arrays are 1-D, uint16 (vocab <= 65536) or uint32."""
  name: str
  train_tokens: np.ndarray
  val_tokens: np.ndarray
  fingerprint: str
  num_files_train: int
  num_files_val: int
  num_bytes_train: int
  num_bytes_val: int
  description: str = ""


# ---------------------------------------------------------------------------- helpers

def is_validation(rel_path: str, val_percent: float) -> bool:
  """sha1(rel_path) mod 100 < val_percent: independent of file order and other files."""
  h = int(hashlib.sha1(rel_path.encode("utf-8")).hexdigest(), 16)
  return h % 100 < val_percent


def token_dtype_for(vocab_size: int):
  return np.uint16 if vocab_size <= 65536 else np.uint32


def default_cache_dir() -> str:
  return os.path.join(os.path.expanduser("~"), ".cache", "effjax", "corpora")


def _save_npy_atomic(path: str, array: np.ndarray) -> None:
  """Writes to a temp file then renames: concurrent writers race harmlessly."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".npy")
  try:
    with os.fdopen(fd, "wb") as f:
      np.save(f, array)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _load_cached(prefix: str, dtype) -> tuple[np.ndarray, np.ndarray] | None:
  try:
    arrays = tuple(np.load(f"{prefix}-{split}.npy") for split in ("train", "val"))
  except (OSError, ValueError, EOFError):
    return None
  if any(a.ndim != 1 or a.dtype != dtype for a in arrays):
    return None
  return arrays


def _join_tokens(parts: list[np.ndarray], eos_id: int, dtype) -> np.ndarray:
  """Concatenates documents with one EOS between consecutive ones (empty ones included)."""
  if not parts:
    return np.zeros((0,), dtype)
  out = np.empty(sum(p.size for p in parts) + len(parts) - 1, dtype)
  pos = 0
  for i, p in enumerate(parts):
    if i:
      out[pos] = eos_id
      pos += 1
    out[pos:pos + p.size] = p
    pos += p.size
  return out


def expand_paths(paths) -> list[tuple[str, str]]:
  """Files named by paths/globs -> [(relative POSIX name, absolute path)], sorted.

  paths: a list, or one string with comma-separated entries; "**" recurses. The
  relative name of a file is taken from the fixed (glob-free) leading directories of the
  pattern that matched it, e.g. "data/**/*.txt" -> "sub/a.txt", so it does not depend on
  the other patterns or on where the data lives.
  """
  if isinstance(paths, str):
    paths = [p.strip() for p in paths.split(",")]
  paths = [p for p in (paths or []) if p]
  if not paths:
    raise DataError("no data paths given (data.paths): name files or globs")
  seen: dict[str, str] = {}
  for pattern in paths:
    expanded = os.path.expanduser(pattern)
    if not glob.has_magic(expanded):
      if os.path.isdir(expanded):
        raise DataError(f"'{pattern}' (data.paths) is a directory; give files or a glob such "
                        f"as '{os.path.join(pattern, '*.txt')}'")
      if not os.path.isfile(expanded):
        raise DataError(f"data file '{pattern}' (data.paths) not found")
      matches = [expanded]
      root = os.path.dirname(os.path.abspath(expanded))
    else:
      matches = [m for m in glob.glob(expanded, recursive=True) if os.path.isfile(m)]
      if not matches:
        raise DataError(f"no file matches '{pattern}' (data.paths)")
      parts = os.path.abspath(expanded).split(os.sep)
      fixed = []
      for p in parts[:-1]:
        if glob.has_magic(p):
          break
        fixed.append(p)
      root = os.sep.join(fixed) or os.sep
    for m in matches:
      absolute = os.path.abspath(m)
      seen.setdefault(absolute, os.path.relpath(absolute, root).replace(os.sep, "/"))
  return sorted(((rel, a) for a, rel in seen.items()))


# ---------------------------------------------------------------------------- text corpora

def builtin_corpus_root() -> str:
  """The running interpreter's standard-library directory."""
  return sysconfig.get_paths()["stdlib"]


def builtin_corpus_files(root: str | None = None) -> list[str]:
  """Sorted relative POSIX paths of the built-in corpus (see BUILTIN_EXCLUDED_DIRS)."""
  root = root or builtin_corpus_root()
  files = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in BUILTIN_EXCLUDED_DIRS]
    for name in filenames:
      if name.endswith(".py"):
        rel = os.path.relpath(os.path.join(dirpath, name), root)
        files.append(rel.replace(os.sep, "/"))
  return sorted(files)


def _read(path: str) -> bytes:
  try:
    with open(path, "rb") as f:
      return f.read()
  except OSError as e:
    raise DataError(f"cannot read data file '{path}': {e}") from None


def _split_docs(docs: list[tuple[str, bytes]], val_percent: float):
  """(train docs, val docs): by file hash; else the last val_percent of bytes."""
  val = [d for n, d in docs if is_validation(n, val_percent)]
  train = [d for n, d in docs if not is_validation(n, val_percent)]
  if val_percent <= 0 or (val and train):
    return train, val
  # Too few files for a by-file split: cut the stream (in file order) so the last
  # val_percent of the bytes are validation, at a line boundary inside the cut file.
  data = [d for _, d in docs]
  total = sum(map(len, data))
  cut = total - int(total * val_percent / 100)
  start = 0
  for i, d in enumerate(data):
    if start + len(d) >= cut and d:
      at = cut - start
      nl = d.rfind(b"\n", 0, at)
      at = nl + 1 if nl >= 0 else at
      head, tail = d[:at], d[at:]
      return data[:i] + ([head] if head else []), ([tail] if tail else []) + data[i + 1:]
    start += len(d)
  return data, []


def _load_text(name: str, docs_named: list[tuple[str, str]], tokenizer, val_percent: float,
               cache_dir: str | None, description: str) -> Corpus:
  """docs_named: [(relative name, absolute path)] in corpus order."""
  hasher = hashlib.sha256(tokenizer.identity.encode())
  docs = []
  for rel, path in docs_named:
    data = _read(path)
    hasher.update(rel.encode() + b"\0" + len(data).to_bytes(8, "little") + data)
    docs.append((rel, data))
  if not any(d for _, d in docs):
    names = [p for _, p in docs_named]
    raise DataError(f"corpus '{name}' is empty (0 bytes) in {names[:5]}"
                    f"{' ...' if len(names) > 5 else ''}")
  train_docs, val_docs = _split_docs(docs, val_percent)
  fingerprint = hasher.hexdigest()
  dtype = token_dtype_for(tokenizer.vocab_size)
  prefix = os.path.join(cache_dir or default_cache_dir(),
                        f"{name}-{fingerprint[:24]}-val{float(val_percent):g}")
  cached = _load_cached(prefix, dtype)
  if cached is None:
    train = _join_tokens(tokenizer.encode_batch(train_docs), tokenizer.eos_id, dtype)
    val = _join_tokens(tokenizer.encode_batch(val_docs), tokenizer.eos_id, dtype)
    try:
      _save_npy_atomic(prefix + "-train.npy", train)
      _save_npy_atomic(prefix + "-val.npy", val)
    except OSError:
      pass  # the cache is an optimisation only
  else:
    train, val = cached
  return Corpus(name=name, train_tokens=train, val_tokens=val, fingerprint=fingerprint,
                num_files_train=len(train_docs), num_files_val=len(val_docs),
                num_bytes_train=sum(map(len, train_docs)),
                num_bytes_val=sum(map(len, val_docs)), description=description)


# ---------------------------------------------------------------------------- token shards

# llm.c shards: a 256 x int32 header (magic, version, num_tokens, 0...), then the tokens.
# magic -> token dtype: 20240520 GPT-2 (version 1, uint16), 20240801 Llama-3 (version 7,
# uint32).
SHARD_MAGICS = {20240520: np.uint16, 20240801: np.uint32}
_HEADER_BYTES = 256 * 4
_VAL_NAME = re.compile(r"(?<![a-z])val(id|idation)?(?![a-z])", re.IGNORECASE)


def read_token_shard(path: str, dtype: str, vocab_size: int) -> np.ndarray:
  """A flat token file, memory-mapped: llm.c header (dtype from its magic) or raw `dtype`."""
  if dtype not in ("uint16", "uint32"):
    raise DataError(f"data.token_dtype must be uint16 or uint32; got {dtype!r}")
  try:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      head = f.read(_HEADER_BYTES)
  except OSError as e:
    raise DataError(f"cannot read token shard '{path}': {e}") from None
  magic = int(np.frombuffer(head[:4], np.int32)[0]) if len(head) >= 4 else None
  if magic in SHARD_MAGICS:
    if len(head) < _HEADER_BYTES:
      raise DataError(f"truncated shard '{path}': {size} bytes, shorter than the "
                      f"{_HEADER_BYTES}-byte header")
    header = np.frombuffer(head, np.int32)
    np_dtype, count, offset = np.dtype(SHARD_MAGICS[magic]), int(header[2]), _HEADER_BYTES
    expected = offset + count * np_dtype.itemsize
    if size != expected:
      raise DataError(f"truncated shard '{path}': header says {count} tokens "
                      f"({expected} bytes with header), file has {size} bytes")
  else:
    np_dtype, offset = np.dtype(dtype), 0
    if size % np_dtype.itemsize:
      raise DataError(f"truncated shard '{path}': {size} bytes is not a multiple of the "
                      f"{dtype} size {np_dtype.itemsize} (data.token_dtype)")
    count = size // np_dtype.itemsize
  if count == 0:
    raise DataError(f"token shard '{path}' is empty (0 tokens)")
  tokens = np.memmap(path, np_dtype, mode="r", offset=offset, shape=(count,))
  top = int(tokens.max())
  if top >= vocab_size:
    where = int(np.argmax(tokens >= vocab_size))
    raise DataError(f"token id {top} in '{path}' (first bad id at index {where}) is >= the "
                    f"tokenizer's vocabulary size {vocab_size} (data.tokenizer)")
  return tokens


def _prepared_globs(paths, tokenizer) -> list[str]:
  """A directory written by effjax.data.prepare (it has manifest.json) -> its shards' glob,
  after checking that it was tokenised with `tokenizer`."""
  if isinstance(paths, str):
    paths = [p.strip() for p in paths.split(",")]
  out = []
  for p in paths or []:
    manifest = os.path.join(os.path.expanduser(p), "manifest.json")
    if p and os.path.isfile(manifest):
      import json  # pylint: disable=g-import-not-at-top
      with open(manifest) as f:
        settings = json.load(f).get("settings", {})
      if settings.get("tokenizer_identity") not in (None, tokenizer.identity):
        raise DataError(f"'{p}' was prepared with tokenizer '{settings.get('tokenizer')}' "
                        f"({settings.get('tokenizer_identity')}), not {tokenizer.identity} "
                        "(data.tokenizer); prepare it again or set data.tokenizer to match")
      p = os.path.join(p, "*.bin")
    out.append(p)
  return out


def _load_tokens(paths, tokenizer, val_percent: float, token_dtype: str) -> Corpus:
  """Shards concatenated in sorted order, as is: the prep scripts already put EOS at
  document boundaries, and documents may continue across shards. Validation: the files
  whose name has the word "val"/"valid"/"validation"; else the last file; with a single
  file, its last val_percent of tokens (from the first EOS at or after the cut if any)."""
  files = expand_paths(_prepared_globs(paths, tokenizer))
  hasher = hashlib.sha256(tokenizer.identity.encode())
  arrays = {}
  for rel, path in files:
    arrays[path] = read_token_shard(path, token_dtype, tokenizer.vocab_size)
    hasher.update(rel.encode() + b"\0" + arrays[path].nbytes.to_bytes(8, "little"))
    hasher.update(arrays[path])
  out_dtype = max((a.dtype for a in arrays.values()), key=lambda d: d.itemsize)

  def join(ps):  # one file stays memory-mapped; several are concatenated in memory
    if not ps:
      return np.zeros((0,), out_dtype)
    joined = arrays[ps[0]] if len(ps) == 1 else np.concatenate([arrays[p] for p in ps])
    return joined.astype(out_dtype, copy=False)

  names = [p for _, p in files]
  val_files = [p for rel, p in files if _VAL_NAME.search(os.path.basename(rel))] or names[-1:]
  train_files = [p for p in names if p not in val_files]
  if train_files:
    train, val = join(train_files), join(val_files)
  else:  # one file (or only val files): split off its tail
    tokens = join(names)
    cut = tokens.size - int(tokens.size * val_percent / 100)
    eos_after = np.flatnonzero(tokens[cut:] == tokenizer.eos_id)
    cut += int(eos_after[0]) if eos_after.size else 0
    train, val = tokens[:cut], tokens[cut:]
    train_files, val_files = names, []
  lengths = tokenizer.token_byte_lengths
  nbytes = lambda t: int(np.bincount(t, minlength=lengths.size) @ lengths) if t.size else 0
  return Corpus(name="tokens", train_tokens=train, val_tokens=val,
                fingerprint=hasher.hexdigest(), num_files_train=len(train_files),
                num_files_val=len(val_files), num_bytes_train=nbytes(train),
                num_bytes_val=nbytes(val),
                description=f"{len(names)} token shards: {', '.join(r for r, _ in files[:4])}"
                            f"{' ...' if len(names) > 4 else ''}")


# ---------------------------------------------------------------------------- entry point

def load_corpus(corpus: str, paths, tokenizer, *, val_percent: float = 5,
                token_dtype: str = "uint16", cache_dir: str | None = None) -> Corpus:
  """Loads a corpus as train/validation token arrays.

  Args:
    corpus: "builtin" | "text" | "tokens".
    paths: files/globs (list or comma-separated string) for "text" and "tokens".
    tokenizer: from `load_tokenizer`.
    val_percent: share of files (text) or tokens (a single file) for validation.
    token_dtype: dtype of headerless token shards ("uint16" | "uint32").
    cache_dir: where tokenised text corpora are cached (default ~/.cache/effjax/corpora).
  """
  if not 0 <= val_percent < 100:
    raise DataError(f"data.val_percent must be in [0, 100); got {val_percent}")
  if corpus == "builtin":
    root = builtin_corpus_root()
    files = builtin_corpus_files(root)
    if not files:
      raise DataError(f"the built-in corpus found no .py files under '{root}'")
    return _load_text("builtin", [(f, os.path.join(root, f)) for f in files], tokenizer,
                      val_percent, cache_dir,
                      f"Python standard library sources under {root} ({len(files)} files)")
  if corpus == "text":
    files = expand_paths(paths)
    return _load_text("text", files, tokenizer, val_percent, cache_dir,
                      f"{len(files)} text files: {', '.join(r for r, _ in files[:4])}"
                      f"{' ...' if len(files) > 4 else ''}")
  if corpus == "tokens":
    return _load_tokens(paths, tokenizer, val_percent, token_dtype)
  raise DataError(f"data.corpus must be one of {', '.join(CORPUS_CHOICES)}; got {corpus!r}")

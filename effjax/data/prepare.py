"""Tokenize a corpus once into llm.c token shards plus a manifest.

  python -m effjax.data.prepare --source='data/*.jsonl.gz' --tokenizer=byte --out=prepared/web
  python -m effjax.data.prepare --source=hf:HuggingFaceFW/fineweb-edu --split=train \
      --tokenizer=gpt2/tokenizer.json --out=prepared/fwe --max_rows=100000

Inputs (effjax/data/sources.py): text files (one document each), .jsonl / .jsonl.gz (one
per line, --text_column), .parquet (--text_column; needs pyarrow), Hugging Face datasets
(hf:NAME streamed from the hub, or a save_to_disk directory; needs `datasets`). Both
extras: pip install -e '.[data]'.

Output in --out: train_000000.bin ..., val_000000.bin ... in llm.c format (a 256 x int32
header: magic, version, token count; then uint16 or uint32 tokens), every document
preceded by the tokenizer's EOS; each shard holds exactly --shard_tokens tokens (the last
of a split fewer), so shard boundaries depend only on the token stream. A document goes
to validation iff sha1("name#row") mod 100 < --val_percent (effjax.data.is_validation).
manifest.json records the source, tokenizer, token and document counts, each shard's
sha256 and a fingerprint over them. Train with data.corpus=tokens data.paths=OUT or list
OUT in data.sources.

Resumable: after every batch that completed a shard, progress.json (rows consumed, shards
done) and the partial shards' tokens are saved atomically. Re-running the same command
continues from there and writes byte-identical shards; a finished directory is skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import tempfile
import time

import numpy as np

from effjax.data.corpus import is_validation
from effjax.data.errors import DataError
from effjax.data.sources import open_rows
from effjax.data.tokenizers import load_tokenizer

FORMAT = "effjax-prepared-v1"
MAGIC = {"uint16": (20240520, 1), "uint32": (20240801, 7)}
SPLITS = ("train", "val")


@dataclasses.dataclass(frozen=True)
class PrepareArgs:
  source: str
  out: str
  tokenizer: str = "byte"
  eos_token: str = ""
  text_column: str = "text"
  split: str = "train"
  hf_config: str = ""
  dtype: str = "auto"
  shard_tokens: int = 100_000_000
  val_percent: float = 1.0
  skip_empty: bool = False
  utf8_errors: str = "strict"
  batch_rows: int = 1024
  max_rows: int = 0


def _atomic_write(path: str, write) -> None:
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
  try:
    with os.fdopen(fd, "wb") as f:
      write(f)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_shard(path: str, tokens: np.ndarray, dtype: str) -> str:
  """Writes one llm.c shard atomically; returns the sha256 of its bytes."""
  magic, version = MAGIC[dtype]
  header = np.zeros(256, np.int32)
  header[:3] = magic, version, tokens.size
  body = header.tobytes() + np.ascontiguousarray(tokens, dtype).tobytes()
  _atomic_write(path, lambda f: f.write(body))
  return hashlib.sha256(body).hexdigest()


def _dtype_for(args: PrepareArgs, tokenizer) -> str:
  if args.dtype not in ("auto", "uint16", "uint32"):
    raise DataError(f"--dtype must be auto, uint16 or uint32; got {args.dtype!r}")
  if args.dtype == "uint16" and tokenizer.vocab_size > 65536:
    raise DataError(f"tokenizer '{args.tokenizer}' has {tokenizer.vocab_size} ids: more than "
                    "uint16 holds (65536); pass --dtype=uint32 (or auto)")
  if args.dtype != "auto":
    return args.dtype
  return "uint16" if tokenizer.vocab_size <= 65536 else "uint32"


def _encode_texts(tokenizer, texts: list[str]) -> list[np.ndarray]:
  """Batched encoding; the `tokenizers` library spreads a batch over all cores."""
  if hasattr(tokenizer, "_tok"):  # HFTokenizer: encode the str directly (no bytes round trip)
    encs = tokenizer._tok.encode_batch(texts, add_special_tokens=False)  # pylint: disable=protected-access
    return [np.asarray(e.ids, np.uint32) for e in encs]
  return [tokenizer.encode(t) for t in texts]


class _Split:
  """One split's token buffer and finished shards."""

  def __init__(self, name: str, out: str, dtype: str, shard_tokens: int):
    self.name, self.out, self.dtype, self.shard_tokens = name, out, dtype, shard_tokens
    self.shards: list[dict] = []
    self.documents = 0
    self.parts: list[np.ndarray] = []
    self.pending = 0

  def add(self, eos_id: int, ids: np.ndarray) -> None:
    self.parts.append(np.asarray([eos_id], self.dtype))
    self.parts.append(ids.astype(self.dtype, copy=False))
    self.pending += ids.size + 1
    self.documents += 1

  def flush(self, final: bool = False) -> int:
    """Writes every full shard (and the remainder when final); returns shards written."""
    written = 0
    while self.pending >= self.shard_tokens or (final and self.pending):
      buf = np.concatenate(self.parts)
      n = min(self.shard_tokens, buf.size)
      name = f"{self.name}_{len(self.shards):06d}.bin"
      sha = write_shard(os.path.join(self.out, name), buf[:n], self.dtype)
      self.shards.append({"file": name, "tokens": int(n), "sha256": sha})
      self.parts, self.pending = [buf[n:]], buf.size - n
      written += 1
    return written

  def save_pending(self) -> None:
    buf = np.concatenate(self.parts) if self.parts else np.zeros(0, self.dtype)
    self.parts = [buf]
    _atomic_write(os.path.join(self.out, f"pending-{self.name}.npy"), lambda f: np.save(f, buf))

  def load_pending(self, state: dict) -> None:
    self.shards, self.documents = state["shards"], state["documents"]
    buf = np.load(os.path.join(self.out, f"pending-{self.name}.npy"))
    self.parts, self.pending = [buf.astype(self.dtype)], buf.size

  def state(self) -> dict:
    return {"shards": self.shards, "documents": self.documents}

  @property
  def tokens(self) -> int:
    return sum(s["tokens"] for s in self.shards)


def _settings(args: PrepareArgs, rows, tokenizer, dtype: str) -> dict:
  """Everything the shards depend on: a resume or skip needs all of it unchanged."""
  return {"format": FORMAT, "source": args.source, "source_identity": rows.identity(),
          "tokenizer": args.tokenizer, "tokenizer_identity": tokenizer.identity,
          "eos_id": int(tokenizer.eos_id), "vocab_size": int(tokenizer.vocab_size),
          "dtype": dtype, "text_column": args.text_column, "split": args.split,
          "hf_config": args.hf_config, "shard_tokens": args.shard_tokens,
          "val_percent": args.val_percent, "skip_empty": args.skip_empty,
          "utf8_errors": args.utf8_errors, "max_rows": args.max_rows}


def _read_json(path: str) -> dict | None:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _check_same(existing: dict, settings: dict, out: str, what: str) -> None:
  differ = [k for k in settings if existing.get("settings", {}).get(k) != settings[k]]
  if differ:
    raise DataError(f"--out '{out}' holds a {what} with other settings ({', '.join(differ)}); "
                    "use another --out, or delete it to start over")


class _Progress:
  """tqdm bar over rows (when tqdm is installed and stderr is a terminal) + throughput."""

  def __init__(self, total, initial, quiet):
    self.bar = None
    if not quiet:
      try:
        from tqdm import tqdm  # pylint: disable=g-import-not-at-top
        self.bar = tqdm(total=total, initial=initial, unit="row", dynamic_ncols=True,
                        file=sys.stderr, disable=None)
      except ImportError:
        pass
    self.t0, self.tokens = time.perf_counter(), 0

  def update(self, rows: int, tokens: int) -> None:
    self.tokens += tokens
    if self.bar is not None:
      self.bar.update(rows)
      rate = self.tokens / max(time.perf_counter() - self.t0, 1e-9)
      self.bar.set_postfix_str(f"{rate / 1e6:.2f}M tok/s", refresh=False)

  def close(self) -> float:
    if self.bar is not None:
      self.bar.close()
    return time.perf_counter() - self.t0


def prepare(args: PrepareArgs, *, quiet: bool = False, _stop_after_shards: int = 0) -> dict:
  """Runs (or resumes, or skips) a preparation; returns the manifest.

  _stop_after_shards: tests only; raise KeyboardInterrupt once that many shards were
  written in this call (an interruption right after a progress save).
  """
  say = (lambda *a: None) if quiet else (lambda m: print(m, file=sys.stderr, flush=True))
  if args.shard_tokens < 2:
    raise DataError(f"--shard_tokens must be >= 2; got {args.shard_tokens}")
  if not 0 <= args.val_percent < 100:
    raise DataError(f"--val_percent must be in [0, 100); got {args.val_percent}")
  tokenizer = load_tokenizer(args.tokenizer, eos_token=args.eos_token or None)
  dtype = _dtype_for(args, tokenizer)
  rows = open_rows(args.source, text_column=args.text_column, split=args.split,
                   hf_config=args.hf_config, utf8_errors=args.utf8_errors)
  settings = _settings(args, rows, tokenizer, dtype)
  os.makedirs(args.out, exist_ok=True)
  manifest_path = os.path.join(args.out, "manifest.json")
  progress_path = os.path.join(args.out, "progress.json")
  manifest = _read_json(manifest_path)
  if manifest is not None:
    _check_same(manifest, settings, args.out, "finished preparation")
    say(f"{args.out}: already prepared ({manifest['tokens']:,} tokens); nothing to do")
    return manifest

  splits = {s: _Split(s, args.out, dtype, args.shard_tokens) for s in SPLITS}
  done_rows, skipped = 0, 0
  progress = _read_json(progress_path)
  if progress is not None:
    _check_same(progress, settings, args.out, "partial preparation")
    done_rows, skipped = progress["rows"], progress["skipped_empty"]
    for name, split in splits.items():
      split.load_pending(progress["splits"][name])
    say(f"{args.out}: resuming after row {done_rows:,} "
        f"({sum(len(s.shards) for s in splits.values())} shards done)")

  def save_progress():
    for split in splits.values():
      split.save_pending()
    state = {"settings": settings, "rows": done_rows, "skipped_empty": skipped,
             "splits": {n: s.state() for n, s in splits.items()}}
    _atomic_write(progress_path, lambda f: f.write(json.dumps(state).encode()))

  total = rows.num_rows()
  if args.max_rows:
    total = min(total, args.max_rows) if total is not None else args.max_rows
  bar = _Progress(total, done_rows, quiet)
  written_here = 0
  batch = []

  def run_batch():
    nonlocal done_rows, skipped, written_here
    texts = [r.text for r in batch if r.text is not None]
    encoded = iter(_encode_texts(tokenizer, texts))
    n_tokens = 0
    for r in batch:
      if r.text is None:
        skipped += 1
        continue
      ids = next(encoded)
      split = "val" if is_validation(f"{r.name}#{r.index}", args.val_percent) else "train"
      splits[split].add(tokenizer.eos_id, ids)
      n_tokens += ids.size + 1
    done_rows += len(batch)
    written = sum(s.flush() for s in splits.values())
    bar.update(len(batch), n_tokens)
    batch.clear()
    if written:
      save_progress()
      written_here += written
      if _stop_after_shards and written_here >= _stop_after_shards:
        raise KeyboardInterrupt(f"stopped after {written_here} shards (test)")

  try:
    for row in rows.rows(skip=done_rows):
      if args.max_rows and done_rows + len(batch) >= args.max_rows:
        break
      if row.text is None and not args.skip_empty:
        raise DataError(f"'{row.name}' row {row.index}: empty text (column "
                        f"'{args.text_column}'); pass --skip_empty to drop such rows")
      batch.append(row)
      if len(batch) >= args.batch_rows:
        run_batch()
    if batch:
      run_batch()
  finally:
    seconds = bar.close()
  for split in splits.values():
    split.flush(final=True)
  if not splits["train"].shards:
    raise DataError(f"source '{args.source}' gave no training tokens "
                    f"({done_rows} rows, {skipped} empty)")

  fingerprint = hashlib.sha256(f"{tokenizer.identity}|{dtype}".encode())
  for split in splits.values():
    for shard in split.shards:
      fingerprint.update(f"{split.name}/{shard['file']}:{shard['sha256']}".encode())
  manifest = {
      "settings": settings, "description": rows.description,
      "tokens": sum(s.tokens for s in splits.values()), "rows": done_rows,
      "skipped_empty": skipped, "fingerprint": fingerprint.hexdigest(),
      "splits": {n: {"tokens": s.tokens, "documents": s.documents, "shards": s.shards}
                 for n, s in splits.items()},
  }
  _atomic_write(manifest_path, lambda f: f.write(json.dumps(manifest, indent=1).encode()))
  for path in [progress_path] + [os.path.join(args.out, f"pending-{s}.npy") for s in SPLITS]:
    if os.path.exists(path):
      os.remove(path)
  say(f"{args.out}: {manifest['tokens']:,} tokens ({splits['train'].tokens:,} train / "
      f"{splits['val'].tokens:,} val) from {done_rows:,} rows ({skipped} empty skipped) in "
      f"{len(splits['train'].shards)}+{len(splits['val'].shards)} shards; this run "
      f"{bar.tokens / max(seconds, 1e-9) / 1e6:.2f}M tokens/s; fingerprint "
      f"{manifest['fingerprint'][:12]}")
  return manifest


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  d = PrepareArgs("", "")
  ap.add_argument("--source", required=True, help="files/globs (comma separated), a "
                  "save_to_disk directory, or hf:NAME")
  ap.add_argument("--out", required=True, help="output directory")
  ap.add_argument("--tokenizer", default=d.tokenizer, help="'byte' or a tokenizer.json path")
  ap.add_argument("--eos_token", default=d.eos_token)
  ap.add_argument("--text_column", default=d.text_column)
  ap.add_argument("--split", default=d.split, help="Hugging Face split")
  ap.add_argument("--hf_config", default=d.hf_config, help="Hugging Face config name")
  ap.add_argument("--dtype", default=d.dtype, choices=("auto", "uint16", "uint32"))
  ap.add_argument("--shard_tokens", type=int, default=d.shard_tokens)
  ap.add_argument("--val_percent", type=float, default=d.val_percent)
  ap.add_argument("--skip_empty", action="store_true", help="drop empty rows (default: error)")
  ap.add_argument("--utf8_errors", default=d.utf8_errors, choices=("strict", "replace"))
  ap.add_argument("--batch_rows", type=int, default=d.batch_rows)
  ap.add_argument("--max_rows", type=int, default=d.max_rows, help="0: all rows")
  ap.add_argument("--quiet", action="store_true")
  ns = vars(ap.parse_args(argv))
  quiet = ns.pop("quiet")
  try:
    prepare(PrepareArgs(**ns), quiet=quiet)
  except DataError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("interrupted: rerun the same command to resume", file=sys.stderr)
    return 75
  return 0


if __name__ == "__main__":
  sys.exit(main())

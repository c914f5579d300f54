"""Data benchmark: built-in corpus load time (cold / cached) and pipeline throughput.

  python -m effjax.data.bench [--batch_size=16] [--seq_len=256] [--steps=2000]

Prints a small table; on CPU only ratios within one run mean much (shared machines).
"""

from __future__ import annotations

import argparse
import tempfile
import time

from effjax.data.corpus import load_corpus
from effjax.data.pipeline import make_train_iterator
from effjax.data.tokenizers import load_tokenizer


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batch_size", type=int, default=16)
  ap.add_argument("--seq_len", type=int, default=256)
  ap.add_argument("--steps", type=int, default=2000)
  ap.add_argument("--tokenizer", default="byte")
  args = ap.parse_args(argv)

  tok = load_tokenizer(args.tokenizer)
  with tempfile.TemporaryDirectory() as cache:
    t0 = time.perf_counter()
    corpus = load_corpus("builtin", None, tok, cache_dir=cache)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    load_corpus("builtin", None, tok, cache_dir=cache)
    cached = time.perf_counter() - t0
  print(f"builtin corpus ({tok.identity}): {corpus.num_files_train}/{corpus.num_files_val} files, "
        f"{corpus.num_bytes_train:,}/{corpus.num_bytes_val:,} bytes, "
        f"{corpus.train_tokens.size:,}/{corpus.val_tokens.size:,} tokens (train/val); "
        f"load cold {cold:.2f} s, cached {cached:.2f} s; fingerprint {corpus.fingerprint[:16]}")

  print(f"{'num_threads':>11} {'batches/s':>10} {'tokens/s':>12}")
  for threads in (0, 1, 2):
    it = make_train_iterator(corpus.train_tokens, seq_len=args.seq_len,
                             batch_size=args.batch_size, seed=0, eos_id=tok.eos_id,
                             num_threads=threads)
    next(it)
    t0 = time.perf_counter()
    for _ in range(args.steps):
      next(it)
    dt = time.perf_counter() - t0
    rate = args.steps / dt
    print(f"{threads:>11} {rate:>10.0f} {rate * args.batch_size * args.seq_len:>12,.0f}")


if __name__ == "__main__":
  main()

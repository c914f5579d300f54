"""grain pipeline: packed windows, deterministic shuffling, per-process slices, and a
checkpointable iterator.

Packing: the token stream is cut into consecutive windows of seq_len + 1 tokens (stride
seq_len); each gives inputs = w[:-1], targets = w[1:], so one row holds many documents.
segment_ids (1-based) increment at each EOS in the inputs (EOS opens the next document,
like a BOS) and positions count from 0 within each document; the model uses them to
keep attention and RoPE inside a document.

Multi-process: every process walks the same shuffled order of *global* batches and
reads only its contiguous slice [p * b, (p + 1) * b) of each, so the union over
processes of one step is exactly the single-process global batch.
"""

from __future__ import annotations

import grain
import numpy as np

from effjax.data.errors import DataError


def num_windows(tokens: np.ndarray, seq_len: int) -> int:
  return max((tokens.size - 1) // seq_len, 0)


def pack_windows(tokens: np.ndarray, window_ids: np.ndarray, seq_len: int,
                 eos_id: int | None) -> dict:
  """Rows for the given window indices: inputs, targets, segment_ids, positions [n, L]."""
  offsets = np.asarray(window_ids, np.int64)[:, None] * seq_len + np.arange(seq_len + 1)
  w = tokens[offsets].astype(np.int32)
  inputs, targets = w[:, :-1], w[:, 1:]
  if eos_id is None:
    seg = np.ones_like(inputs)
    pos = np.broadcast_to(np.arange(seq_len, dtype=np.int32), inputs.shape).copy()
  else:
    is_eos = inputs == eos_id
    seg = 1 + np.cumsum(is_eos, axis=1, dtype=np.int32)
    idx = np.arange(seq_len, dtype=np.int32)
    start = np.maximum.accumulate(np.where(is_eos, idx, 0), axis=1)
    pos = idx - start
  return {"inputs": inputs, "targets": targets, "segment_ids": seg.astype(np.int32),
          "positions": pos.astype(np.int32)}


def make_train_iterator(tokens: np.ndarray, *, seq_len: int, batch_size: int, seed: int,
                        process_index: int = 0, process_count: int = 1,
                        eos_id: int | None = None, num_epochs: int | None = None):
  """A checkpointable grain iterator of per-process batches ([batch_size, seq_len] each).

  batch_size is the per-process batch; the global batch is batch_size * process_count.
  The order is a deterministic function of `seed`, reshuffled every epoch.
  """
  n = num_windows(tokens, seq_len)
  global_batch = batch_size * process_count
  if n < global_batch:
    raise DataError(f"training split has {tokens.size} tokens: fewer than one global batch "
                    f"({global_batch} x {seq_len + 1}); use a larger corpus or smaller "
                    "train.batch_size / train.seq_len")
  lo, hi = process_index * batch_size, (process_index + 1) * batch_size
  ds = (grain.MapDataset.range(n).shuffle(seed=seed).repeat(num_epochs)
        .batch(global_batch, drop_remainder=True)
        .map(lambda ids: pack_windows(tokens, np.asarray(ids)[lo:hi], seq_len, eos_id)))
  return iter(ds)


def eval_batches(tokens: np.ndarray, *, seq_len: int, batch_size: int, num_batches: int,
                 process_index: int = 0, process_count: int = 1,
                 eos_id: int | None = None) -> list[dict]:
  """Fixed, non-overlapping windows from the start of the validation stream (no shuffle)."""
  global_batch = batch_size * process_count
  available = num_windows(tokens, seq_len) // global_batch
  if available == 0:
    raise DataError(f"validation split has {tokens.size} tokens; one eval batch needs "
                    f"{global_batch * seq_len + 1}. Raise data.val_percent or lower "
                    "train.eval_batches / train.batch_size")
  out = []
  for b in range(min(num_batches, available)):
    ids = np.arange(b * global_batch, (b + 1) * global_batch)
    out.append(pack_windows(tokens, ids[process_index * batch_size:
                                        (process_index + 1) * batch_size], seq_len, eos_id))
  return out

"""grain pipeline: packed windows, deterministic shuffling, per-process slices, and a
checkpointable iterator.

Packing: the token stream is cut into consecutive windows of seq_len + 1 tokens (stride
seq_len, so consecutive windows share one token); each gives inputs = w[:-1] and
targets = w[1:], so one row holds many documents. segment_ids (1-based) step up at each
EOS in the inputs -- the EOS opens the next document, playing the role of its BOS -- and
positions count from 0 within each segment. The model uses them to keep attention and
RoPE inside a document. A row that starts mid-document starts at segment 1, position 0.

Batches are dicts of int32 [batch_size, seq_len] arrays: inputs, targets, segment_ids,
positions.

Multi-process sharding (ShardInfo): every process walks the same shuffled order of
*global* batches of process_count * batch_size windows and reads only its contiguous
slice [p * batch_size, (p + 1) * batch_size) of each, so the union over processes of
one step's batches is exactly the single-process global batch (the same windows in the
same order), and each process reads only its own windows.

Checkpointing: the iterator is a grain DatasetIterator; `it.get_state()` /
`it.set_state(s)` round-trip exactly, and with Orbax:
  mngr.save(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it), ...))
  mngr.restore(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(it)))
(one small JSON file per process). The state is the position in the stream, so it is
only meaningful for an iterator built with the same tokens, seq_len, batch_size, seed
and sharding.
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np

from effjax.data.errors import DataError


@dataclasses.dataclass(frozen=True)
class ShardInfo:
  """Which slice of every global batch this process reads (see the module docstring)."""
  process_index: int = 0
  process_count: int = 1

  def __post_init__(self):
    if self.process_count < 1 or not 0 <= self.process_index < self.process_count:
      raise DataError(f"bad process sharding: process_index={self.process_index}, "
                      f"process_count={self.process_count}")

  @classmethod
  def from_jax(cls) -> "ShardInfo":
    import jax  # pylint: disable=g-import-not-at-top
    return cls(jax.process_index(), jax.process_count())

  def rows(self, per_process_batch: int) -> slice:
    """This process's rows of a global batch."""
    lo = self.process_index * per_process_batch
    return slice(lo, lo + per_process_batch)


class WindowSource:
  """Random-access source: element i is tokens[i * seq_len : i * seq_len + seq_len + 1]."""

  def __init__(self, tokens: np.ndarray, seq_len: int):
    tokens = np.asarray(tokens) if not isinstance(tokens, np.ndarray) else tokens
    if tokens.ndim != 1:
      raise DataError(f"token stream must be 1-D; got shape {tokens.shape}")
    if seq_len < 1:
      raise DataError(f"seq_len must be >= 1; got {seq_len}")
    self.tokens, self.seq_len = tokens, seq_len

  def __len__(self) -> int:
    return max((self.tokens.size - 1) // self.seq_len, 0)

  def __getitem__(self, i: int) -> np.ndarray:
    start = int(i) * self.seq_len
    return self.tokens[start:start + self.seq_len + 1]

  def windows(self, ids) -> np.ndarray:
    """[len(ids), seq_len + 1] windows (vectorised)."""
    offsets = np.asarray(ids, np.int64)[:, None] * self.seq_len + np.arange(self.seq_len + 1)
    return self.tokens[offsets]

  def __repr__(self):
    return f"WindowSource(num_tokens={self.tokens.size}, seq_len={self.seq_len})"


def num_windows(tokens: np.ndarray, seq_len: int) -> int:
  return max((np.size(tokens) - 1) // seq_len, 0)


def pack(w_BxW: np.ndarray, eos_id: int | None) -> dict:
  """Windows [B, seq_len + 1] -> inputs, targets, segment_ids, positions (int32 [B, seq_len]).

  eos_id=None: no document structure (segment 1, positions 0..seq_len-1 in every row).
  """
  w_BxW = np.asarray(w_BxW).astype(np.int32)
  inputs, targets = w_BxW[:, :-1], w_BxW[:, 1:]
  idx_L = np.arange(inputs.shape[1], dtype=np.int32)
  if eos_id is None:
    seg = np.ones_like(inputs)
    pos = np.broadcast_to(idx_L, inputs.shape).copy()
  else:
    is_eos = inputs == eos_id
    seg = 1 + np.cumsum(is_eos, axis=1, dtype=np.int32)
    start = np.maximum.accumulate(np.where(is_eos, idx_L, 0), axis=1)
    pos = idx_L - start
  return {"inputs": np.ascontiguousarray(inputs), "targets": np.ascontiguousarray(targets),
          "segment_ids": seg.astype(np.int32), "positions": pos.astype(np.int32)}


def pack_windows(tokens: np.ndarray, window_ids, seq_len: int, eos_id: int | None) -> dict:
  """Packed rows for the given window indices of `tokens`."""
  return pack(WindowSource(tokens, seq_len).windows(window_ids), eos_id)


def _stack(windows):
  return np.stack(windows)


def make_train_dataset(tokens: np.ndarray, *, seq_len: int, batch_size: int, seed: int,
                       process_index: int = 0, process_count: int = 1,
                       eos_id: int | None = None,
                       num_epochs: int | None = None) -> grain.MapDataset:
  """The per-process grain MapDataset of packed batches (see make_train_iterator).

  source (windows) -> shuffle(seed) -> repeat(num_epochs) -> batch(batch_size) ->
  [p : steps * P : P] -> map(pack). Global step s, process p reads chunk s * P + p of
  batch_size consecutive shuffled windows, i.e. rows [p * b, (p + 1) * b) of global
  batch s. The shuffle is a bijection per epoch, reseeded every epoch by grain; batches
  may straddle epoch boundaries.
  """
  shard = ShardInfo(process_index, process_count)
  if batch_size < 1:
    raise DataError(f"batch_size must be >= 1; got {batch_size}")
  source = WindowSource(tokens, seq_len)
  global_batch = batch_size * shard.process_count
  if len(source) < global_batch:
    raise DataError(f"training split has {np.size(tokens)} tokens: fewer than one global batch "
                    f"({global_batch} windows of {seq_len} + 1 tokens = "
                    f"{global_batch * seq_len + 1} tokens); use a larger corpus or a smaller "
                    "train.batch_size / train.seq_len")
  ds = (grain.MapDataset.source(source)
        .shuffle(seed=int(seed) % 2**32)
        .repeat(num_epochs)
        .batch(batch_size, drop_remainder=True, batch_fn=_stack))
  steps = len(ds) // shard.process_count
  ds = ds[shard.process_index:steps * shard.process_count:shard.process_count]
  return ds.map(lambda w: pack(w, eos_id))


def make_train_iterator(tokens: np.ndarray, *, seq_len: int, batch_size: int, seed: int,
                        process_index: int = 0, process_count: int = 1,
                        eos_id: int | None = None, num_epochs: int | None = None,
                        num_threads: int = 1, prefetch: int = 4) -> grain.DatasetIterator:
  """A checkpointable grain iterator of this process's training batches.

  Args:
    tokens: the 1-D training token stream.
    seq_len, batch_size: rows are [batch_size, seq_len]; batch_size is per process, the
      global batch is batch_size * process_count.
    seed: the shuffle seed (taken mod 2**32); the order is a deterministic function of it.
    process_index, process_count: see ShardInfo.
    eos_id: the document separator (for segment_ids / positions); None: no documents.
    num_epochs: None repeats forever.
    num_threads, prefetch: grain read threads and batches prefetched ahead. num_threads=0
      reads synchronously in the caller's thread.
  """
  ds = make_train_dataset(tokens, seq_len=seq_len, batch_size=batch_size, seed=seed,
                          process_index=process_index, process_count=process_count,
                          eos_id=eos_id, num_epochs=num_epochs)
  read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
  return iter(ds.to_iter_dataset(read))


def eval_batches(tokens: np.ndarray, *, seq_len: int, batch_size: int, num_batches: int,
                 process_index: int = 0, process_count: int = 1,
                 eos_id: int | None = None) -> list[dict]:
  """Fixed, non-overlapping windows from the start of the validation stream (no shuffle).

  Global eval batch i is windows [i * G, (i + 1) * G) with G = batch_size * process_count;
  this process gets its rows (ShardInfo). Returns min(num_batches, full batches that fit)
  batches; raises DataError if not even one fits.
  """
  shard = ShardInfo(process_index, process_count)
  source = WindowSource(tokens, seq_len)
  global_batch = batch_size * shard.process_count
  available = len(source) // global_batch
  if available == 0:
    raise DataError(f"validation split has {np.size(tokens)} tokens; one eval batch needs "
                    f"{global_batch * seq_len + 1} ({global_batch} x {seq_len} + 1). Raise "
                    "data.val_percent or lower train.eval_batches / train.batch_size")
  rows = shard.rows(batch_size)
  out = []
  for b in range(min(num_batches, available)):
    ids = np.arange(b * global_batch, (b + 1) * global_batch)[rows]
    out.append(pack(source.windows(ids), eos_id))
  return out

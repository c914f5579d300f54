"""Weighted mixtures of corpora (data.sources) and their per-source evaluation.

  data.sources = "builtin:0.8,web=prepared/web:0.2"

Each comma-separated entry is `[name=]spec[:weight]` (weight 1 when omitted; weights are
normalised to sum 1). spec: `builtin`; a directory written by effjax.data.prepare (or a
glob of .bin token shards) -> a token corpus; anything else -> text files/globs. The name
(default: `builtin`, or the file/directory name without extension) labels the source's
eval metrics: eval/<name>/loss and eval/<name>/bpb.

Sampling (grain): each source's windows are shuffled with their own seed (derived from
the run's seed and the source's position) and repeated forever; `MapDataset.mix`
interleaves them in proportion to the weights, deterministically; the mixed stream is
batched and each process takes its slice of every global batch (as in
make_train_dataset). The iterator's state is a position in that random-access stream,
so checkpoints restore it exactly.
"""

from __future__ import annotations

import dataclasses
import glob as glob_lib
import hashlib
import math
import os
import re

import grain
import numpy as np

from effjax.data.corpus import Corpus, load_corpus
from effjax.data.errors import DataError
from effjax.data.pipeline import ShardInfo, WindowSource, _stack, pack

_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclasses.dataclass(frozen=True)
class SourceSpec:
  name: str
  spec: str
  weight: float


@dataclasses.dataclass
class Source:
  name: str
  weight: float  # normalised: the weights of a mixture sum to 1
  corpus: Corpus


@dataclasses.dataclass
class Mixture:
  """Several weighted corpora; quacks like a Corpus for the trainer's run_info."""
  sources: list[Source]
  name: str = "mixture"

  @property
  def fingerprint(self) -> str:
    h = hashlib.sha256()
    for s in self.sources:
      h.update(f"{s.name}:{s.weight!r}:{s.corpus.fingerprint};".encode())
    return h.hexdigest()

  @property
  def weights(self) -> dict[str, float]:
    return {s.name: s.weight for s in self.sources}


def token_counts(corpus) -> tuple[int, int]:
  """(train, val) token counts of a Corpus or a Mixture."""
  if isinstance(corpus, Mixture):
    return (sum(int(s.corpus.train_tokens.size) for s in corpus.sources),
            sum(int(s.corpus.val_tokens.size) for s in corpus.sources))
  return int(corpus.train_tokens.size), int(corpus.val_tokens.size)


def _default_name(spec: str) -> str:
  if spec == "builtin":
    return "builtin"
  fixed = spec.rstrip("/")
  while glob_lib.has_magic(os.path.basename(fixed)) and "/" in fixed:
    fixed = os.path.dirname(fixed)
  base = os.path.basename(fixed).split(".")[0]
  return re.sub(r"[^A-Za-z0-9_.-]", "_", base) or "source"


def parse_sources(text: str) -> list[SourceSpec]:
  """'[name=]spec[:weight],...' -> SourceSpecs (weights normalised to sum 1)."""
  entries = [e.strip() for e in text.split(",") if e.strip()]
  if not entries:
    raise DataError("data.sources is empty; give e.g. 'builtin:0.8,web=prepared/web:0.2'")
  out = []
  for entry in entries:
    name, rest = (entry.split("=", 1) if "=" in entry.split(":")[0] else (None, entry))
    spec, weight = rest, 1.0
    if ":" in rest:
      head, tail = rest.rsplit(":", 1)
      try:
        spec, weight = head, float(tail)
      except ValueError:
        pass  # a colon inside the path
    if not math.isfinite(weight) or weight <= 0:
      raise DataError(f"data.sources entry '{entry}': the weight must be > 0; got {weight}")
    name = name or _default_name(spec)
    if not _NAME.match(name):
      raise DataError(f"data.sources entry '{entry}': name '{name}' may hold only letters, "
                      "digits, '_', '.', '-'")
    out.append(SourceSpec(name, spec, weight))
  names = [s.name for s in out]
  if len(set(names)) != len(names):
    raise DataError(f"data.sources has the name {[n for n in names if names.count(n) > 1][0]!r} "
                    "twice; name entries as NAME=SPEC:WEIGHT")
  total = sum(s.weight for s in out)
  return [dataclasses.replace(s, weight=s.weight / total) for s in out]


def _kind(spec: str) -> str:
  if spec == "builtin":
    return "builtin"
  path = os.path.expanduser(spec)
  if os.path.isdir(path) or spec.endswith(".bin"):
    return "tokens"
  return "text"


def load_mixture(text: str, tokenizer, *, val_percent: float = 5, token_dtype: str = "uint16",
                 cache_dir: str | None = None) -> Mixture:
  sources = []
  for s in parse_sources(text):
    kind = _kind(s.spec)
    try:
      corpus = load_corpus(kind, None if kind == "builtin" else s.spec, tokenizer,
                           val_percent=val_percent, token_dtype=token_dtype,
                           cache_dir=cache_dir)
    except DataError as e:
      raise DataError(f"data.sources '{s.name}' ({s.spec}): {e}") from None
    sources.append(Source(s.name, s.weight, corpus))
  return Mixture(sources)


def _source_seed(seed: int, index: int) -> int:
  return int(hashlib.sha256(f"{seed}/{index}".encode()).hexdigest()[:8], 16)


def make_mixture_dataset(mixture: Mixture, *, seq_len: int, batch_size: int, seed: int,
                         process_index: int = 0, process_count: int = 1,
                         eos_id: int | None = None) -> grain.MapDataset:
  """Per-process MapDataset of packed batches drawn from the sources by weight."""
  shard = ShardInfo(process_index, process_count)
  parts = []
  for i, s in enumerate(mixture.sources):
    source = WindowSource(s.corpus.train_tokens, seq_len)
    if len(source) == 0:
      raise DataError(f"data.sources '{s.name}' has {s.corpus.train_tokens.size} training "
                      f"tokens: not one window of {seq_len} + 1")
    parts.append(grain.MapDataset.source(source).shuffle(seed=_source_seed(seed, i))
                 .repeat(None))
  ds = grain.MapDataset.mix(parts, [s.weight for s in mixture.sources])
  ds = ds.batch(batch_size, drop_remainder=True, batch_fn=_stack)
  steps = len(ds) // shard.process_count
  ds = ds[shard.process_index:steps * shard.process_count:shard.process_count]
  return ds.map(lambda w: pack(w, eos_id))


def make_mixture_iterator(mixture: Mixture, *, seq_len: int, batch_size: int, seed: int,
                          process_index: int = 0, process_count: int = 1,
                          eos_id: int | None = None, num_threads: int = 1,
                          prefetch: int = 4) -> grain.DatasetIterator:
  """Checkpointable iterator of this process's mixed batches (make_train_iterator's twin)."""
  ds = make_mixture_dataset(mixture, seq_len=seq_len, batch_size=batch_size, seed=seed,
                            process_index=process_index, process_count=process_count,
                            eos_id=eos_id)
  read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
  return iter(ds.to_iter_dataset(read))


def make_data_iterator(data, *, seq_len: int, batch_size: int, seed: int, **kwargs):
  """The training iterator of what the trainer loads (a Corpus, or a Mixture for
  data.sources): make_mixture_iterator or make_train_iterator with the same arguments."""
  from effjax.data.pipeline import make_train_iterator  # pylint: disable=g-import-not-at-top
  if isinstance(data, Mixture):
    return make_mixture_iterator(data, seq_len=seq_len, batch_size=batch_size, seed=seed, **kwargs)
  return make_train_iterator(data.train_tokens, seq_len=seq_len, batch_size=batch_size,
                             seed=seed, **kwargs)


def mixture_eval_batches(mixture: Mixture, **kwargs) -> dict[str, list[dict]]:
  """{source name: eval_batches(its validation tokens, **kwargs)}; errors name the source."""
  from effjax.data.pipeline import eval_batches  # pylint: disable=g-import-not-at-top
  out = {}
  for s in mixture.sources:
    try:
      out[s.name] = eval_batches(s.corpus.val_tokens, **kwargs)
    except DataError as e:
      raise DataError(f"data.sources '{s.name}': {e}") from None
  return out


def mixed_eval_row(per_source: dict[str, dict], weights: dict[str, float]) -> dict:
  """eval/<name>/{loss,bpb} per source, and eval/loss, eval/bpb: the weight-averaged figure
  (the expected loss under the training mixture). bpb is averaged only when every source
  has one."""
  row = {}
  for name, metrics in per_source.items():
    for k, v in metrics.items():
      row[k.replace("eval/", f"eval/{name}/", 1)] = v
  for key in ("eval/loss", "eval/bpb"):
    if all(key in m for m in per_source.values()):
      row[key] = float(sum(weights[n] * m[key] for n, m in per_source.items()))
  return row

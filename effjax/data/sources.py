"""Row readers for `effjax.data.prepare`: text files, JSON lines, parquet, Hugging Face datasets.

A reader yields Row(name, index, text) for every row of its input, in a fixed order, with
`index` the row's number within `name` (a file's relative name, or the dataset). `text`
is a str, or None for a missing/empty value (the caller decides whether that is an
error). `skip` drops the first `skip` rows of the whole input as cheaply as the format
allows (whole files, parquet row groups, raw lines), so a resumed run never re-parses
them. Every error names the file and the row.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
from typing import Iterator

from effjax.data.corpus import expand_paths
from effjax.data.errors import DataError

MISSING_EXTRA = ("the 'data' extra is not installed: pip install -e '.[data]' "
                 "(installs {pkg}) to read {what}")


@dataclasses.dataclass(frozen=True)
class Row:
  name: str
  index: int
  text: str | None


def _decode(data: bytes, where: str, utf8_errors: str) -> str:
  try:
    return data.decode("utf-8", errors=utf8_errors)
  except UnicodeDecodeError as e:
    raise DataError(f"{where}: undecodable UTF-8 bytes at byte {e.start} ({data[e.start:e.start + 4]!r}); "
                    "fix the file or pass --utf8_errors=replace") from None


def _kind(path: str) -> str:
  low = path.lower()
  if low.endswith((".jsonl", ".jsonl.gz", ".json.gz", ".ndjson")):
    return "jsonl"
  if low.endswith(".parquet"):
    return "parquet"
  return "text"


class FileRows:
  """Text files (one document per file), JSON lines (one per line) and parquet (one per row)."""

  def __init__(self, paths, text_column: str = "text", utf8_errors: str = "strict"):
    self.files = expand_paths(paths)
    self.column, self.utf8_errors = text_column, utf8_errors
    kinds = {_kind(p) for _, p in self.files}
    if "parquet" in kinds:
      _import_pyarrow("parquet files")
    self.description = (f"{len(self.files)} file(s): "
                        + ", ".join(r for r, _ in self.files[:4])
                        + (" ..." if len(self.files) > 4 else ""))

  def identity(self) -> list:
    """What the output depends on: each file's name, size and mtime (for resume checks)."""
    out = []
    for rel, path in self.files:
      st = os.stat(path)
      out.append([rel, st.st_size, int(st.st_mtime)])
    return out

  def num_rows(self) -> int | None:
    """Known up front for text and parquet files; None when JSON lines are involved."""
    total = 0
    for _, path in self.files:
      kind = _kind(path)
      if kind == "text":
        total += 1
      elif kind == "parquet":
        total += _parquet_file(path).metadata.num_rows
      else:
        return None
    return total

  def rows(self, skip: int = 0) -> Iterator[Row]:
    for rel, path in self.files:
      kind = _kind(path)
      if kind == "text":
        if skip:
          skip -= 1
          continue
        with open(path, "rb") as f:
          data = f.read()
        yield Row(rel, 0, _decode(data, f"'{rel}' (row 0)", self.utf8_errors) or None)
      elif kind == "jsonl":
        skip = yield from self._jsonl(rel, path, skip)
      else:
        skip = yield from self._parquet(rel, path, skip)

  def _jsonl(self, rel, path, skip):
    opener = gzip.open if path.lower().endswith(".gz") else open
    with opener(path, "rb") as f:
      for i, line in enumerate(f):
        if skip:
          skip -= 1
          continue
        where = f"'{rel}' row {i} (line {i + 1})"
        line = line.rstrip(b"\r\n")
        if not line.strip():
          yield Row(rel, i, None)
          continue
        try:
          record = json.loads(_decode(line, where, self.utf8_errors))
        except json.JSONDecodeError as e:
          raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict) or self.column not in record:
          keys = sorted(record) if isinstance(record, dict) else type(record).__name__
          raise DataError(f"{where}: no column '{self.column}' (has {keys}); pick one with "
                          "--text_column")
        yield Row(rel, i, _as_text(record[self.column], where, self.column))
    return skip

  def _parquet(self, rel, path, skip):
    pf = _parquet_file(path)
    names = pf.schema_arrow.names
    if self.column not in names:
      raise DataError(f"'{rel}' row 0: no column '{self.column}' (has {names}); pick one with "
                      "--text_column")
    if skip >= pf.metadata.num_rows:
      return skip - pf.metadata.num_rows
    row = 0
    for g in range(pf.num_row_groups):
      n = pf.metadata.row_group(g).num_rows
      if skip >= n:
        skip -= n
        row += n
        continue
      values = pf.read_row_group(g, columns=[self.column]).column(0).to_pylist()
      for j, value in enumerate(values[skip:], start=skip):
        where = f"'{rel}' row {row + j}"
        yield Row(rel, row + j, _as_text(value, where, self.column))
      skip = 0
      row += n
    return 0


def _as_text(value, where: str, column: str) -> str | None:
  if value is None:
    return None
  if isinstance(value, bytes):
    value = _decode(value, where, "strict")
  if not isinstance(value, str):
    raise DataError(f"{where}: column '{column}' holds {type(value).__name__}, not text")
  return value or None


def _import_pyarrow(what: str):
  try:
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise DataError(MISSING_EXTRA.format(pkg="pyarrow", what=what)) from None
  return pq


def _parquet_file(path: str):
  pq = _import_pyarrow("parquet files")
  try:
    return pq.ParquetFile(path)
  except Exception as e:  # pyarrow raises ArrowInvalid and friends
    raise DataError(f"cannot read parquet file '{path}': {e}") from None


class HFRows:
  """A Hugging Face dataset: a directory from `save_to_disk`, or hub name + split (streamed)."""

  def __init__(self, source: str, split: str = "train", config_name: str | None = None,
               text_column: str = "text", streaming: bool = True):
    try:
      import datasets  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise DataError(MISSING_EXTRA.format(pkg="datasets", what=f"'{source}'")) from None
    self.source, self.split, self.column = source, split, text_column
    self.name = source.removeprefix("hf:")
    if os.path.isdir(self.name):
      ds = datasets.load_from_disk(self.name)
      if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
          raise DataError(f"dataset '{self.name}' has no split '{split}' (has {list(ds)}); "
                          "pass --split")
        ds = ds[split]
    else:
      try:
        ds = datasets.load_dataset(self.name, config_name, split=split, streaming=streaming)
      except Exception as e:  # network, missing dataset or split: the library's message
        raise DataError(f"cannot load Hugging Face dataset '{self.name}' (split {split}): "
                        f"{str(e).splitlines()[0][:300]}") from None
    names = ds.column_names
    if names is not None and text_column not in names:
      raise DataError(f"dataset '{self.name}' row 0: no column '{text_column}' (has {names}); "
                      "pick one with --text_column")
    self.ds = ds
    self.description = f"Hugging Face dataset {self.name} (split {split})"

  def identity(self) -> list:
    fp = getattr(self.ds, "_fingerprint", None)
    return [self.name, self.split, fp]

  def num_rows(self) -> int | None:
    try:
      return len(self.ds)
    except TypeError:  # streaming
      return None

  def rows(self, skip: int = 0) -> Iterator[Row]:
    for i, record in enumerate(self.ds):
      if i < skip:
        continue
      where = f"dataset '{self.name}' row {i}"
      if self.column not in record:
        raise DataError(f"{where}: no column '{self.column}' (has {sorted(record)})")
      yield Row(self.name, i, _as_text(record[self.column], where, self.column))


def open_rows(source: str, *, text_column: str = "text", split: str = "train",
              hf_config: str | None = None, utf8_errors: str = "strict"):
  """'hf:NAME' or a `save_to_disk` directory -> HFRows; files/globs -> FileRows."""
  path = os.path.expanduser(source)
  saved = os.path.isdir(path) and any(os.path.exists(os.path.join(path, f)) for f in (
      "dataset_info.json", "state.json", "dataset_dict.json"))
  if source.startswith("hf:") or saved:
    return HFRows(source if source.startswith("hf:") else path, split, hf_config or None,
                  text_column)
  return FileRows(source, text_column, utf8_errors)

"""Workdir paths: local folders and cloud URLs through one abstraction (etils.epath).

Every file a run, a sweep, a study or the checkpoint tools read or write in a workdir goes
through `as_path`: `runs/x` and `/abs/x` are local, `gs://BUCKET/x` (also s3://, az://)
goes to the cloud store (epath's fsspec or TensorFlow backend; Orbax writes checkpoints
there itself), `file:///abs/x` is the local folder /abs/x. Never `os.path` on a workdir:
on a URL it makes a local folder `./gs:/BUCKET/...` (issue 20).

Cloud objects cannot be appended to or renamed atomically, so `append_line` rewrites the
file there and `write_text` writes in place (locally both are atomic or appends).
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

from etils import epath

FILE_PREFIX = "file://"


def as_path(path: Any) -> epath.Path:
  """An epath.Path for a local path, a `file://` URL or a cloud URL."""
  if isinstance(path, epath.Path) and not str(path).startswith(FILE_PREFIX):
    return path
  text = os.fspath(path)
  if text.startswith(FILE_PREFIX):
    text = text[len(FILE_PREFIX):]
  return epath.Path(text)


def is_url(path: Any) -> bool:
  """Whether `path` names a remote store (gs://, s3://, ...; file:// is local)."""
  text = os.fspath(path) if not isinstance(path, epath.Path) else str(path)
  return "://" in text and not text.startswith(FILE_PREFIX)


def absolute(path: Any) -> epath.Path:
  """Local paths made absolute (Orbax wants them so); URLs unchanged."""
  p = as_path(path)
  return p if is_url(p) else epath.Path(os.path.abspath(os.fspath(p)))


def name(path: Any) -> str:
  """The last component (a run's name for plot titles and tables)."""
  return as_path(path).name or os.path.basename(os.path.abspath(os.fspath(as_path(path))))


def read_json(path: Any, default=None):
  p = as_path(path)
  if not p.exists():
    return default
  return json.loads(p.read_text())


def _write_whole(path: Any, write) -> None:
  """write(p) to `path`; locally into a temporary file renamed over it (never half a file)."""
  p = as_path(path)
  if is_url(p):
    write(p)
    return
  tmp = p.parent / (p.name + ".tmp")
  write(tmp)
  os.replace(os.fspath(tmp), os.fspath(p))


def write_text(path: Any, text: str) -> None:
  """Writes `text`; locally through a temporary file and a rename (never half a file)."""
  _write_whole(path, lambda p: p.write_text(text))


def write_bytes(path: Any, data: bytes) -> None:
  """Writes `data`; locally through a temporary file and a rename (never half a file)."""
  _write_whole(path, lambda p: p.write_bytes(data))


def write_json(path: Any, obj, **kwargs) -> None:
  write_text(path, json.dumps(obj, **kwargs))


def save_figure(fig, path: Any, **kwargs) -> str:
  """Saves a matplotlib figure as PNG to any path; returns it as a string."""
  buf = io.BytesIO()
  fig.savefig(buf, format="png", **kwargs)
  write_bytes(path, buf.getvalue())
  return str(as_path(path))

"""metrics.jsonl writer, console progress bar and loss plot."""

from __future__ import annotations

import json
import math
import sys
import time
from typing import Iterable

import numpy as np

from effjax import paths


def _to_python(v):
  if isinstance(v, (np.generic, np.ndarray)):
    v = v.item() if np.ndim(v) == 0 else v.tolist()
  if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
    v = v.item()
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)  # JSON has no NaN/inf
  return v


def read_metrics(path) -> list[dict]:
  """The rows of a metrics.jsonl (local path or URL; effjax/paths.py)."""
  path = paths.as_path(path)
  if not path.exists():
    return []
  rows = []
  with path.open() as f:
    for line in f:
      line = line.strip()
      if line:
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError:
          break  # a line cut short by a crash; everything after it is dropped
  return rows


class MetricsWriter:
  """Appends one JSON object per event to metrics.jsonl (and optionally TensorBoard).

  On resume from step S, lines with step > S (written after the checkpoint the run
  resumes from) are dropped, so the file always describes one consistent run. In a cloud
  workdir (no appends) the file is rewritten at each write.
  """

  def __init__(self, workdir: str, *, enabled: bool = True, resume_step: int = 0,
               tensorboard: bool = False, wandb_project: str = "", run_config: dict | None = None):
    """wandb_project: also log to Weights & Biases (one W&B run per workdir, resumed with it;
    the config as its config; files under <workdir>/wandb for a local workdir)."""
    self.path = paths.as_path(workdir) / "metrics.jsonl"
    self.enabled = enabled
    self._tb = self._wandb = None
    if not enabled:
      return
    kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
    self._lines = [json.dumps(r) + "\n" for r in kept]
    paths.write_text(self.path, "".join(self._lines))
    self._file = None if paths.is_url(self.path) else self.path.open("a")
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      except ImportError as e:
        raise RuntimeError("train.tensorboard=true needs tensorboardX: "
                           "pip install -e '.[tensorboard]'") from e
      self._tb = SummaryWriter(str(paths.as_path(workdir) / "tensorboard"))
    if wandb_project:
      self._wandb = _wandb_run(workdir, wandb_project, run_config)

  def write(self, step: int, metrics: dict):
    if not self.enabled:
      return
    row = {"step": int(step), **{k: _to_python(v) for k, v in metrics.items()}}
    if self._file is None:  # a cloud object: rewritten whole
      self._lines.append(json.dumps(row) + "\n")
      self.path.write_text("".join(self._lines))
    else:
      self._file.write(json.dumps(row) + "\n")
      self._file.flush()
    scalars = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(k, v, step)
    if self._wandb is not None:
      self._wandb.log(scalars, step=int(step))

  def close(self):
    if self.enabled:
      if self._file is not None:
        self._file.close()
      if self._tb is not None:
        self._tb.close()
      if self._wandb is not None:
        self._wandb.finish()


def _wandb_run(workdir, project: str, run_config: dict | None):
  """A W&B run named after the workdir, with an id derived from it so a resume continues it."""
  import hashlib  # pylint: disable=g-import-not-at-top
  import wandb  # pylint: disable=g-import-not-at-top
  wd = paths.absolute(workdir)
  local = None if paths.is_url(wd) else str(wd)
  if local:
    wd.mkdir(parents=True, exist_ok=True)
  run_id = f"{paths.name(workdir)}-{hashlib.sha1(str(wd).encode()).hexdigest()[:8]}"
  return wandb.init(project=project, name=paths.name(workdir), id=run_id, resume="allow",
                    config=run_config, dir=local)


def _fmt_time(seconds: float) -> str:
  if not math.isfinite(seconds) or seconds < 0:
    return "?"
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class ProgressBar:
  """One-line console progress: step, loss, tokens/s, ETA. Plain lines when not a TTY."""

  def __init__(self, total: int, start: int = 0, *, enabled: bool = True, stream=None):
    self.total, self.start = total, start
    self.enabled = enabled
    self.stream = stream or sys.stderr
    self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
    self.t0 = time.time()

  def update(self, step: int, loss: float, tokens_per_sec: float, extra: str = ""):
    if not self.enabled:
      return
    done = (step - self.start) / max(self.total - self.start, 1)
    elapsed = time.time() - self.t0
    eta = elapsed / done * (1 - done) if done > 0 else float("nan")
    width = 24
    filled = int(width * step / max(self.total, 1))
    bar = "=" * filled + (">" if filled < width else "") + " " * max(width - filled - 1, 0)
    line = (f"step {step:>6}/{self.total} [{bar}] loss {loss:.4f} | "
            f"{tokens_per_sec / 1e3:,.1f}k tok/s | ETA {_fmt_time(eta)}{extra}")
    if self.tty:
      self.stream.write("\r" + line + "\x1b[K")
    else:
      self.stream.write(line + "\n")
    self.stream.flush()

  def message(self, text: str):
    """Prints a line without breaking the bar."""
    if not self.enabled:
      return
    self.stream.write(("\r\x1b[K" if self.tty else "") + text + "\n")
    self.stream.flush()

  def close(self):
    if self.enabled and self.tty:
      self.stream.write("\n")
      self.stream.flush()


def plot_metrics(rows: Iterable[dict], path, keys=("train/loss", "eval/loss"),
                 title: str = "") -> str | None:
  """Writes a loss-versus-step plot (PNG). Returns the path, or None if nothing to plot."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  rows = list(rows)
  fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
  plotted = False
  for key in keys:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    if not pts:
      continue
    steps, vals = zip(*pts)
    style = "o-" if key.startswith("eval") else "-"
    ax.plot(steps, vals, style, label=key, markersize=4, linewidth=1.3)
    plotted = True
  if not plotted:
    plt.close(fig)
    return None
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats/token)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  path = paths.save_figure(fig, path)
  plt.close(fig)
  return path

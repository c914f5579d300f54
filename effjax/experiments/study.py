"""Studies: named variants of one base config, run in sequence, summarised into a results
folder (README table, plots, the configs, the command, commit and corpus fingerprint).

Resumable: each variant trains in its own workdir under `runs_dir`; rerunning the
study skips finished variants and resumes interrupted ones (the trainer's resume).
Only the summary goes to results/; the workdirs (checkpoints) stay under runs/.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shutil
import sys
import time

import jax

from effjax import checks
from effjax import config as config_lib
from effjax.train import trainer
from effjax.train.metrics import read_metrics


@dataclasses.dataclass
class Variant:
  name: str
  overrides: dict
  label: str = ""


@dataclasses.dataclass
class RunRecord:
  variant: Variant
  workdir: str
  config: config_lib.Config
  rows: list
  info: dict

  def last(self, key, default=float("nan")):
    for row in reversed(self.rows):
      if key in row:
        return row[key]
    return default

  def series(self, key):
    return [(r["step"], r[key]) for r in self.rows if key in r]


def run_variants(base_config: config_lib.Config, variants: list[Variant], runs_dir: str,
                 *, only: set[str] | None = None) -> list[RunRecord]:
  data = None
  records = []
  for i, v in enumerate(variants):
    cfg = checks.validate(config_lib.apply_overrides(base_config, v.overrides),
                          jax.device_count())
    workdir = os.path.join(runs_dir, v.name)
    if only is None or v.name in only:
      data = data or trainer.load_data(cfg)
      t0 = time.time()
      print(f"[study] ({i + 1}/{len(variants)}) {v.name}: {v.label}", file=sys.stderr, flush=True)
      result = trainer.train(cfg, workdir, data=data)
      if result.exit_code not in (trainer.EXIT_OK, trainer.EXIT_NONFINITE):
        raise SystemExit(result.exit_code)  # interrupted: rerun the study to resume
      print(f"[study] {v.name} done in {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    if not os.path.exists(os.path.join(workdir, "metrics.jsonl")):
      continue
    with open(os.path.join(workdir, "run_info.json")) as f:
      info = json.load(f)
    records.append(RunRecord(v, workdir, cfg, read_metrics(os.path.join(workdir, "metrics.jsonl")),
                             info))
  return records


def write_summary(out_dir: str, title: str, body: str, records: list[RunRecord], command: str,
                  scale: str) -> str:
  """README.md with provenance, plus each variant's resolved config under configs/."""
  os.makedirs(os.path.join(out_dir, "configs"), exist_ok=True)
  for r in records:
    shutil.copy(os.path.join(r.workdir, "config.json"),
                os.path.join(out_dir, "configs", f"{r.variant.name}.json"))
  info = records[0].info if records else {}
  commits = sorted({r.info.get("commit", "?") for r in records})
  text = (f"# {title}\n\n"
          f"Command: `{command}`\n\n"
          f"Scale: {scale}\n\n"
          f"Corpus: `{info.get('corpus')}` (fingerprint `{info.get('corpus_fingerprint', '')[:16]}`), "
          f"devices: {info.get('devices')}, jax {info.get('jax_version')}, commit(s) "
          f"{', '.join(commits)}, written {datetime.date.today()}. Resolved configs: `configs/`.\n\n"
          f"{body}\n")
  path = os.path.join(out_dir, "README.md")
  with open(path, "w") as f:
    f.write(text)
  return path


def markdown_table(header: list[str], rows: list[list]) -> str:
  fmt = lambda x: f"{x:.4f}" if isinstance(x, float) else str(x)
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(fmt(x) for x in row) + " |" for row in rows]
  return "\n".join(lines)

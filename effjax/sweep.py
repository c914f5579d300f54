"""Sweeps: the cartesian product of config values, run locally or emitted for a launcher.

  python -m effjax.sweep --config=configs/NAME.py --grid 'train.lr=1e-3,3e-3,1e-2' \\
      --grid 'model.d_model=64,128,256' --out=DIR [--parallel N] [--emit] [--config.k=v ...]

Each run trains in DIR/runs/<name> (name from the grid values). A finished run
(final_metrics.json present) is skipped when its config.json is the requested config up to
the keys that do not change results (OUTPUT_KEYS: logging, checkpoint cadence, plots, mesh,
kernels); otherwise the sweep says which keys differ, moves it to DIR/runs/<name>.stale-<hash>
and reruns it. Interrupted runs resume from their last checkpoint. DIR/results.csv collects
every finished run's grid values, config_hash and final metrics (eval/loss, eval/bpb,
train/loss, params, tokens, FLOPs/token, ...).
--emit prints one train command per run (for a cluster launcher) and runs nothing.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import itertools
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from effjax import checks
from effjax import config as config_lib
from effjax import paths


def parse_grid(specs: list[str]) -> list[tuple[str, list[str]]]:
  grid = []
  for spec in specs:
    if "=" not in spec:
      raise config_lib.ConfigError(f"--grid expects 'key=v1,v2,...'; got {spec!r}")
    key, values = spec.split("=", 1)
    values = [v.strip() for v in values.split(",") if v.strip()]
    if not values:
      raise config_lib.ConfigError(f"--grid '{key}' has no values")
    grid.append((key.strip(), values))
  return grid


# Keys that do not change what a run computes (logging, checkpoints, plots, placement).
OUTPUT_KEYS = ("train.log_every", "train.eval_every", "train.checkpoint_every",
               "train.keep_checkpoints", "train.sample_tokens", "train.sample_prompt",
               "train.sample_temperature", "train.tensorboard", "train.wandb_project",
               "train.profile_steps",
               "train.plot", "train.log_spectral", "data.cache_dir", "mesh.",
               "model.attention.impl", "model.remat")


def config_hash(config_json: dict) -> str:
  """A run's key: a hash of its config.json without OUTPUT_KEYS."""
  flat = {k: config_lib._get(config_json, k) for k in config_lib.valid_keys()  # pylint: disable=protected-access
          if not k.startswith(OUTPUT_KEYS)}
  return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:12]


def stale_keys(workdir: str, config: config_lib.Config) -> dict | None:
  """{key: [ran, requested]} where a finished run's config.json differs from `config`
  (OUTPUT_KEYS aside); None when the run has no config.json."""
  saved = paths.read_json(paths.as_path(workdir) / "config.json")
  if saved is None:
    return None
  changed = config_lib.diff(saved, config)
  return {k: v for k, v in changed.items() if not k.startswith(OUTPUT_KEYS)}


def run_name(assignment: dict) -> str:
  return "_".join(f"{k.split('.')[-1]}={v}" for k, v in assignment.items()).replace("/", "-")


def expand(grid) -> list[dict]:
  keys = [k for k, _ in grid]
  return [dict(zip(keys, combo)) for combo in itertools.product(*(v for _, v in grid))]


def train_command(config_path, overrides: dict, assignment: dict, workdir: str) -> list[str]:
  cmd = [sys.executable, "-m", "effjax.train", f"--workdir={workdir}"]
  if config_path:
    cmd.append(f"--config={config_path}")
  cmd += [f"--config.{k}={v}" for k, v in {**overrides, **assignment}.items()]
  return cmd


def collect(out: str, runs: list[dict]) -> str:
  """Writes DIR/results.csv from every finished run's final_metrics.json."""
  rows = []
  for assignment in runs:
    workdir = paths.as_path(out) / "runs" / run_name(assignment)
    final = paths.read_json(workdir / "final_metrics.json")
    if final is not None:
      row = {"run": run_name(assignment), **assignment}
      saved = paths.read_json(workdir / "config.json")
      if saved is not None:
        row["config_hash"] = config_hash(saved)
      rows.append({**row, **final})
  fields = list(dict.fromkeys(k for r in rows for k in r))
  text = io.StringIO(newline="")
  writer = csv.DictWriter(text, fieldnames=fields)
  writer.writeheader()
  writer.writerows(rows)
  path = paths.as_path(out) / "results.csv"
  paths.write_text(path, text.getvalue())
  return str(path)


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--grid", action="append", default=[], help="key=v1,v2,... (repeatable)")
  parser.add_argument("--out", required=True)
  parser.add_argument("--parallel", type=int, default=1)
  parser.add_argument("--emit", action="store_true")
  args, rest = parser.parse_known_args(argv)
  config_path, overrides, unknown = config_lib.parse_override_args(rest)
  try:
    if unknown:
      raise config_lib.ConfigError(f"unknown arguments {unknown}")
    grid = parse_grid(args.grid)
    runs = expand(grid)
    # validate every combination up front (no device check: runs may go elsewhere)
    base = config_lib.load_config_file(config_path) if config_path else config_lib.Config()
    base = config_lib.apply_overrides(base, overrides)
    requested = [checks.validate(config_lib.apply_overrides(base, a)) for a in runs]
  except config_lib.ConfigError as e:
    print(f"sweep: config error: {e}", file=sys.stderr)
    return 2
  commands = [(a, train_command(config_path, overrides, a,
                                str(paths.as_path(args.out) / "runs" / run_name(a))))
              for a in runs]
  if args.emit:
    for _, cmd in commands:
      print(shlex.join(cmd))
    return 0
  runs_dir = paths.as_path(args.out) / "runs"  # a local folder or a cloud URL
  runs_dir.mkdir(parents=True, exist_ok=True)
  todo = []
  for (a, c), config in zip(commands, requested):
    workdir = runs_dir / run_name(a)
    if (workdir / "final_metrics.json").exists():
      stale = stale_keys(workdir, config)
      if not stale:
        continue
      moved = f"{workdir}.stale-{config_hash(paths.read_json(workdir / 'config.json'))}"
      workdir.rename(moved)
      print(f"sweep: {run_name(a)}: finished under another config ("
            + ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in stale.items())
            + f"); moved to {moved}, rerunning", file=sys.stderr, flush=True)
    todo.append((a, c))
  print(f"sweep: {len(runs)} runs, {len(runs) - len(todo)} already finished, {len(todo)} to run",
        file=sys.stderr, flush=True)
  failed = []

  def launch(item):
    assignment, cmd = item
    name = run_name(assignment)
    log = runs_dir / (name + ".log")
    t0 = time.time()
    if paths.is_url(log):  # no appends to cloud objects: the log is written at the end
      proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      code = proc.returncode
      log.write_text(proc.stdout)
    else:
      with log.open("a") as f:
        code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
    status = "ok" if code == 0 else f"exit {code} (log: {log})"
    print(f"sweep: {name}: {status} in {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    if code != 0:
      failed.append(name)

  with ThreadPoolExecutor(max_workers=max(args.parallel, 1)) as pool:
    list(pool.map(launch, todo))
  path = collect(args.out, runs)
  print(f"sweep: wrote {path}" + (f"; {len(failed)} failed: {failed}" if failed else ""),
        file=sys.stderr)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())

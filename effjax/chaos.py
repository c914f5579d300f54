"""Chaos test: SIGKILL a training run over and over, restart it each time, lose nothing.

  python -m effjax.chaos --kills=20 --workdir=/tmp/chaos [--steps=16] [--seed=0]
      [--config=configs/tiny.py]

Runs the training CLI once uninterrupted (the reference), then again in another workdir,
killing it with SIGKILL `kills` times: every other kill lands while an orbax checkpoint is
being written (a tmp directory exists), the others at a random moment once training runs.
After each kill the same command is started again; after the last one it runs to the end.
Then it checks (exit 1 on any failure): the final params are bit-identical to the reference,
so are the per-step train and eval losses in metrics.jsonl (no step duplicated or torn),
every checkpoint left verifies (effjax.train.checkpoint), no orbax tmp directory is left and
at most train.keep_checkpoints step directories exist. It reports the steps lost per kill
(the last logged step before the kill minus the step the next start resumed from).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEEP = 2


def train_command(workdir: str, config: str, steps: int) -> list[str]:
  return [sys.executable, "-m", "effjax.train", f"--config={config}", f"--workdir={workdir}",
          f"--config.train.steps={steps}", "--config.train.checkpoint_every=2",
          "--config.train.log_every=1", f"--config.train.eval_every={steps // 2}",
          "--config.train.warmup_steps=1", f"--config.train.keep_checkpoints={KEEP}",
          "--config.train.sample_tokens=0", "--config.train.plot=false"]


def _env() -> dict:
  env = dict(os.environ)
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  return env


def _logged_steps(workdir: str) -> list[int]:
  from effjax.train.metrics import read_metrics  # pylint: disable=g-import-not-at-top
  return [r["step"] for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))
          if "train/loss" in r]


def _tmp_dirs(workdir: str) -> list[str]:
  return glob.glob(os.path.join(workdir, "checkpoints", "*orbax-checkpoint-tmp*"))


def _resumed_from(stderr: str) -> int:
  found = re.findall(r"resumed from checkpoint at step (\d+)", stderr)
  return int(found[-1]) if found else 0


def run_once(cmd: list[str], workdir: str, *, mode: str | None, rng: random.Random,
             max_wait_s: float = 3.0) -> dict:
  """Starts the run; mode 'save' kills it once a checkpoint write is in progress, 'time' at a
  random moment up to max_wait_s after its first new step, None lets it finish."""
  os.makedirs(workdir, exist_ok=True)
  log = os.path.join(workdir, "chaos_stderr.txt")
  stale = set(_tmp_dirs(workdir))  # left by the previous kill; the new start removes them
  with open(log, "w") as err:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=_env(), cwd=REPO)
    killed, deadline = False, None
    while proc.poll() is None and mode is not None:
      if mode == "save" and set(_tmp_dirs(workdir)) - stale:
        killed = True
      elif mode == "time":
        if deadline is None and "compiled in" in open(log).read():
          deadline = time.monotonic() + rng.uniform(0, max_wait_s)
        killed = deadline is not None and time.monotonic() >= deadline
      if killed:
        os.kill(proc.pid, signal.SIGKILL)
        break
      time.sleep(0.002)
    proc.wait()
  stderr = open(log).read()
  logged = _logged_steps(workdir)
  return {"mode": mode, "killed": killed, "returncode": proc.returncode,
          "resumed_from": _resumed_from(stderr), "last_logged": max(logged, default=0),
          "stderr_tail": stderr[-2000:]}


def final_state(workdir: str, step: int) -> dict:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  return ocp.StandardCheckpointer().restore(
      os.path.join(os.path.abspath(workdir), "checkpoints", str(step), "state"))


def _losses(workdir: str) -> dict:
  from effjax.train.metrics import read_metrics  # pylint: disable=g-import-not-at-top
  rows = read_metrics(os.path.join(workdir, "metrics.jsonl"))
  return {k: [(r["step"], r[k]) for r in rows if k in r] for k in ("train/loss", "eval/loss")}


def compare(reference: str, chaotic: str, steps: int) -> list[str]:
  """The ways `chaotic` differs from `reference` or is left damaged (empty: none)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from effjax.train.checkpoint import Checkpointer  # pylint: disable=g-import-not-at-top
  problems = []
  a, b = final_state(reference, steps), final_state(chaotic, steps)
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  if len(la) != len(lb) or any(not np.array_equal(np.asarray(x), np.asarray(y))
                               for x, y in zip(la, lb)):
    problems.append("final state differs from the uninterrupted run")
  ra, rb = _losses(reference), _losses(chaotic)
  for key in ra:
    if ra[key] != rb[key]:
      problems.append(f"{key} per step differs: {ra[key]} vs {rb[key]}")
  logged = _logged_steps(chaotic)
  if len(logged) != len(set(logged)):
    problems.append(f"duplicated steps in metrics.jsonl: {logged}")
  ckpt = Checkpointer(os.path.join(chaotic, "checkpoints"), keep=KEEP)
  try:
    for s in ckpt.all_steps():
      bad = ckpt.verify(s)
      if bad:
        problems.append(f"checkpoint {s} does not verify: {bad}")
    if len(ckpt.all_steps()) > KEEP:
      problems.append(f"{len(ckpt.all_steps())} checkpoints kept (keep={KEEP})")
  finally:
    ckpt.close()
  if _tmp_dirs(chaotic):
    problems.append(f"tmp directories left: {_tmp_dirs(chaotic)}")
  return problems


def chaos(workdir: str, *, kills: int, steps: int = 16, seed: int = 0,
          config: str = os.path.join(REPO, "configs", "tiny.py"), say=print) -> dict:
  rng = random.Random(seed)
  reference, chaotic = os.path.join(workdir, "reference"), os.path.join(workdir, "chaos")
  ref = run_once(train_command(reference, config, steps), reference, mode=None, rng=rng)
  if ref["returncode"] != 0:
    raise RuntimeError(f"the reference run failed:\n{ref['stderr_tail']}")
  cmd = train_command(chaotic, config, steps)
  runs = []
  for i in range(kills):
    run = run_once(cmd, chaotic, mode="save" if i % 2 == 0 else "time", rng=rng)
    runs.append(run)
    say(f"start {i + 1}: resumed from {run['resumed_from']}, "
        + (f"killed ({run['mode']}) after step {run['last_logged']}" if run["killed"]
           else f"exited {run['returncode']}"))
    if not run["killed"]:
      if run["returncode"] != 0:
        raise RuntimeError(f"start {i + 1} failed:\n{run['stderr_tail']}")
      break
  if not runs or runs[-1]["killed"]:
    runs.append(run_once(cmd, chaotic, mode=None, rng=rng))
    if runs[-1]["returncode"] != 0:
      raise RuntimeError(f"the last start failed:\n{runs[-1]['stderr_tail']}")
  lost = [prev["last_logged"] - nxt["resumed_from"] for prev, nxt in zip(runs, runs[1:])
          if prev["killed"]]
  report = {"kills": sum(r["killed"] for r in runs),
            "kills_during_save": sum(r["killed"] and r["mode"] == "save" for r in runs),
            "starts": len(runs), "steps_lost_per_kill": lost,
            "problems": compare(reference, chaotic, steps)}
  say(json.dumps({k: v for k, v in report.items()}, indent=1))
  return report


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--kills", type=int, default=20)
  parser.add_argument("--steps", type=int, default=16)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--config", default=os.path.join(REPO, "configs", "tiny.py"))
  args = parser.parse_args(argv)
  report = chaos(args.workdir, kills=args.kills, steps=args.steps, seed=args.seed,
                 config=args.config)
  return 1 if report["problems"] else 0


if __name__ == "__main__":
  sys.exit(main())

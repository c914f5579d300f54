"""Start N training processes on this machine, each with M forced CPU devices, connected by
jax.distributed on localhost: the multi-host code paths without a cluster.

  python launch/local.py --num_processes=2 --devices_per_process=4 [--port=12355] -- \\
      --config=configs/tiny.py --workdir=runs/two_process

Everything after `--` goes to `python -m effjax.train` in every process. Process 0's output
is streamed; the others' go to WORKDIR/process_<i>.log (WORKDIR may be a local folder, a
file:// or a cloud URL, effjax/paths.py; there the logs are copied when the processes end).
Prints the exact commands it runs; the exit code is the first non-zero exit code of any
process (0 when all succeed), so a rerun after an interruption (75) resumes from the
checkpoint like a single process does.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from effjax import paths  # pylint: disable=g-import-not-at-top,wrong-import-position


def _log_file(workdir, i: int):
  """Where process i writes its output: WORKDIR/process_<i>.log itself for a local workdir
  (readable while the run goes), else a local temporary file copied there at the end."""
  if paths.is_url(workdir):
    return tempfile.TemporaryFile("w+")
  return open(os.fspath(paths.as_path(workdir) / f"process_{i}.log"), "w")


def _workdir_arg(train_args: list) -> str | None:
  """The value of --workdir in the train arguments, as `--workdir=DIR` or `--workdir DIR`."""
  for i, a in enumerate(train_args):
    if a.startswith("--workdir="):
      return a.split("=", 1)[1]
    if a == "--workdir" and i + 1 < len(train_args):
      return train_args[i + 1]
  return None


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if "--" in argv:
    ours, train_args = argv[:argv.index("--")], argv[argv.index("--") + 1:]
  else:
    ours, train_args = argv, []
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument("--devices_per_process", type=int, default=1)
  parser.add_argument("--port", type=int, default=12355)
  args = parser.parse_args(ours)
  if args.num_processes < 1 or args.devices_per_process < 1:
    parser.error("--num_processes and --devices_per_process must be >= 1")
  workdir = _workdir_arg(train_args)
  if workdir is None:
    parser.error("pass --workdir=DIR (or --workdir DIR) after `--` (process logs are written "
                 "there)")
  paths.as_path(workdir).mkdir(parents=True, exist_ok=True)
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={args.devices_per_process}")
  procs, logs = [], []
  for i in range(args.num_processes):
    cmd = [sys.executable, "-m", "effjax.train", *train_args,
           f"--coordinator_address=localhost:{args.port}",
           f"--num_processes={args.num_processes}", f"--process_id={i}"]
    print(f"[launch/local] process {i}: XLA_FLAGS={env['XLA_FLAGS']} {shlex.join(cmd)}",
          flush=True)
    logs.append(None if i == 0 else _log_file(workdir, i))
    procs.append(subprocess.Popen(cmd, env=env, stdout=logs[-1],
                                  stderr=subprocess.STDOUT if logs[-1] else None))
  codes = [p.wait() for p in procs]
  for i, log in enumerate(logs):
    if log and paths.is_url(workdir):
      log.seek(0)
      paths.write_text(paths.as_path(workdir) / f"process_{i}.log", log.read())
    if log:
      log.close()
  print(f"[launch/local] exit codes {codes}", flush=True)
  return next((c for c in codes if c), 0)


if __name__ == "__main__":
  sys.exit(main())

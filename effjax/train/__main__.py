"""Command line: python -m effjax.train --config=configs/NAME.py --workdir=DIR [--config.k=v]
    [--restore_step=N] [--coordinator_address=HOST:PORT --num_processes=N --process_id=I |
    --distributed]

--restore_step=N resumes from the checkpoint at step N instead of the newest good one
(newer checkpoints are moved to checkpoints_aside/).

With no --config, the quick-start config. With no --workdir, runs/<config name>.
Exit codes: 0 done, 2 bad config, data or workdir, or a resume that does not fit the
checkpoint or no checkpoint that restores (nothing written), 3 non-finite loss,
75 interrupted (checkpoint saved; rerun the same command to resume).
"""

from __future__ import annotations

import logging
import os
import sys

USAGE = __doc__


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if any(a in ("-h", "--help") for a in argv):
    print(USAGE)
    return 0
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  from effjax import distributed  # pylint: disable=g-import-not-at-top
  try:
    dist_opts, argv = distributed.split_flags(argv)
  except distributed.DistributedError as e:
    print(f"effjax: distributed flags: {e}", file=sys.stderr)
    return 2
  distributed.initialize(dist_opts)  # before anything touches a device
  import jax  # pylint: disable=g-import-not-at-top
  from effjax import config as config_lib  # pylint: disable=g-import-not-at-top
  from effjax.data import DataError  # pylint: disable=g-import-not-at-top
  from effjax.train import trainer  # pylint: disable=g-import-not-at-top

  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  default = os.path.join(repo, "configs", "quickstart.py")
  try:
    config, rest = config_lib.load(argv, default_path=default)  # trainer.train checks the rest
  except config_lib.ConfigError as e:
    print(f"effjax: config error: {e}", file=sys.stderr)
    return 2
  restore_step, kept = None, []
  for arg in rest:
    if arg.startswith("--restore_step="):
      value = arg.split("=", 1)[1]
      if not value.isdigit() or int(value) < 1:
        print(f"effjax: --restore_step must be a positive step number; got {value!r}.",
              file=sys.stderr)
        return 2
      restore_step = int(value)
    else:
      kept.append(arg)
  rest = kept
  workdir, positional = None, []
  for i, arg in enumerate(rest):
    if arg.startswith("--workdir="):
      workdir = arg.split("=", 1)[1]
    elif arg == "--workdir" and i + 1 < len(rest):
      workdir = rest[i + 1]
    elif not arg.startswith("-") and not (i and rest[i - 1] == "--workdir"):
      positional.append(arg)
  if positional:
    hint = (f" For a config file write --config={positional[0]}."
            if positional[0].endswith(".py") else "")
    print(f"effjax: unexpected positional argument(s) {positional}.{hint} Use --config=FILE, "
          "--workdir=DIR and --config.section.key=value.", file=sys.stderr)
    return 2
  unknown = [a for a in rest if a.startswith("-") and not a.startswith("--workdir")]
  if unknown:
    print(f"effjax: unknown argument(s) {unknown}. Use --config=FILE, --workdir=DIR and "
          "--config.section.key=value.", file=sys.stderr)
    return 2
  if workdir is None:
    name = "quickstart"
    for a in argv:
      if a.startswith("--config="):
        name = os.path.splitext(os.path.basename(a.split("=", 1)[1]))[0]
    workdir = os.path.join("runs", name)
  try:
    result = trainer.train(config, workdir, restore_step=restore_step)
  except (DataError, config_lib.ConfigError, trainer.WorkdirError) as e:
    kind = {DataError: "data", trainer.WorkdirError: "workdir"}.get(type(e), "config")
    print(f"effjax: {kind} error: {e}", file=sys.stderr)
    return 2
  return result.exit_code


if __name__ == "__main__":
  sys.exit(main())

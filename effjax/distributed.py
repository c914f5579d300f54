"""Multi-process (multi-host) start-up: one call before anything touches a JAX device.

JAX's multi-controller SPMD is the engine (no home-made communication): every process runs
the same program on its local devices, `jax.distributed.initialize` connects them, and the
jitted step's collectives span all processes. Flags on the train entry point:

  --coordinator_address=HOST:PORT --num_processes=N --process_id=I   (all three, explicit)
  --distributed                                                       (auto-detect: TPU pod
                                                                       slices, SLURM, ...)
Without any of them, the run is single-process. On CPU the collectives use gloo.
"""

from __future__ import annotations

FLAGS = ("--coordinator_address", "--num_processes", "--process_id")


class DistributedError(ValueError):
  """Bad or incomplete distributed flags; the message names the flag."""


def split_flags(argv: list[str]) -> tuple[dict, list[str]]:
  """(distributed options, the remaining argv). Accepts --flag=value and --flag value."""
  opts, rest, i = {}, [], 0
  while i < len(argv):
    arg = argv[i]
    name, eq, value = arg.partition("=")
    if name in FLAGS:
      if not eq:
        if i + 1 >= len(argv):
          raise DistributedError(f"{name} needs a value")
        value, i = argv[i + 1], i + 1
      opts[name[2:]] = value
    elif arg == "--distributed":
      opts["auto"] = True
    else:
      rest.append(arg)
    i += 1
  explicit = [f for f in FLAGS if f[2:] in opts]
  if explicit and len(explicit) != len(FLAGS):
    missing = [f for f in FLAGS if f not in explicit]
    raise DistributedError(f"{', '.join(explicit)} given without {', '.join(missing)}: pass all "
                           f"three, or --distributed to auto-detect (TPU pod, SLURM)")
  for key in ("num_processes", "process_id"):
    if key in opts:
      try:
        opts[key] = int(opts[key])
      except ValueError:
        raise DistributedError(f"--{key} must be an integer; got {opts[key]!r}") from None
  if explicit and not 0 <= opts["process_id"] < opts["num_processes"]:
    raise DistributedError(f"--process_id={opts['process_id']} must be in [0, "
                           f"--num_processes={opts['num_processes']})")
  return opts, rest


def initialize(opts: dict) -> None:
  """jax.distributed.initialize from split_flags' options (no-op when empty)."""
  if not opts:
    return
  import jax  # pylint: disable=g-import-not-at-top
  try:  # CPU processes need a cross-process collectives backend
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  except Exception:  # pylint: disable=broad-except  (older/newer JAX without the option)
    pass
  if opts.get("auto") and "coordinator_address" not in opts:
    jax.distributed.initialize()
  else:
    jax.distributed.initialize(coordinator_address=opts["coordinator_address"],
                               num_processes=opts["num_processes"],
                               process_id=opts["process_id"])

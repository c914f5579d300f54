"""Load a trained run from its workdir: config, tokenizer, model and a checkpoint's weights.

  run = load_run("runs/quickstart")            # latest checkpoint
  run = load_run(workdir, step=400, overrides={"model.attention.eval_score": "lssar"})
  logits, aux = run.model.apply(run.params, run.buffers, ids_BxL)

The commands that read a finished (or running) run, effjax.generate and effjax.eval, start
here. The weights are restored onto one device (the run's own mesh may need more devices
than this host has); `run.model` is the evaluation model (model.attention.eval_score).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import Any

import jax

from effjax import config as config_lib
from effjax import paths


def say(msg: str) -> None:
  """A progress line on stderr (stdout carries the command's result)."""
  print(f"[effjax] {msg}", file=sys.stderr, flush=True)


class RunError(ValueError):
  """The workdir has no run to load (no config.json, no checkpoint, no such step); the
  commands exit 2 on it with the message."""


@dataclasses.dataclass
class LoadedRun:
  workdir: str
  step: int
  config: Any       # the run's config.json with the overrides, resolved for this device
  tokenizer: Any
  model: Any        # models.FunctionalModel (eval_score applied)
  params: dict
  buffers: dict
  plan: Any


def read_config(workdir: str, overrides: dict | None = None) -> config_lib.Config:
  """The run's config.json with dotted `overrides` applied and checked."""
  path = paths.as_path(workdir) / "config.json"
  if not paths.as_path(workdir).is_dir():
    raise RunError(f"workdir {workdir} does not exist")
  if not path.exists():
    raise RunError(f"{path} not found: {workdir} holds no training run (config.json is written "
                   "when training starts)")
  config = config_lib.from_dict(paths.read_json(path))
  return config_lib.validate(config_lib.apply_overrides(config, overrides or {}))


def checkpoint_steps(workdir: str) -> list[int]:
  directory = paths.as_path(workdir) / "checkpoints"
  if not directory.is_dir():
    return []
  return sorted(int(d.name) for d in directory.iterdir() if d.name.isdigit())


def load_run(workdir: str, *, step: int | None = None, overrides: dict | None = None,
             tokenizer=None) -> LoadedRun:
  """The run in `workdir` at checkpoint `step` (default: the latest)."""
  from effjax import data as data_lib  # pylint: disable=g-import-not-at-top
  from effjax import resolve as resolve_lib  # pylint: disable=g-import-not-at-top
  from effjax.parallel import make_mesh, sharding  # pylint: disable=g-import-not-at-top
  from effjax.train.checkpoint import Checkpointer  # pylint: disable=g-import-not-at-top
  from effjax.train.plan import plan_state  # pylint: disable=g-import-not-at-top

  config = read_config(workdir, overrides)
  steps = checkpoint_steps(workdir)
  if not steps:
    raise RunError(f"{workdir} has no checkpoint yet (checkpoints/ is empty or missing)")
  step = steps[-1] if step is None else step
  if step not in steps:
    raise RunError(f"{workdir} has no checkpoint at step {step}; available: "
                   f"{', '.join(map(str, steps))}")
  # One device: a plain data-parallel mesh of size 1, whatever mesh the run trained on.
  config = dataclasses.replace(config, mesh=config_lib.MeshConfig())
  devices = jax.devices()[:1]
  config = resolve_lib.resolve(config, devices)
  d = config.data
  tokenizer = tokenizer or data_lib.load_tokenizer(d.tokenizer, eos_token=d.eos_token or None)
  mesh = make_mesh(config.mesh, devices)
  plan = plan_state(config, tokenizer.vocab_size, mesh, sharding.rules_for(config.mesh))
  ckpt = Checkpointer(paths.as_path(workdir) / "checkpoints", keep=max(len(steps), 1))
  try:
    state = ckpt.restore(step, plan.abstract())
  except ValueError as e:
    raise RunError(f"the checkpoint at step {step} in {ckpt.directory} does not fit the run's "
                   f"config.json: {str(e).splitlines()[0][:300]}") from None
  finally:
    ckpt.close()
  return LoadedRun(workdir=workdir, step=step, config=config, tokenizer=tokenizer,
                   model=plan.eval_model, params=state.params, buffers=state.buffers, plan=plan)


@dataclasses.dataclass
class CommandRun:
  """What `open_for_command` gives a command: its parsed flags, the --config.* overrides,
  the loaded run and the seconds loading took."""
  args: argparse.Namespace
  overrides: dict
  run: LoadedRun
  seconds: float


def open_for_command(argv: list[str] | None, parser: argparse.ArgumentParser, *,
                     check=None) -> CommandRun | int:
  """The shared preamble of the commands that read a run (effjax.eval, effjax.generate):
  split --config.* overrides from argv (default sys.argv[1:]), parse the rest with `parser`
  (it needs --workdir and --step), run `check(args)` (an error message or None) and load the
  run. Returns the CommandRun, or the exit code 2 after printing why (no run, bad flags or
  config)."""
  argv = sys.argv[1:] if argv is None else argv
  try:
    _, overrides, rest = config_lib.parse_override_args(argv)
  except config_lib.ConfigError as e:
    print(f"effjax: {e}", file=sys.stderr)
    return 2
  args = parser.parse_args(rest)
  problem = check(args) if check else None
  if problem:
    print(f"effjax: {problem}", file=sys.stderr)
    return 2
  t0 = time.perf_counter()
  say(f"loading {args.workdir} ...")
  try:
    run = load_run(args.workdir, step=args.step, overrides=overrides)
  except (RunError, config_lib.ConfigError) as e:
    print(f"effjax: {e}", file=sys.stderr)
    return 2
  return CommandRun(args, overrides, run, time.perf_counter() - t0)

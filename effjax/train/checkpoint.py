"""Orbax checkpointing of the whole train state plus the grain data-iterator position.

Each checkpoint step directory holds up to three items:
  state:  TrainState as a pure pytree (params, optimizer state, buffers, rng, step),
          saved asynchronously, restored directly into the target shardings (so a
          checkpoint written under one mesh restores under another);
  data:   the grain iterator state (one JSON file per process);
  config: the run's config as JSON (compared with the current one on restore);
and, once orbax has committed it, a manifest (MANIFEST: size and CRC32 of every file)
so a torn or bit-rotted checkpoint is recognised before it is restored. The manifest of a
step is computed on a background thread while training goes on (the next save, a restore
and close wait for it), so checksumming a large checkpoint does not stall the step loop.

`restore_good` picks the checkpoint a run resumes from: the newest one (or an explicit
step) that verifies and restores; each one that does not is reported by name and moved
aside to `checkpoints_aside/`, and the next older one is tried. It never falls back to
step 0 silently: if checkpoints exist and none restores, it raises CheckpointError.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import shutil
import time
import zlib
from typing import Callable

import grain
import jax
import orbax.checkpoint as ocp

from effjax import paths
from effjax.train.state import TrainState

MANIFEST = "effjax_manifest.json"


class CheckpointError(ValueError):
  """No checkpoint of the workdir can be restored (each failure is in the message)."""


def _crc32(path: str) -> int:
  crc = 0
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      crc = zlib.crc32(block, crc)
  return crc


def _files(step_dir: str) -> list[str]:
  out = []
  for root, _, names in os.walk(step_dir):
    out += [os.path.relpath(os.path.join(root, n), step_dir) for n in names
            if not n.startswith(MANIFEST)]  # the manifest and its .tmp
  return sorted(out)


class Checkpointer:
  """Thin wrapper over ocp.CheckpointManager: save / restore_good / wait / close."""

  def __init__(self, directory, *, keep: int = 3, async_save: bool = True,
               owner: bool = False):
    """directory: a local path or a cloud URL (effjax/paths.py); Orbax writes either.

    owner: the run that writes here (the trainer): deletes the tmp directories of saves
    killed mid-write and seals every step on close. Readers (export, tools) leave both alone,
    so they are safe to run next to a live run.

    Manifests (sizes and CRC32s) and moving bad checkpoints aside are done for local
    directories only; in a cloud store the object store checksums uploads itself, and a
    checkpoint that fails to restore is reported and skipped, not moved."""
    self.directory = paths.absolute(directory)
    self._local = not paths.is_url(self.directory)
    self.aside = str(self.directory) + "_aside"  # checkpoints that failed or were superseded
    self._owner = owner
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save,
                                           cleanup_tmp_directories=owner)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "data", "config"))
    self._is_main = jax.process_index() == 0
    self._keep = keep
    self._manifest_pool = concurrent.futures.ThreadPoolExecutor(
        max_workers=1, thread_name_prefix="effjax-manifest")
    self._manifest_job: concurrent.futures.Future | None = None

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def step_dir(self, step: int) -> str:
    return os.path.join(str(self.directory), str(step))

  # ------------------------------------------------------------------------- save

  def save(self, step: int, state: TrainState, data_iterator=None, *, config: dict | None = None,
           force: bool = True) -> bool:
    self._owner = True  # whoever saves seals
    self.seal(background=True)  # the previous save is finished; its manifest is written
    # beside training (joined by the next seal, a restore or close)
    items = {"state": ocp.args.StandardSave(state.as_dict())}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    if config is not None:
      items["config"] = ocp.args.JsonSave(config)
    saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
    if saved:
      logging.info("checkpoint at step %d (async) -> %s", step, self.directory)
    return saved

  def seal(self, *, background: bool = False):
    """Waits for pending saves, then writes the manifest of each committed step lacking one
    (process 0; a kill between commit and manifest leaves a step that is still restorable,
    only unverified). background: the manifests are written on the manifest thread (the next
    seal waits for it); not with keep=1, where the next save may delete the step being read."""
    self._join_manifests()
    self.manager.wait_until_finished()
    if not self._is_main or not self._local:
      return
    steps = [s for s in self.manager.all_steps()
             if not os.path.exists(os.path.join(self.step_dir(s), MANIFEST))]
    if background and self._keep != 1:
      self._manifest_job = self._manifest_pool.submit(self._write_manifests, steps)
    else:
      self._write_manifests(steps)

  def _join_manifests(self):
    """Waits for the manifest thread; its failure is logged, not raised (a step without a
    manifest is still restorable, only unverified)."""
    job, self._manifest_job = self._manifest_job, None
    if job is not None:
      try:
        job.result()
      except OSError as e:
        logging.warning("checkpoint manifest not written: %s", e)

  def _write_manifests(self, steps: list[int]):
    for step in steps:
      step_dir = self.step_dir(step)
      path = os.path.join(step_dir, MANIFEST)
      if os.path.isdir(step_dir) and not os.path.exists(path):
        files = {rel: [os.path.getsize(os.path.join(step_dir, rel)),
                       _crc32(os.path.join(step_dir, rel))] for rel in _files(step_dir)}
        with open(path + ".tmp", "w") as f:
          json.dump({"step": step, "files": files}, f)
        os.replace(path + ".tmp", path)

  # ------------------------------------------------------------------------- verify

  def verify(self, step: int) -> str | None:
    """What is wrong with the files of a step (None: nothing found). With a manifest every
    file's size and CRC32 is checked; without one, only that the state item is there."""
    self._join_manifests()
    if not self._local:
      return None
    step_dir = self.step_dir(step)
    path = os.path.join(step_dir, MANIFEST)
    if not os.path.exists(path):
      return None if os.path.isdir(os.path.join(step_dir, "state")) else "the state item is missing"
    try:
      with open(path) as f:
        files = json.load(f)["files"]
    except (OSError, ValueError, KeyError) as e:
      return f"unreadable manifest ({e})"
    for rel, (size, crc) in sorted(files.items()):
      full = os.path.join(step_dir, rel)
      if not os.path.exists(full):
        return f"missing file {rel}"
      if os.path.getsize(full) != size:
        return f"truncated or resized file {rel} ({os.path.getsize(full)} bytes, expected {size})"
      if _crc32(full) != crc:
        return f"checksum mismatch in {rel}"
    return None

  def saved_config(self, step: int) -> dict | None:
    """The config a checkpoint was written with (None for checkpoints without one)."""
    if not paths.as_path(os.path.join(self.step_dir(step), "config")).is_dir():
      return None
    return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))[
        "config"]

  # ------------------------------------------------------------------------- restore

  def restore(self, step: int, abstract_state: TrainState, data_iterator=None) -> TrainState:
    """Restores into `abstract_state` (ShapeDtypeStructs carrying target shardings)."""
    items = {"state": ocp.args.StandardRestore(abstract_state.as_dict())}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))["state"]
    # Orbax returns NamedTuples (optax states) as plain tuples: put the target's tree
    # structure back (the leaf order is the same).
    target = abstract_state.as_dict()
    leaves = jax.tree.leaves(restored)
    if len(leaves) != len(jax.tree.leaves(target)):
      raise ValueError(f"checkpoint at step {step} in {self.directory} does not match the "
                       "model/optimizer of this config (different number of arrays)")
    return TrainState(**jax.tree.unflatten(jax.tree.structure(target), leaves))

  def restore_good(self, abstract_state: TrainState, data_iterator=None, *,
                   step: int | None = None, check_config: Callable[[int, dict], None] | None = None,
                   report: Callable[[str], None] = print) -> tuple[int, TrainState | None]:
    """(step, state) of the newest checkpoint that verifies and restores, or of `step` when
    given (newer checkpoints are then moved aside, so the run overwrites nothing); (0, None)
    when there is no checkpoint at all.

    check_config(step, saved_config) raises when the checkpoint's config does not fit this
    run: that stops the search (an older checkpoint of the same run would not fit either).
    A checkpoint that fails to verify or restore is reported, moved aside, and the next
    older one is tried; CheckpointError when none is left.
    """
    steps = self.all_steps()
    if step:
      if step not in steps:
        raise CheckpointError(f"restore_step={step}: no checkpoint at that step in "
                              f"{self.directory} (available: {steps or 'none'})")
      newer = [s for s in steps if s > step]
      if newer:
        report(f"restore_step={step}: moving the newer checkpoints {newer} to {self.aside}")
        self._move_aside(newer, "superseded")
      steps = [step]
    failures = []
    for s in sorted(steps, reverse=True):
      problem = self.verify(s)
      if problem is None:
        saved = self._saved_config_or_problem(s)
        if isinstance(saved, str):
          problem = saved
        elif saved is not None and check_config is not None:
          check_config(s, saved)
      if problem is None:
        problem = self._shapes_problem(s, abstract_state)
      if problem is None:
        try:
          return s, self.restore(s, abstract_state, data_iterator)
        except Exception as e:  # pylint: disable=broad-except  (orbax/tensorstore raise many kinds)
          problem = f"restore failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
      failures.append(f"step {s}: {problem}")
      report(f"WARNING: checkpoint {self.step_dir(s)} is unusable ({problem}); moving it to "
             f"{self.aside} and trying the next older one")
      self._move_aside([s], "bad")
    if failures:
      raise CheckpointError(f"no checkpoint in {self.directory} could be restored ("
                            + "; ".join(failures) + f"). They were moved to {self.aside}; "
                            "restart from scratch with a new --workdir (or move one back).")
    return 0, None

  def _shapes_problem(self, step: int, abstract_state: TrainState) -> str | None:
    """A checkpoint of another model is not damage: CheckpointError (nothing moved) when the
    array shapes differ from this config's; a description when the metadata is unreadable."""
    try:
      meta = ocp.StandardCheckpointer().metadata(os.path.join(self.step_dir(step), "state"))
    except Exception as e:  # pylint: disable=broad-except
      return f"unreadable state metadata ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
    tree = getattr(getattr(meta, "item_metadata", meta), "tree", meta)
    saved = sorted((tuple(x.shape), str(x.dtype)) for x in jax.tree.leaves(tree))
    wanted = sorted((tuple(x.shape), str(x.dtype)) for x in jax.tree.leaves(abstract_state))
    if saved != wanted:
      raise CheckpointError(
          f"the checkpoint at step {step} in {self.directory} holds another model or optimizer "
          f"({len(saved)} arrays, {len(wanted)} expected, or different shapes) and has no "
          "config to name the keys; use the config it was written with, or a new --workdir")
    return None

  def _saved_config_or_problem(self, step: int):
    try:
      return self.saved_config(step)
    except Exception as e:  # pylint: disable=broad-except
      return f"unreadable config item ({type(e).__name__})"

  def _move_aside(self, steps: list[int], why: str):
    """Moves step directories out of the manager's sight (process 0; all processes reload)."""
    self._join_manifests()
    if self._is_main and self._local:
      os.makedirs(self.aside, exist_ok=True)
      stamp = time.strftime("%Y%m%d-%H%M%S")
      for s in steps:
        if os.path.isdir(self.step_dir(s)):
          shutil.move(self.step_dir(s), os.path.join(self.aside, f"{s}.{why}.{stamp}"))
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices("effjax_checkpoint_move_aside")
    self.manager.reload()

  def wait(self):
    self._join_manifests()
    self.manager.wait_until_finished()

  def close(self):
    if self._owner:
      self.seal()
    self._join_manifests()
    self.manager.wait_until_finished()
    self.manager.close()
    self._manifest_pool.shutdown(wait=True)

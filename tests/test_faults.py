"""Fault tolerance (issue 17; docs/fault-tolerance.md): corrupt or partial checkpoints fall back
to the next older good one by name, restore_step, the checkpoint's own config is checked,
in-memory snapshots roll back a fault and skip its batch."""

import glob
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from effjax import config as C
from effjax.train import snapshot, trainer
from effjax.train.checkpoint import MANIFEST
from tests.conftest import TINY

FAST = ["--config.train.steps=6", "--config.train.eval_every=6", "--config.train.log_every=2",
        "--config.train.checkpoint_every=2", "--config.train.warmup_steps=1"]


@pytest.fixture(scope="module")
def tiny_data():
  cfg, _ = C.load(["--config=" + TINY])
  return trainer.load_data(cfg)


def _cfg(*overrides):
  cfg, _ = C.load(["--config=" + TINY, *FAST, *overrides])
  return cfg


def final_params(workdir, step=6):
  """The params of a workdir's checkpoint, as numpy leaves."""
  restored = ocp.StandardCheckpointer().restore(
      os.path.join(os.path.abspath(workdir), "checkpoints", str(step), "state"))
  return [np.asarray(x) for x in jax.tree.leaves(restored["params"])]


def assert_same_params(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_data):
  """Params after 6 uninterrupted steps."""
  workdir = str(tmp_path_factory.mktemp("ref"))
  assert trainer.train(_cfg(), workdir, data=tiny_data, quiet=True).exit_code == 0
  return final_params(workdir)


@pytest.fixture(scope="module")
def stopped_at_4(tmp_path_factory, tiny_data):
  """A workdir interrupted at step 4 (checkpoints 2 and 4); tests work on copies."""
  workdir = str(tmp_path_factory.mktemp("stopped") / "w")
  assert trainer.train(_cfg(), workdir, data=tiny_data, quiet=True, stop_at=4).exit_code == 75
  return workdir


def _copy(src, tmp_path):
  workdir = str(tmp_path / "w")
  shutil.copytree(src, workdir)
  return workdir


def _largest_file(step_dir):
  files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "*"), recursive=True)
           if os.path.isfile(f)]
  return max(files, key=os.path.getsize)


def _corrupt(step_dir, kind):
  if kind == "truncate":
    path = _largest_file(step_dir)
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)
  elif kind == "bitflip":  # same size, one byte changed: only the checksum sees it
    path = _largest_file(step_dir)
    with open(path, "r+b") as f:
      f.seek(os.path.getsize(path) // 2)
      byte = f.read(1)
      f.seek(-1, os.SEEK_CUR)
      f.write(bytes([byte[0] ^ 0xFF]))
  elif kind == "missing_item":
    shutil.rmtree(os.path.join(step_dir, "data"))
  elif kind == "truncate_unverified":  # no manifest (killed before it was written)
    os.remove(os.path.join(step_dir, MANIFEST))
    _corrupt(step_dir, "truncate")
  else:
    raise ValueError(kind)


# Default suite: a torn file and a checksum mismatch; the other two kinds (slow) take the
# same fallback path and cost ~40 s each on the 2-core CI machine.
@pytest.mark.parametrize("kind", ["truncate", "bitflip",
                                  pytest.param("missing_item", marks=pytest.mark.slow),
                                  pytest.param("truncate_unverified", marks=pytest.mark.slow)])
def test_corrupt_newest_checkpoint_falls_back_to_older_by_name(tmp_path, tiny_data, reference,
                                                                stopped_at_4, kind, capfd):
  workdir = _copy(stopped_at_4, tmp_path)
  _corrupt(os.path.join(workdir, "checkpoints", "4"), kind)
  capfd.readouterr()
  r = trainer.train(_cfg(), workdir, data=tiny_data, quiet=True)
  err = capfd.readouterr().err
  assert r.exit_code == 0 and r.step == 6
  assert os.path.join("checkpoints", "4") in err and "unusable" in err, err
  assert glob.glob(os.path.join(workdir, "checkpoints_aside", "4.bad.*"))
  # resumed from step 2, not step 0: the result is the uninterrupted run's, bit for bit
  assert_same_params(final_params(workdir), reference)


def test_no_good_checkpoint_stops_naming_each_instead_of_step_0(tmp_path, tiny_data,
                                                               stopped_at_4):
  workdir = _copy(stopped_at_4, tmp_path)
  _corrupt(os.path.join(workdir, "checkpoints", "4"), "bitflip")
  _corrupt(os.path.join(workdir, "checkpoints", "2"), "missing_item")
  with pytest.raises(trainer.WorkdirError, match=r"step 4: checksum mismatch.*step 2: missing"):
    trainer.train(_cfg(), workdir, data=tiny_data, quiet=True)
  assert not os.path.exists(os.path.join(workdir, "checkpoints", "6"))


def test_restore_step_resumes_from_that_checkpoint(tmp_path, tiny_data, reference,
                                                  stopped_at_4):
  workdir = _copy(stopped_at_4, tmp_path)
  with pytest.raises(trainer.WorkdirError, match=r"restore_step=3.*available: \[2, 4\]"):
    trainer.train(_cfg(), workdir, data=tiny_data, quiet=True, restore_step=3)
  r = trainer.train(_cfg(), workdir, data=tiny_data, quiet=True, restore_step=2)
  assert r.exit_code == 0 and r.step == 6
  assert glob.glob(os.path.join(workdir, "checkpoints_aside", "4.superseded.*"))
  assert_same_params(final_params(workdir), reference)


def test_checkpoint_config_is_compared_naming_incompatible_keys(tmp_path, tiny_data,
                                                               stopped_at_4):
  """Without config.json (e.g. copied checkpoints) the checkpoint's own config still guards
  the resume; a compatible change (train.steps, train.lr) is allowed."""
  workdir = _copy(stopped_at_4, tmp_path)
  os.remove(os.path.join(workdir, "config.json"))
  with pytest.raises(trainer.WorkdirError,
                     match=r"checkpoint at step 4.*model.d_model \(32 -> 64\)") as e:
    trainer.train(_cfg("--config.model.d_model=64"), workdir, data=tiny_data, quiet=True)
  assert "train.steps" not in str(e.value)
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "4"))  # a mismatch is not corruption
  r = trainer.train(_cfg("--config.train.steps=8", "--config.train.lr=0.02"), workdir,
                    data=tiny_data, quiet=True)
  assert r.exit_code == 0 and r.step == 8


# ----------------------------------------------------------------------------- snapshots

ROLLBACK = ["--config.train.snapshot_every=2", "--config.train.on_nan=rollback"]


def _rows(workdir):
  from effjax.train.metrics import read_metrics
  return read_metrics(os.path.join(workdir, "metrics.jsonl"))


@pytest.mark.parametrize("mode", ["nan", pytest.param("raise", marks=pytest.mark.slow)])
def test_rollback_skips_the_bad_batch_like_a_run_that_never_saw_it(tmp_path, tiny_data, reference,
                                                                    mode, capfd):
  """The batch of step 3 is poisoned (NaN loss and params, or an exception, every time it is
  seen): the run restores the snapshot of step 2, skips that batch and ends with the params
  of a run that skipped it from the start."""
  faulty = snapshot.FaultInjector(poison_at={3}, mode=mode)
  r = trainer.train(_cfg(*ROLLBACK), str(tmp_path / "a"), data=tiny_data, quiet=True,
                    faults=faulty)
  assert r.exit_code == 0 and r.step == 6 and faulty.faults == 1
  assert "rollback 1/3 to the in-memory snapshot of step 2, skipping the batch of step 3" in (
      capfd.readouterr().err)
  skipped = snapshot.FaultInjector(skip_at={3})
  assert trainer.train(_cfg(), str(tmp_path / "b"), data=tiny_data, quiet=True,
                       faults=skipped).exit_code == 0
  assert_same_params(final_params(tmp_path / "a"), final_params(tmp_path / "b"))
  with pytest.raises(AssertionError):  # skipping a batch does change the run
    assert_same_params(final_params(tmp_path / "a"), reference)
  rows = _rows(str(tmp_path / "a"))
  assert [r["step"] for r in rows if "fault/rollback" in r] == [2]
  train_steps = [r["step"] for r in rows if "train/loss" in r]
  assert train_steps == sorted(set(train_steps)) == [2, 4, 6]  # replayed rows not duplicated


def test_rollbacks_are_capped(tmp_path, tiny_data, capfd):
  faulty = snapshot.FaultInjector(poison_at={1, 3})
  r = trainer.train(_cfg(*ROLLBACK, "--config.train.max_rollbacks=1"), str(tmp_path),
                    data=tiny_data, quiet=True, faults=faulty)
  assert r.exit_code == trainer.EXIT_NONFINITE and faulty.faults == 2
  assert "no rollback left (1 of train.max_rollbacks=1 used)" in capfd.readouterr().err


def test_rollback_needs_snapshots():
  with pytest.raises(C.ConfigError, match="train.snapshot_every"):
    C.load(["--config=" + TINY, "--config.train.on_nan=rollback"])


def test_snapshot_restores_the_state_bit_for_bit(tiny_data):
  """take/settle/restore round-trips every leaf (values, dtypes, shardings)."""
  from tests.conftest import tiny_step_setup
  _, _, step_fn, batch, state = tiny_step_setup(_cfg())
  state, _ = step_fn(state, batch)
  snaps = snapshot.Snapshots(1)
  snaps.take(1, state, {"next_index": 1}, trusted=True)
  back = snaps.restore()
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(back)):
    assert a.dtype == b.dtype and a.sharding == b.sharding
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert snaps.settled.data_state == {"next_index": 1} and snaps.settled.nbytes() > 0


def test_cli_restore_step_must_be_a_step(tmp_path):
  from tests.conftest import run_module
  proc = run_module(["-m", "effjax.train", "--config=" + TINY, f"--workdir={tmp_path / 'w'}",
                     "--restore_step=latest"])
  assert proc.returncode == 2 and "--restore_step must be a positive step number" in proc.stderr
  assert "Traceback" not in proc.stderr and not os.path.exists(tmp_path / "w")


def test_another_models_checkpoint_is_refused_not_moved_aside(tmp_path, tiny_data, stopped_at_4):
  """Without any saved config (old checkpoints, no config.json) a shape mismatch is a refusal,
  not damage: the checkpoints stay where they are."""
  workdir = _copy(stopped_at_4, tmp_path)
  os.remove(os.path.join(workdir, "config.json"))
  for step in (2, 4):
    shutil.rmtree(os.path.join(workdir, "checkpoints", str(step), "config"))
    os.remove(os.path.join(workdir, "checkpoints", str(step), MANIFEST))
  with pytest.raises(trainer.WorkdirError, match="step 4.*another model"):
    trainer.train(_cfg("--config.model.d_model=64"), workdir, data=tiny_data, quiet=True)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]


def test_manifests_are_written_off_the_training_thread(tmp_path, monkeypatch):
  """The checksums of step 1 are computed on the manifest thread when step 2 is saved (not on
  the caller's thread), every step has a manifest after close, and a flipped byte is caught."""
  import threading  # pylint: disable=g-import-not-at-top
  from effjax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  threads = []
  crc32 = ckpt_lib._crc32  # pylint: disable=protected-access
  monkeypatch.setattr(ckpt_lib, "_crc32",
                      lambda p: threads.append(threading.current_thread().name) or crc32(p))
  state = ckpt_lib.TrainState(step=jnp.array(0), params={"w": jnp.arange(64.0)}, opt_state=(),
                              buffers={}, rng=jnp.zeros(2, jnp.uint32))
  ck = ckpt_lib.Checkpointer(tmp_path / "ck", keep=3, owner=True)
  ck.save(1, state)
  ck.save(2, state)  # step 1's manifest goes to the manifest thread
  ck.wait()
  assert threads and all(n.startswith("effjax-manifest") for n in threads), threads
  before = len(threads)
  ck.close()  # step 2's manifest: written before close returns
  assert len(threads) > before
  assert all((tmp_path / "ck" / str(s) / ckpt_lib.MANIFEST).exists() for s in (1, 2))
  assert ck.verify(1) is None and ck.verify(2) is None
  victim = max((p for p in (tmp_path / "ck" / "1").rglob("*") if p.is_file()
                and p.name != ckpt_lib.MANIFEST), key=lambda p: p.stat().st_size)
  data = bytearray(victim.read_bytes())
  data[len(data) // 2] ^= 0xFF
  victim.write_bytes(bytes(data))
  assert "checksum mismatch" in ck.verify(1)

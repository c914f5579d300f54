"""The training loop: data, model, sharded state, jitted steps, eval, checkpoints, metrics.

`train(config, workdir)` runs (or resumes) a run; the CLI in __main__.py is a thin
wrapper. Behaviour the rest of effjax relies on:
  * the same command on the same workdir resumes from the latest checkpoint and
    continues bit-for-bit (params, optimizer, buffers, rng, data position);
  * SIGTERM / Ctrl-C save a checkpoint and exit with EXIT_INTERRUPTED;
  * a non-finite loss stops the run with EXIT_NONFINITE, keeping the last good
    checkpoint (no checkpoint is written after the bad step), or, with
    train.on_nan=rollback, restores the newest in-memory snapshot and skips the batch;
  * a damaged checkpoint is reported, moved aside and the next older one restored
    (checkpoint.Checkpointer.restore_good; docs/fault-tolerance.md);
  * with train.local_checkpoint_dir (several processes), frequent local checkpoints too; a
    restart resumes from the newest local step when it is newer (local_tier.py);
  * only process 0 writes metrics, plots and the config (the user's, `auto` included;
    what `auto` became for this run's devices is run_info.json's "resolved").
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from effjax import checks
from effjax import config as config_lib
from effjax import data as data_lib
from effjax import models
from effjax import paths
from effjax import resolve as resolve_lib
from effjax.models import masa
from effjax.optim import scaling
from effjax.parallel import make_mesh, replicated, sharding
from effjax.train import evaluation
from effjax.train import flops as flops_lib
from effjax.train import local_tier
from effjax.train.checkpoint import CheckpointError, Checkpointer
from effjax.train.extensions import merged_phase, phase_intervals
from effjax.train.metrics import MetricsWriter, ProgressBar, plot_metrics, read_metrics
from effjax.train.plan import plan_state
from effjax.train.registry import build_extensions
from effjax.train.sample import sample_text
from effjax.train.snapshot import FaultInjector, InjectedFault, Snapshots
from effjax.train.state import TrainState
from effjax.train.stop import StopFlag

EXIT_OK = 0
EXIT_NONFINITE = 3
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: rerun the same command to resume


class NonFiniteLoss(RuntimeError):
  """A non-finite loss or norm; `step` is the step it produced (its batch was drawn at step-1)."""

  def __init__(self, message: str, step: int):
    super().__init__(message)
    self.step = step


class WorkdirError(ValueError):
  """The workdir cannot hold this run (a file, or a checkpoint of another model); the CLI
  exits 2 on it, before anything is written."""


@dataclasses.dataclass
class RunResult:
  exit_code: int
  step: int
  final_metrics: dict
  workdir: str


@dataclasses.dataclass
class DataBundle:
  tokenizer: object
  corpus: object


def load_data(config: config_lib.Config) -> DataBundle:
  d = config.data
  tokenizer = data_lib.load_tokenizer(d.tokenizer, eos_token=d.eos_token or None,
                                      cache_dir=d.cache_dir or None)
  if d.sources:  # a weighted mixture (effjax/data/mixture.py)
    return DataBundle(tokenizer, data_lib.load_mixture(
        d.sources, tokenizer, val_percent=d.val_percent, token_dtype=d.token_dtype,
        cache_dir=d.cache_dir or None))
  corpus = data_lib.load_corpus(d.corpus, d.paths or None, tokenizer, val_percent=d.val_percent,
                                token_dtype=d.token_dtype, cache_dir=d.cache_dir or None)
  return DataBundle(tokenizer, corpus)


def _git_commit() -> str:
  try:
    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                         text=True, timeout=5)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                           capture_output=True, text=True, timeout=5).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
  except (OSError, subprocess.SubprocessError):
    return "unknown"


def _global_batch(batch: dict, sharding, global_rows: int) -> dict:
  """Global arrays from this process's rows of the batch (see process_batch_slot)."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v, np.int32),
                                                    (global_rows,) + np.shape(v)[1:])
          for k, v in batch.items()}


def train(config: config_lib.Config, workdir: str, *, data: DataBundle | None = None,
          quiet: bool = False, stop_at: int | None = None,
          restore_step: int | None = None, faults: FaultInjector | None = None) -> RunResult:
  """Runs or resumes the training run described by `config` in `workdir`.

  `stop_at` behaves like a preemption at that step (checkpoint, EXIT_INTERRUPTED):
  used to test exact resume, and to run a long config in chunks. `restore_step` resumes
  from that checkpoint instead of the newest good one (newer ones are moved aside).
  """
  run = _setup(config, workdir, data, quiet, restore_step)
  if run.start >= run.config.train.steps:
    run.say(f"run already complete at step {run.start} (train.steps = "
            f"{run.config.train.steps}); nothing to do")
    run.ckpt.close()
    if run.local:
      run.local.close()
    return RunResult(EXIT_OK, run.start, _last_metrics(workdir), workdir)
  if run.is_main:  # training starts: config.json is this config from here on
    _write_config(workdir, run.user_config)
  _compile_first_step(run)
  _write_run_info(run)
  exit_code, step, last, eval_stats = _loop(run, stop_at, faults)
  return _finish(run, exit_code, step, last, eval_stats)


@dataclasses.dataclass
class _Run:
  """Everything the loop and the finish need, built once by `_setup`."""
  config: config_lib.Config       # resolved for the mesh's devices
  user_config: config_lib.Config  # as given (config.json)
  workdir: str
  plan: Any
  tokenizer: Any
  corpus: Any
  data_iter: Any
  ckpt: Checkpointer
  state: TrainState
  start: int
  extensions: list
  eval_data: list
  token_bytes: jax.Array
  is_main: bool
  quiet: bool
  say: Callable
  warn: Callable
  changed: dict = dataclasses.field(default_factory=dict)  # key -> [old, new] on a resume
  compiled: dict = dataclasses.field(default_factory=dict)  # phase -> (step, eval, flops)
  compile_times: list = dataclasses.field(default_factory=list)
  variant_evals: dict = dataclasses.field(default_factory=dict)  # (name, phase) -> eval step
  batch: dict | None = None
  phase: tuple = ()
  info: dict = dataclasses.field(default_factory=dict)
  eval_sets: dict = dataclasses.field(default_factory=dict)  # data.sources: name -> batches
  start_data_state: Any = None  # the data iterator before the first batch (snapshots)
  local: Any = None  # local_tier.LocalTier (train.local_checkpoint_dir) or None

  def global_batch(self, local: dict) -> dict:
    return _global_batch(local, self.plan.batch_sharding, self.config.train.batch_size)

  def step_for(self, phase: tuple):
    """(compiled step, eval step, FLOPs per token) of a phase, compiled once."""
    if phase not in self.compiled:
      step_c, seconds = self.plan.compile_step(self.state, self.batch, self.extensions, phase)
      self.compile_times.append(seconds)
      self.compiled[phase] = (step_c, self.plan.eval_step(self.token_bytes, phase),
                              self.flops_per_token(phase))
    return self.compiled[phase]

  def flops_per_token(self, phase: tuple) -> float:
    """Training FLOPs per token of a phase (MoE top-k schedules change it)."""
    model_config, dims = self.config.model, self.plan.model.dims
    return flops_lib.flops_per_token(
        dims, self.config.train.seq_len, tie_embeddings=model_config.tie_embeddings,
        ffn_active_params=models.ffn_params(model_config, dims,
                                            dict(phase).get("moe_top_k"))[1],
        mor=model_config.mor, **masa.flop_terms(model_config, dims, self.config.train))

  def flops_before(self, step: int) -> float:
    """Counted training FLOPs of steps [0, step): model FLOPs per token of each step's phase
    x tokens per step, plus the optimizer's and constraints' matrix FLOPs per step."""
    t = self.config.train
    return sum((end - start) * (self.flops_per_token(merged_phase(self.extensions, start))
                                * t.batch_size * t.seq_len + self.info["optimizer_flops_per_step"])
               for start, end in phase_intervals(self.extensions, step))


def _setup(config, workdir, data, quiet, restore_step=None) -> _Run:
  """Data, mesh, resolved config, plan, workdir, restored or initialised state, extensions.
  Everything that can fail on bad input happens before anything is written."""
  config = checks.validate(config, jax.device_count())  # the CLI checked each section only
  wd = paths.as_path(workdir)  # a local folder or a cloud URL: all workdir I/O goes through it
  if wd.exists() and not wd.is_dir():
    raise WorkdirError(f"workdir {workdir} is a file, not a directory; pass another "
                       "--workdir")
  t = config.train
  is_main = jax.process_index() == 0
  warn = lambda msg: print(f"[effjax p{jax.process_index()}] {msg}", file=sys.stderr, flush=True)
  say = (lambda *a: None) if quiet or not is_main else warn  # progress: process 0 only
  if data is None:  # start-up progress: the first seconds are otherwise silent
    say(f"loading corpus '{config.data.corpus}' (tokenizer {config.data.tokenizer}) ...")
    data = load_data(config)
  say("building the model, optimizer and device mesh ...")
  mesh = make_mesh(config.mesh)
  # `auto` fixed once for the mesh's devices; config.json keeps the user's config.
  user_config, config = config, resolve_lib.resolve(config, mesh.devices.flat)
  plan = plan_state(config, data.tokenizer.vocab_size, mesh, sharding.rules_for(config.mesh))
  # This process reads the rows of each global batch that its devices hold.
  slot, slots = sharding.process_batch_slot(plan.batch_sharding, t.batch_size)
  shard_kw = dict(batch_size=t.batch_size // slots, process_index=slot, process_count=slots)
  mixture = data.corpus if isinstance(data.corpus, data_lib.Mixture) else None
  eval_sets = data_lib.mixture_eval_batches(
      mixture, seq_len=t.seq_len, num_batches=t.eval_batches, eos_id=data.tokenizer.eos_id,
      **shard_kw) if mixture and t.eval_batches else {}
  eval_batches = data_lib.eval_batches(
      data.corpus.val_tokens, seq_len=t.seq_len, num_batches=t.eval_batches,
      eos_id=data.tokenizer.eos_id, **shard_kw) if t.eval_batches and not mixture else []

  # A resume must fit the checkpoint: compared with the workdir's config.json before
  # anything is written (config.json itself is rewritten only once training starts).
  changed = _check_resume(workdir, user_config) if _has_checkpoint(workdir) else {}
  if changed:
    say("note: resuming with a config that differs from the workdir's config.json for: "
        + ", ".join(f"{k} ({old!r} -> {new!r})" for k, (old, new) in changed.items()))
  wd.mkdir(parents=True, exist_ok=True)

  # Restore the latest checkpoint into this mesh's shardings, or initialise directly into
  # them (each device computes its own shards).
  data_iter = data_lib.make_data_iterator(data.corpus, seq_len=t.seq_len, seed=config.seed,
                                         eos_id=data.tokenizer.eos_id, **shard_kw)
  tier = local_tier.open_tier(config, mesh, plan.abstract())  # None unless local_checkpoint_dir
  ckpt = Checkpointer(wd / "checkpoints", keep=t.keep_checkpoints, owner=True)
  if ckpt.latest_step() or tier:
    say("restoring the newest good checkpoint ...")
  try:  # the newest local step, else checkpoint that verifies, fits and restores (or restore_step)
    start, state, where = local_tier.restore_newest(
        ckpt, tier, plan.abstract(), data_iter, restore_step=restore_step, report=warn, say=say,
        check_config=lambda step, saved: _check_fits(saved, user_config,
                                                     f"the checkpoint at step {step}"))
  except (CheckpointError, WorkdirError) as e:
    ckpt.close()
    if tier:
      tier.close()
    raise WorkdirError(str(e)) from None
  if start:
    say(f"resumed from checkpoint at step {start} in {where}")
  else:
    say("initialising parameters ...")
    state = plan.init()
  token_bytes = jnp.asarray(data.tokenizer.token_byte_lengths, jnp.float32)
  token_bytes = jnp.pad(token_bytes, (0, plan.model.dims.vocab - token_bytes.shape[0]))
  run = _Run(config=config, user_config=user_config, workdir=workdir, plan=plan, changed=changed,
             tokenizer=data.tokenizer, corpus=data.corpus, data_iter=data_iter, ckpt=ckpt,
             state=state, start=start, extensions=build_extensions(config, plan.model),
             eval_data=[], token_bytes=token_bytes, is_main=is_main, quiet=quiet, say=say,
             warn=warn, local=tier)
  run.eval_data = [run.global_batch(b) for b in eval_batches]
  run.eval_sets = {name: [run.global_batch(b) for b in bs] for name, bs in eval_sets.items()}
  run.eval_data = run.eval_data or [b for bs in run.eval_sets.values() for b in bs]
  for ext in run.extensions:
    ext.eval_data = run.eval_data
  return run


def _compile_first_step(run: _Run) -> None:
  """AOT-compiles the step of the starting phase on the first batch (one step per phase;
  compile time is measured on its own)."""
  run.start_data_state = run.data_iter.get_state()
  run.batch = run.global_batch(next(run.data_iter))
  run.phase = merged_phase(run.extensions, run.start)
  run.say("compiling the train step ...")
  run.step_for(run.phase)


def _write_run_info(run: _Run) -> None:
  config, dims, corpus = run.config, run.plan.model.dims, run.corpus
  n_train, n_val = data_lib.token_counts(corpus)
  n_params = models.count_params(dims, config.model.tie_embeddings, config.model)
  peak, peak_source = flops_lib.peak_flops_per_device()
  fpt = run.compiled[run.phase][2]
  run.info = {
      "params_total": n_params["total"], "params_non_embedding": n_params["blocks"],
      "params_active_non_embedding": n_params["active_non_embedding"],
      "flops_per_token": fpt,
      "optimizer_flops_per_step": flops_lib.optimizer_flops_per_step(
          config, run.plan.model.specs, run.plan.model.initial_params),
      "peak_flops": peak * (1 if jax.devices()[0].platform == "cpu" else jax.device_count()),
      "peak_source": peak_source,
      "corpus": corpus.name, "corpus_fingerprint": corpus.fingerprint,
      "train_tokens": n_train, "val_tokens": n_val,
      "tokenizer": config.data.tokenizer, "vocab_size": dims.vocab,
      "adamw_timescale_tau": scaling.adamw_timescale(config),
      "weight_decay": scaling.base_weight_decay(config),
      "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
      "mesh": dict(run.plan.mesh.shape), "jax_version": jax.__version__,
      "commit": _git_commit(), "command": " ".join(sys.argv),
      "resolved": _resolved(run.user_config, config, dims),
  }
  path = paths.as_path(run.workdir) / "run_info.json"
  resumes = []
  if run.start and path.exists():
    resumes = json.loads(path.read_text()).get("resumes", [])
  if run.start:  # the step each resume started from, and the config keys it changed
    resumes.append({"step": run.start, "changed": run.changed})
  run.info["resumes"] = resumes
  if run.is_main:
    paths.write_json(path, run.info, indent=2)
  run.say(f"model: {n_params['total'] / 1e6:.2f}M params ({n_params['blocks'] / 1e6:.2f}M "
          f"non-embedding, {n_params['active_non_embedding'] / 1e6:.2f}M active), "
          f"{fpt / 1e6:.1f} MFLOPs/token; corpus '{corpus.name}' "
          f"({n_train / 1e6:.1f}M train / {n_val / 1e6:.2f}M "
          f"val tokens, fingerprint {corpus.fingerprint[:12]}); devices {run.info['devices']}, "
          f"mesh {run.info['mesh']}; compiled in {run.compile_times[0]:.1f}s")


def _check_finite(step: int, metrics) -> dict:
  """Host copy of a step's metrics; raises NonFiniteLoss on a non-finite loss or norm."""
  host = jax.device_get(metrics)
  for key in ("train/loss", "train/grad_norm", "train/param_norm"):
    if not math.isfinite(float(host[key])):
      raise NonFiniteLoss(f"non-finite {key} ({float(host[key])}) at step {step}", step)
  return host


def _loop(run: _Run, stop_at: int | None, faults: FaultInjector | None = None):
  """The training loop. Periodic actions, each a named helper: profile window, phase
  change (recompile), log, eval, checkpoint, snapshot, stop. The NaN check runs one step
  late (it never blocks dispatch) and at every log/eval/checkpoint step. With
  train.on_nan=rollback a fault restores the newest in-memory snapshot (_rollback)."""
  t, workdir = run.config.train, run.workdir
  compiled_step, eval_fn, fpt = run.step_for(run.phase)
  tokens_per_step = t.batch_size * t.seq_len
  writer = MetricsWriter(workdir, enabled=run.is_main, resume_step=run.start,
                         tensorboard=t.tensorboard, wandb_project=t.wandb_project,
                         run_config=config_lib.to_dict(run.user_config))
  writer.write(run.start, {"perf/compile_time_s": run.compile_times[0],
                           "optim/tau": run.info["adamw_timescale_tau"]})
  bar = ProgressBar(t.steps, run.start, enabled=run.is_main and not run.quiet)
  stop = StopFlag()
  stop.install()
  exit_code, last, eval_stats = EXIT_OK, {}, {}
  flops_seen = run.flops_before(run.start)  # counted training FLOPs (perf/flops_seen)
  window_t0, window_steps = time.perf_counter(), 0
  pending = None  # (step, device metrics) of the previous step, checked one step late
  step = run.start
  profiling = False
  snaps = Snapshots(t.snapshot_every)
  if t.snapshot_every:
    snaps.take(step, run.state, run.start_data_state, trusted=True)
  skip = dict.fromkeys(faults.skip_at, 1) if faults else {}  # step -> batches to skip there
  have_batch, rollbacks = True, 0  # the first batch was taken for compilation
  try:
    while step < t.steps:
     try:
      if t.profile_steps and step == t.profile_steps[0] and run.is_main:
        jax.profiler.start_trace(str(paths.as_path(workdir) / "profile"))
        profiling = True
      if not have_batch:
        run.batch = run.global_batch(next(run.data_iter))
      have_batch = False
      for _ in range(skip.get(step, 0)):  # batches that faulted at this step: the next one
        run.batch = run.global_batch(next(run.data_iter))
      new_phase = merged_phase(run.extensions, step)
      if new_phase != run.phase:
        run.phase = new_phase
        compiled_step, eval_fn, fpt = run.step_for(run.phase)
        bar.message(f"step {step}: phase change {dict(run.phase)} (compiled in "
                    f"{run.compile_times[-1]:.1f}s)")
        writer.write(step, {"perf/compile_time_s": run.compile_times[-1],
                            "train/phase_change": 1.0})
      batch_step = step
      run.state, metrics = compiled_step(run.state, run.batch)
      if faults:
        run.state, metrics = faults.after_step(step, run.batch, run.state, metrics)
      step += 1
      window_steps += 1
      flops_seen += fpt * tokens_per_step + run.info["optimizer_flops_per_step"]
      if pending is not None:
        _check_finite(*pending)
      snaps.settle()  # the previous step is finite: its snapshot can be trusted
      pending = (step, metrics)
      if profiling and step >= t.profile_steps[1]:
        jax.profiler.stop_trace()
        profiling = False

      log_now = step % t.log_every == 0 or step == t.steps
      eval_now = (step % t.eval_every == 0 or step == t.steps) and run.eval_data
      if stop_at is not None and step >= stop_at and not stop.signal_name:
        stop.signal_name = f"stop_at={stop_at}"
      stopping = stop.poll(step)  # read once: a signal arriving later is seen next step
      ckpt_now = step % t.checkpoint_every == 0 or step == t.steps or stopping
      local_now = run.local is not None and run.local.due(step)
      if local_now and not (log_now or eval_now or ckpt_now):  # local: checked steps only
        _check_finite(*pending)
        pending = None
      if log_now or eval_now or ckpt_now:
        row = dict(_check_finite(*pending))
        pending = None
        if log_now:
          dt = (time.perf_counter() - window_t0) / max(window_steps, 1)
          tps = tokens_per_step / dt
          row.update({"perf/step_time_s": dt, "perf/tokens_per_sec": tps,
                      "perf/mfu": fpt * tps / run.info["peak_flops"],
                      "perf/tokens_seen": step * tokens_per_step,
                      "perf/flops_seen": flops_seen})
          bar.update(step, float(row["train/loss"]), tps)
        if eval_now:
          eval_row, eval_stats = evaluation.eval_row(run, eval_fn)
          row.update(eval_row)
          bar.message(f"step {step}: eval/loss {row['eval/loss']:.4f}"
                      + (f", eval/bpb {row['eval/bpb']:.4f}" if "eval/bpb" in row else ""))
        writer.write(step, row)
        last.update(row)
        if ckpt_now and step > (run.ckpt.latest_step() or 0) and not run.ckpt.save(
            step, run.state, run.data_iter, config=json.loads(config_lib.to_json(run.user_config))):
          run.warn(f"WARNING: orbax did not save a checkpoint at step {step}")
        window_t0, window_steps = time.perf_counter(), 0
      if local_now:
        run.local.save(step, run.state, run.data_iter)
      if snaps.due(step):
        snaps.take(step, run.state, run.data_iter.get_state())
      if stopping:
        bar.message(f"{stopping}: saved checkpoint at step {step}; rerun the same "
                    "command to resume")
        exit_code = EXIT_INTERRUPTED
        break
     except (NonFiniteLoss, InjectedFault, jax.errors.JaxRuntimeError) as e:
      if t.on_nan != "rollback" or snaps.settled is None or rollbacks >= t.max_rollbacks:
        if t.on_nan == "rollback":
          run.warn(f"no rollback left ({rollbacks} of train.max_rollbacks={t.max_rollbacks} "
                   "used)")
        raise
      rollbacks += 1
      bad = e.step - 1 if isinstance(e, NonFiniteLoss) else batch_step
      step, pending, have_batch = _rollback(run, snaps, skip, bad, e, rollbacks), None, False
      flops_seen = run.flops_before(step)  # the FLOPs of the steps kept, as without the fault
      writer.close()  # rows after the snapshot are rewritten by the replay
      writer = MetricsWriter(workdir, enabled=run.is_main, resume_step=step,
                             tensorboard=t.tensorboard)
      writer.write(step, {"fault/rollback": rollbacks, "fault/batch_step": bad})
      window_t0, window_steps = time.perf_counter(), 0
    if pending is not None:
      _check_finite(*pending)
  except NonFiniteLoss as e:
    bar.close()
    good = run.ckpt.latest_step()
    run.say(f"ERROR: {e}. Stopping; the last good checkpoint is "
            f"{'step ' + str(good) if good else 'none'} in {run.ckpt.directory}.")
    exit_code = EXIT_NONFINITE
  finally:
    if profiling:
      jax.profiler.stop_trace()
    stop.uninstall()
    bar.close()
    run.ckpt.close()
    if run.local:
      run.local.close()
    writer.close()
  return exit_code, step, last, eval_stats


def _rollback(run: _Run, snaps: Snapshots, skip: dict, bad: int, error: Exception,
              rollbacks: int) -> int:
  """Restores the newest settled snapshot (state and data position) and marks the batch of
  step `bad` to be skipped; returns the snapshot's step."""
  snaps.discard_pending()
  snap = snaps.settled
  run.state = snaps.restore()
  run.data_iter.set_state(snap.data_state)
  skip[bad] = skip.get(bad, 0) + 1
  run.warn(f"fault: {str(error).splitlines()[0][:200]}; rollback {rollbacks}/"
           f"{run.config.train.max_rollbacks} to the in-memory snapshot of step {snap.step}, "
           f"skipping the batch of step {bad}")
  return snap.step


def _finish(run: _Run, exit_code: int, step: int, last: dict, eval_stats: dict) -> RunResult:
  """Plots, the sample, final_metrics.json (marks a completed run) and the summary line."""
  t, workdir, state = run.config.train, run.workdir, run.state
  wd = paths.as_path(workdir)
  if run.is_main and t.plot:
    plots = [plot_metrics(read_metrics(wd / "metrics.jsonl"), wd / "loss.png",
                          title=paths.name(workdir))]
    for ext in run.extensions:
      plots += ext.on_end(workdir, eval_stats)
    if any(plots):
      run.say(f"plots: {', '.join(p for p in plots if p)}")
  if exit_code == EXIT_OK and t.sample_tokens:
    params, buffers, rng = state.params, state.buffers, state.rng
    if jax.process_count() > 1:  # all processes gather; process 0 then samples on its own
      params, buffers, rng = jax.device_get(
          jax.jit(lambda *x: x, out_shardings=replicated(run.plan.mesh))(params, buffers, rng))
    if run.is_main:
      text = sample_text(run.plan.eval_model, params, buffers, run.tokenizer,
                         prompt=t.sample_prompt, num_tokens=t.sample_tokens, seq_len=t.seq_len,
                         temperature=t.sample_temperature, rng=jax.random.fold_in(rng, step))
      paths.write_text(wd / "sample.txt", t.sample_prompt + text)
      run.say(f"sample (temperature {t.sample_temperature}):\n{'-' * 60}\n{t.sample_prompt}"
              f"{text}\n{'-' * 60}")
  last = {k: _to_scalar(v) for k, v in last.items()}  # numpy / jax scalars -> int, float
  if exit_code == EXIT_OK and run.is_main:
    final = {"step": step, **{k: v for k, v in last.items()
                              if isinstance(v, (int, float)) and not isinstance(v, bool)},
             **{k: run.info[k] for k in ("params_total", "params_non_embedding",
                                         "params_active_non_embedding", "flops_per_token")},
             "tokens": step * t.batch_size * t.seq_len}
    # marks the run complete (sweeps skip it)
    paths.write_json(wd / "final_metrics.json", final, indent=1)
  if exit_code == EXIT_OK:
    summary = ", ".join(f"{k} {last[k]:.4f}" for k in ("train/loss", "eval/loss", "eval/bpb")
                        if isinstance(last.get(k), float))
    run.say(f"done: step {step}; {summary}; workdir {workdir}")
  return RunResult(exit_code, step, last, workdir)


def _to_scalar(v):
  """A Python int or float for a numpy / jax scalar; anything else unchanged."""
  if isinstance(v, (np.generic, np.ndarray, jax.Array)) and np.ndim(v) == 0:
    return np.asarray(v).item()
  return v


def _resolved(user_config: config_lib.Config, config: config_lib.Config, dims) -> dict:
  """What `auto` and 0 became in this run: effjax.resolve's choices for the devices, and
  the model dimensions derived from the tokenizer and model.d_model."""
  m = user_config.model
  derived = {"model.vocab_size": (m.vocab_size, dims.vocab),
             "model.n_kv_heads": (m.n_kv_heads, dims.n_kv_heads),
             "model.head_dim": (m.head_dim, dims.head_dim),
             "model.mlp_dim": (m.mlp_dim, dims.mlp_dim)}
  out = resolve_lib.changes(user_config, config)
  out.update({k: v for k, (given, v) in derived.items() if not given})
  return dict(sorted(out.items()))


def _write_config(workdir: str, config: config_lib.Config) -> None:
  paths.write_text(paths.as_path(workdir) / "config.json", config_lib.to_json(config))


# Keys a checkpoint cannot be resumed under when they change: the parameter and optimizer
# shapes (model, quantizer state, tokenizer) and the tokens per step (token counts, FLOPs and
# scaling-law inputs assume one batch shape per run). Other keys may change and are logged.
_RESUME_FIXED = ("model.", "quant.method", "quant.act_bits", "quant.layers", "quant.qkr",
                 "quant.hadamard", "data.tokenizer", "data.token_dtype", "train.batch_size",
                 "train.seq_len", "optim.name", "constraints.method", "constraints.roles",
                 "constraints.reparam", "constraints.cond_gain")
_RESUME_FREE = ("model.attention.impl", "model.compute_dtype", "model.remat")


def _has_checkpoint(workdir: str) -> bool:
  directory = paths.as_path(workdir) / "checkpoints"
  return directory.is_dir() and any(d.name.isdigit() for d in directory.iterdir())


def _check_resume(workdir: str, config: config_lib.Config) -> dict:
  """The changed keys of a resume; WorkdirError when one of them does not fit the checkpoint."""
  saved = paths.read_json(paths.as_path(workdir) / "config.json")
  if saved is None:
    return {}
  return _check_fits(saved, config, f"{workdir}'s config.json")


def _check_fits(saved: dict, config: config_lib.Config, what: str) -> dict:
  """The keys `config` changes from a saved config (a dict); WorkdirError naming the keys
  that cannot change on resume."""
  changed = config_lib.diff(saved, config)
  fixed = {k: v for k, v in changed.items()
           if k.startswith(_RESUME_FIXED) and k not in _RESUME_FREE}
  if fixed:
    raise WorkdirError(
        f"the workdir holds a checkpoint of another run; these keys differ from {what} "
        "and cannot change on resume: "
        + ", ".join(f"{k} ({old!r} -> {new!r})" for k, (old, new) in fixed.items())
        + ". Use the same values, or a new --workdir.")
  return changed


def _last_metrics(workdir: str) -> dict:
  last = {}
  for row in read_metrics(paths.as_path(workdir) / "metrics.jsonl"):
    last.update(row)
  return last

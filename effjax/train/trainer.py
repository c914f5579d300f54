"""The training loop: data, model, sharded state, jitted steps, eval, checkpoints, metrics.

`train(config, workdir)` runs (or resumes) a run; the CLI in __main__.py is a thin
wrapper. Behaviour the rest of effjax relies on:
  * the same command on the same workdir resumes from the latest checkpoint and
    continues bit-for-bit (params, optimizer, buffers, rng, data position);
  * SIGTERM / Ctrl-C save a checkpoint and exit with EXIT_INTERRUPTED;
  * a non-finite loss stops the run with EXIT_NONFINITE, keeping the last good
    checkpoint (no checkpoint is written after the bad step);
  * only process 0 writes metrics, plots and the config (the user's, `auto` included;
    what `auto` became for this run's devices is run_info.json's "resolved").
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
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
from effjax import resolve as resolve_lib
from effjax.models import masa
from effjax.optim import scaling
from effjax.parallel import make_mesh, replicated, sharding
from effjax.train import flops as flops_lib
from effjax.train.checkpoint import Checkpointer
from effjax.train.extensions import merged_phase
from effjax.train.metrics import MetricsWriter, ProgressBar, plot_metrics, read_metrics
from effjax.train.plan import plan_state
from effjax.train.registry import build_extensions
from effjax.train.sample import sample_text
from effjax.train.state import TrainState
from effjax.train.step import summarize_eval

EXIT_OK = 0
EXIT_NONFINITE = 3
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: rerun the same command to resume


class NonFiniteLoss(RuntimeError):
  pass


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
  tokenizer = data_lib.load_tokenizer(d.tokenizer, eos_token=d.eos_token or None)
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


class _StopFlag:
  """SIGTERM / SIGINT handler: the first signal asks the loop to checkpoint and stop.

  With several processes they must all stop after the same step (the checkpoint is
  collective). With JAX's preemption service (on by default in jax.distributed), SIGTERM
  is left to its notifier, SIGINT is turned into a SIGTERM, and `poll(step)` asks JAX's
  preemption sync point, which every process reaches at the same step once any process
  got the signal. Without the service, the signal is recorded locally and `poll` shares
  it with an allgather every step.
  """

  def __init__(self):
    self.signal_name = None
    self._previous = {}
    self._signals = 0
    self._multi = jax.process_count() > 1
    self._notifier = self._multi and _preemption_service_on()
    self._local = None  # without the notifier: this process's signal, until shared

  def install(self):
    if sys.platform == "win32" or not _in_main_thread():
      return
    if self._multi and not self._notifier:
      print(f"[effjax p{jax.process_index()}] JAX's preemption service is off: a stop signal "
            "is shared by an allgather every step", file=sys.stderr, flush=True)
    for sig in (signal.SIGTERM, signal.SIGINT):
      if not (self._notifier and sig == signal.SIGTERM):
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    self._signals += 1
    if self._signals > 1:  # second signal: give up immediately
      raise KeyboardInterrupt
    if self._notifier:
      os.kill(os.getpid(), signal.SIGTERM)  # to JAX's notifier: a stop step all agree on
    elif self._multi:
      self._local = signal.Signals(signum).name
    else:
      self.signal_name = signal.Signals(signum).name

  def poll(self, step: int) -> str | None:
    """The stop reason once this step should end the run (the same step on every process)."""
    if self.signal_name is None and self._multi:
      if self._notifier:
        if _preemption_sync_point(step):
          self.signal_name = "SIGTERM/SIGINT (stop step agreed by all processes)"
      elif _any_process(self._local is not None):
        self.signal_name = f"{self._local or 'a signal on another process'} (all processes stop)"
    return self.signal_name

  def uninstall(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _preemption_service_on() -> bool:
  """Whether jax.distributed started its preemption sync manager (private state; treated
  as off where this JAX does not expose it, which only costs the allgather fallback)."""
  try:
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
    return getattr(distributed.global_state, "preemption_sync_manager", None) is not None
  except ImportError:
    return False


def _preemption_sync_point(step: int) -> bool:
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return multihost_utils.reached_preemption_sync_point(step)


def _any_process(flag: bool) -> bool:
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.max(multihost_utils.process_allgather(np.int32(flag))) > 0)


def _in_main_thread() -> bool:
  import threading  # pylint: disable=g-import-not-at-top
  return threading.current_thread() is threading.main_thread()


def _global_batch(batch: dict, sharding, global_rows: int) -> dict:
  """Global arrays from this process's rows of the batch (see process_batch_slot)."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v, np.int32),
                                                    (global_rows,) + np.shape(v)[1:])
          for k, v in batch.items()}


def train(config: config_lib.Config, workdir: str, *, data: DataBundle | None = None,
          quiet: bool = False, stop_at: int | None = None) -> RunResult:
  """Runs or resumes the training run described by `config` in `workdir`.

  `stop_at` behaves like a preemption at that step (checkpoint, EXIT_INTERRUPTED):
  used to test exact resume, and to run a long config in chunks.
  """
  run = _setup(config, workdir, data, quiet)
  if run.start >= run.config.train.steps:
    run.say(f"run already complete at step {run.start} (train.steps = "
            f"{run.config.train.steps}); nothing to do")
    run.ckpt.close()
    return RunResult(EXIT_OK, run.start, _last_metrics(workdir), workdir)
  if run.is_main:  # training starts: config.json is this config from here on
    _write_config(workdir, run.user_config)
  _compile_first_step(run)
  _write_run_info(run)
  exit_code, step, last, eval_stats = _loop(run, stop_at)
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
  batch: dict | None = None
  phase: tuple = ()
  info: dict = dataclasses.field(default_factory=dict)

  def global_batch(self, local: dict) -> dict:
    return _global_batch(local, self.plan.batch_sharding, self.config.train.batch_size)

  def step_for(self, phase: tuple):
    """(compiled step, eval step, FLOPs per token) of a phase, compiled once."""
    if phase not in self.compiled:
      step_c, seconds = self.plan.compile_step(self.state, self.batch, self.extensions, phase)
      self.compile_times.append(seconds)
      model_config, dims = self.config.model, self.plan.model.dims
      fpt = flops_lib.flops_per_token(
          dims, self.config.train.seq_len, tie_embeddings=model_config.tie_embeddings,
          ffn_active_params=models.ffn_params(model_config, dims,
                                              dict(phase).get("moe_top_k"))[1],
          **masa.flop_terms(model_config, dims, self.config.train))
      self.compiled[phase] = (step_c, self.plan.eval_step(self.token_bytes, phase), fpt)
    return self.compiled[phase]


def _setup(config, workdir, data, quiet) -> _Run:
  """Data, mesh, resolved config, plan, workdir, restored or initialised state, extensions.
  Everything that can fail on bad input happens before anything is written."""
  config = checks.validate(config, jax.device_count())  # the CLI checked each section only
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise WorkdirError(f"workdir {workdir} is a file, not a directory; pass another "
                       "--workdir")
  t = config.train
  is_main = jax.process_index() == 0
  warn = lambda msg: print(f"[effjax p{jax.process_index()}] {msg}", file=sys.stderr, flush=True)
  say = (lambda *a: None) if quiet or not is_main else warn  # progress: process 0 only
  data = data or load_data(config)
  mesh = make_mesh(config.mesh)
  # `auto` fixed once for the mesh's devices; config.json keeps the user's config.
  user_config, config = config, resolve_lib.resolve(config, mesh.devices.flat)
  plan = plan_state(config, data.tokenizer.vocab_size, mesh, sharding.rules_for(config.mesh))
  # This process reads the rows of each global batch that its devices hold.
  slot, slots = sharding.process_batch_slot(plan.batch_sharding, t.batch_size)
  shard_kw = dict(batch_size=t.batch_size // slots, process_index=slot, process_count=slots)
  eval_batches = data_lib.eval_batches(
      data.corpus.val_tokens, seq_len=t.seq_len, num_batches=t.eval_batches,
      eos_id=data.tokenizer.eos_id, **shard_kw) if t.eval_batches else []

  # A resume must fit the checkpoint: compared with the workdir's config.json before
  # anything is written (config.json itself is rewritten only once training starts).
  changed = _check_resume(workdir, user_config) if _has_checkpoint(workdir) else {}
  if changed:
    say("note: resuming with a config that differs from the workdir's config.json for: "
        + ", ".join(f"{k} ({old!r} -> {new!r})" for k, (old, new) in changed.items()))
  os.makedirs(workdir, exist_ok=True)

  # Restore the latest checkpoint into this mesh's shardings, or initialise directly into
  # them (each device computes its own shards).
  data_iter = data_lib.make_train_iterator(
      data.corpus.train_tokens, seq_len=t.seq_len, seed=config.seed,
      eos_id=data.tokenizer.eos_id, **shard_kw)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=t.keep_checkpoints)
  start = ckpt.latest_step() or 0
  if start:
    try:
      state = ckpt.restore(start, plan.abstract(), data_iter)
    except ValueError as e:  # a mismatch config.json did not show (e.g. no config.json)
      ckpt.close()
      raise WorkdirError(f"the checkpoint at step {start} in {ckpt.directory} does not fit "
                         f"this config: {str(e).splitlines()[0][:300]}") from None
    say(f"resumed from checkpoint at step {start} in {ckpt.directory}")
  else:
    state = plan.init()
  token_bytes = jnp.asarray(data.tokenizer.token_byte_lengths, jnp.float32)
  token_bytes = jnp.pad(token_bytes, (0, plan.model.dims.vocab - token_bytes.shape[0]))
  run = _Run(config=config, user_config=user_config, workdir=workdir, plan=plan, changed=changed,
             tokenizer=data.tokenizer, corpus=data.corpus, data_iter=data_iter, ckpt=ckpt,
             state=state, start=start, extensions=build_extensions(config, plan.model),
             eval_data=[], token_bytes=token_bytes, is_main=is_main, quiet=quiet, say=say,
             warn=warn)
  run.eval_data = [run.global_batch(b) for b in eval_batches]
  return run


def _compile_first_step(run: _Run) -> None:
  """AOT-compiles the step of the starting phase on the first batch (one step per phase;
  compile time is measured on its own)."""
  run.batch = run.global_batch(next(run.data_iter))
  run.phase = merged_phase(run.extensions, run.start)
  run.step_for(run.phase)


def _write_run_info(run: _Run) -> None:
  config, dims, corpus = run.config, run.plan.model.dims, run.corpus
  n_params = models.count_params(dims, config.model.tie_embeddings, config.model)
  peak, peak_source = flops_lib.peak_flops_per_device()
  fpt = run.compiled[run.phase][2]
  run.info = {
      "params_total": n_params["total"], "params_non_embedding": n_params["blocks"],
      "params_active_non_embedding": n_params["active_non_embedding"],
      "flops_per_token": fpt,
      "peak_flops": peak * (1 if jax.devices()[0].platform == "cpu" else jax.device_count()),
      "peak_source": peak_source,
      "corpus": corpus.name, "corpus_fingerprint": corpus.fingerprint,
      "train_tokens": int(corpus.train_tokens.size), "val_tokens": int(corpus.val_tokens.size),
      "tokenizer": config.data.tokenizer, "vocab_size": dims.vocab,
      "adamw_timescale_tau": scaling.adamw_timescale(config),
      "weight_decay": scaling.base_weight_decay(config),
      "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
      "mesh": dict(run.plan.mesh.shape), "jax_version": jax.__version__,
      "commit": _git_commit(), "command": " ".join(sys.argv),
      "resolved": _resolved(run.user_config, config, dims),
  }
  path = os.path.join(run.workdir, "run_info.json")
  resumes = []
  if run.start and os.path.exists(path):
    with open(path) as f:
      resumes = json.load(f).get("resumes", [])
  if run.start:  # the step each resume started from, and the config keys it changed
    resumes.append({"step": run.start, "changed": run.changed})
  run.info["resumes"] = resumes
  if run.is_main:
    with open(path, "w") as f:
      json.dump(run.info, f, indent=2)
  run.say(f"model: {n_params['total'] / 1e6:.2f}M params ({n_params['blocks'] / 1e6:.2f}M "
          f"non-embedding, {n_params['active_non_embedding'] / 1e6:.2f}M active), "
          f"{fpt / 1e6:.1f} MFLOPs/token; corpus '{corpus.name}' "
          f"({corpus.train_tokens.size / 1e6:.1f}M train / {corpus.val_tokens.size / 1e6:.2f}M "
          f"val tokens, fingerprint {corpus.fingerprint[:12]}); devices {run.info['devices']}, "
          f"mesh {run.info['mesh']}; compiled in {run.compile_times[0]:.1f}s")


def _check_finite(step: int, metrics) -> dict:
  """Host copy of a step's metrics; raises NonFiniteLoss on a non-finite loss or norm."""
  host = jax.device_get(metrics)
  for key in ("train/loss", "train/grad_norm", "train/param_norm"):
    if not math.isfinite(float(host[key])):
      raise NonFiniteLoss(f"non-finite {key} ({float(host[key])}) at step {step}")
  return host


def _eval_row(run: _Run, eval_fn) -> tuple[dict, dict]:
  row, stats = _evaluate(eval_fn, run.state, run.eval_data)
  for ext in run.extensions:
    row.update(ext.on_eval(run.state, stats))
  return row, stats


def _loop(run: _Run, stop_at: int | None):
  """The training loop. Periodic actions, each a named helper: profile window, phase
  change (recompile), log, eval, checkpoint, stop. The NaN check runs one step late (it
  never blocks dispatch) and at every log/eval/checkpoint step."""
  t, workdir = run.config.train, run.workdir
  compiled_step, eval_fn, fpt = run.step_for(run.phase)
  tokens_per_step = t.batch_size * t.seq_len
  writer = MetricsWriter(workdir, enabled=run.is_main, resume_step=run.start,
                         tensorboard=t.tensorboard)
  writer.write(run.start, {"perf/compile_time_s": run.compile_times[0],
                           "optim/tau": run.info["adamw_timescale_tau"]})
  bar = ProgressBar(t.steps, run.start, enabled=run.is_main and not run.quiet)
  stop = _StopFlag()
  stop.install()
  exit_code, last, eval_stats = EXIT_OK, {}, {}
  window_t0, window_steps = time.perf_counter(), 0
  pending = None  # (step, device metrics) of the previous step, checked one step late
  step = run.start
  profiling = False
  try:
    while step < t.steps:
      if t.profile_steps and step == t.profile_steps[0] and run.is_main:
        jax.profiler.start_trace(os.path.join(workdir, "profile"))
        profiling = True
      if step > run.start:  # the first batch was taken for compilation
        run.batch = run.global_batch(next(run.data_iter))
      new_phase = merged_phase(run.extensions, step)
      if new_phase != run.phase:
        run.phase = new_phase
        compiled_step, eval_fn, fpt = run.step_for(run.phase)
        bar.message(f"step {step}: phase change {dict(run.phase)} (compiled in "
                    f"{run.compile_times[-1]:.1f}s)")
        writer.write(step, {"perf/compile_time_s": run.compile_times[-1],
                            "train/phase_change": 1.0})
      run.state, metrics = compiled_step(run.state, run.batch)
      step += 1
      window_steps += 1
      if pending is not None:
        _check_finite(*pending)
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
      if log_now or eval_now or ckpt_now:
        row = dict(_check_finite(*pending))
        pending = None
        if log_now:
          dt = (time.perf_counter() - window_t0) / max(window_steps, 1)
          tps = tokens_per_step / dt
          row.update({"perf/step_time_s": dt, "perf/tokens_per_sec": tps,
                      "perf/mfu": fpt * tps / run.info["peak_flops"],
                      "perf/tokens_seen": step * tokens_per_step})
          bar.update(step, float(row["train/loss"]), tps)
        if eval_now:
          eval_row, eval_stats = _eval_row(run, eval_fn)
          row.update(eval_row)
          bar.message(f"step {step}: eval/loss {row['eval/loss']:.4f}"
                      + (f", eval/bpb {row['eval/bpb']:.4f}" if "eval/bpb" in row else ""))
        writer.write(step, row)
        last.update(row)
        if ckpt_now and not run.ckpt.save(step, run.state, run.data_iter):
          run.warn(f"WARNING: orbax did not save a checkpoint at step {step}")
        window_t0, window_steps = time.perf_counter(), 0
      if stopping:
        bar.message(f"{stopping}: saved checkpoint at step {step}; rerun the same "
                    "command to resume")
        exit_code = EXIT_INTERRUPTED
        break
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
    writer.close()
  return exit_code, step, last, eval_stats


def _finish(run: _Run, exit_code: int, step: int, last: dict, eval_stats: dict) -> RunResult:
  """Plots, the sample, final_metrics.json (marks a completed run) and the summary line."""
  t, workdir, state = run.config.train, run.workdir, run.state
  if run.is_main and t.plot:
    paths = [plot_metrics(read_metrics(os.path.join(workdir, "metrics.jsonl")),
                          os.path.join(workdir, "loss.png"),
                          title=f"{os.path.basename(os.path.abspath(workdir))}")]
    for ext in run.extensions:
      paths += ext.on_end(workdir, eval_stats)
    if any(paths):
      run.say(f"plots: {', '.join(p for p in paths if p)}")
  if exit_code == EXIT_OK and t.sample_tokens:
    params, buffers, rng = state.params, state.buffers, state.rng
    if jax.process_count() > 1:  # all processes gather; process 0 then samples on its own
      params, buffers, rng = jax.device_get(
          jax.jit(lambda *x: x, out_shardings=replicated(run.plan.mesh))(params, buffers, rng))
    if run.is_main:
      text = sample_text(run.plan.eval_model, params, buffers, run.tokenizer,
                         prompt=t.sample_prompt, num_tokens=t.sample_tokens, seq_len=t.seq_len,
                         temperature=t.sample_temperature, rng=jax.random.fold_in(rng, step))
      with open(os.path.join(workdir, "sample.txt"), "w") as f:
        f.write(t.sample_prompt + text)
      run.say(f"sample (temperature {t.sample_temperature}):\n{'-' * 60}\n{t.sample_prompt}"
              f"{text}\n{'-' * 60}")
  last = {k: _to_scalar(v) for k, v in last.items()}  # numpy / jax scalars -> int, float
  if exit_code == EXIT_OK and run.is_main:
    final = {"step": step, **{k: v for k, v in last.items()
                              if isinstance(v, (int, float)) and not isinstance(v, bool)},
             **{k: run.info[k] for k in ("params_total", "params_non_embedding",
                                         "params_active_non_embedding", "flops_per_token")},
             "tokens": step * t.batch_size * t.seq_len}
    with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
      json.dump(final, f, indent=1)  # marks the run complete (sweeps skip it)
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


def _evaluate(eval_fn, state: TrainState, eval_data: list) -> tuple[dict, dict]:
  """(eval metrics, summed 'stat/*' arrays over the eval set)."""
  sums = None
  for batch in eval_data:
    out = eval_fn(state.params, state.buffers, batch)
    sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
  sums = jax.device_get(sums)
  stats = {k: np.asarray(v) for k, v in sums.items() if k.startswith("stat/")}
  return {k: float(v) for k, v in summarize_eval(sums).items()}, stats


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
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config_lib.to_json(config))


# Keys a checkpoint cannot be resumed under when they change: the parameter and optimizer
# shapes (model, quantizer state, tokenizer) and the tokens per step (token counts, FLOPs and
# scaling-law inputs assume one batch shape per run). Other keys may change and are logged.
_RESUME_FIXED = ("model.", "quant.method", "quant.act_bits", "quant.layers", "quant.qkr",
                 "quant.hadamard", "data.tokenizer", "data.token_dtype", "train.batch_size",
                 "train.seq_len", "optim.name")
_RESUME_FREE = ("model.attention.impl", "model.compute_dtype", "model.remat")


def _has_checkpoint(workdir: str) -> bool:
  directory = os.path.join(workdir, "checkpoints")
  return os.path.isdir(directory) and any(d.isdigit() for d in os.listdir(directory))


def _check_resume(workdir: str, config: config_lib.Config) -> dict:
  """The changed keys of a resume; WorkdirError when one of them does not fit the checkpoint."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    changed = config_lib.diff(json.load(f), config)
  fixed = {k: v for k, v in changed.items()
           if k.startswith(_RESUME_FIXED) and k not in _RESUME_FREE}
  if fixed:
    raise WorkdirError(
        f"{workdir} holds a checkpoint of another run; these keys differ from its config.json "
        "and cannot change on resume: "
        + ", ".join(f"{k} ({old!r} -> {new!r})" for k, (old, new) in fixed.items())
        + ". Use the same values, or a new --workdir.")
  return changed


def _last_metrics(workdir: str) -> dict:
  last = {}
  for row in read_metrics(os.path.join(workdir, "metrics.jsonl")):
    last.update(row)
  return last

"""Trainer overhead benchmark (issue 2): prints a table (--out also writes it to a file).

  python -m effjax.train.bench [--config=configs/quickstart.py] [--steps=60]
                               [--out=results/perf/trainer.md]

Measured in one process, so the ratios are meaningful even on a noisy shared CPU:
  1. tokens/s of the full trainer loop (data pipeline, host-device transfer, logging,
     progress bar, NaN guard; eval and checkpoints pushed out of the window) versus a
     bare loop calling the same jitted step on one fixed batch;
  2. data-pipeline throughput versus the model's consumption;
  3. how long a step is blocked by an asynchronous checkpoint save.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time

import jax

from effjax import checks
from effjax import config as config_lib
from effjax import data as data_lib
from effjax import models
from effjax.parallel import make_mesh, sharding
from effjax.resolve import resolve
from effjax.train import trainer
from effjax.train.checkpoint import Checkpointer
from effjax.train.metrics import read_metrics
from effjax.train.plan import plan_state


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/quickstart.py")
  parser.add_argument("--steps", type=int, default=60)
  parser.add_argument("--out", default="", help="also write the table here")
  args, overrides = parser.parse_known_args(argv)
  config, _ = checks.load(["--config=" + args.config, *overrides],
                          num_devices=jax.device_count())
  steps = args.steps
  config = config_lib.apply_overrides(config, {
      "train": {"steps": steps, "warmup_steps": min(config.train.warmup_steps, steps),
                "log_every": 10, "eval_every": 10 ** 9, "checkpoint_every": 10 ** 9,
                "sample_tokens": 0, "plot": False}})
  t = config.train
  data = trainer.load_data(config)
  tokens_per_step = t.batch_size * t.seq_len

  # 1a. full trainer
  with tempfile.TemporaryDirectory() as workdir:
    trainer.train(config, workdir, data=data, quiet=True)
    rows = [r for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))
            if "perf/step_time_s" in r]
  full_step = statistics.median(r["perf/step_time_s"] for r in rows[1:] or rows)

  # 1b. bare jitted loop on one fixed batch
  mesh = make_mesh(config.mesh)
  resolved = resolve(config, mesh.devices.flat)
  plan = plan_state(resolved, data.tokenizer.vocab_size, mesh, sharding.rules_for(config.mesh))
  it = data_lib.make_data_iterator(data.corpus, seq_len=t.seq_len, batch_size=t.batch_size,
                                   seed=config.seed, eos_id=data.tokenizer.eos_id)
  batch = {k: jax.device_put(v, plan.batch_sharding) for k, v in next(it).items()}
  state = plan.init()
  step_fn, _ = plan.compile_step(state, batch)  # the trainer's step, without extensions
  state, m = step_fn(state, batch)
  jax.block_until_ready(m)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, m = step_fn(state, batch)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  bare_step = statistics.median(times)

  # 2. data pipeline alone
  n_batches = 200
  t0 = time.perf_counter()
  for _ in range(n_batches):
    next(it)
  data_tps = n_batches * tokens_per_step / (time.perf_counter() - t0)

  # 3. async checkpoint: time the save() call (the step is blocked only for that long)
  with tempfile.TemporaryDirectory() as ckdir:
    ck = Checkpointer(ckdir)
    blocked = []
    for i in range(3):
      t0 = time.perf_counter()
      ck.save(i + 1, state, it)
      blocked.append(time.perf_counter() - t0)
      ck.wait()
    ck.close()
  save_block = statistics.median(blocked)

  overhead = full_step / bare_step - 1
  rows_out = [
      ("trainer loop tokens/s", f"{tokens_per_step / full_step:,.0f}", ""),
      ("bare jitted step tokens/s", f"{tokens_per_step / bare_step:,.0f}", ""),
      ("trainer overhead vs bare loop", f"{overhead * 100:+.1f}%",
       "target <= 5%: " + ("met" if overhead <= 0.05 else "MISSED")),
      ("data pipeline tokens/s", f"{data_tps:,.0f}", ""),
      ("data throughput / model consumption", f"{data_tps * full_step / tokens_per_step:,.0f}x",
       "target >= 20x: " + ("met" if data_tps * full_step / tokens_per_step >= 20 else "MISSED")),
      ("step blocked by async checkpoint save", f"{save_block * 1e3:.1f} ms "
       f"({save_block / bare_step:.2f} steps)",
       "target < 1 step: " + ("met" if save_block < bare_step else "MISSED")),
  ]
  n_params = models.count_params(plan.model.dims, config.model.tie_embeddings,
                                 config.model)["total"]
  header = (f"Config `{args.config}` ({n_params / 1e6:.2f}M params, batch {t.batch_size} x "
            f"{t.seq_len}), {steps} steps; device: {jax.device_count()} x "
            f"{jax.devices()[0].device_kind} ({jax.default_backend()}), {os.cpu_count()} host "
            f"cores; jax {jax.__version__}; {datetime.date.today()}; commit "
            f"{trainer._git_commit()}.")  # pylint: disable=protected-access
  table = ["| measure | value | note |", "|---|---|---|"]
  table += [f"| {a} | {b} | {c} |" for a, b, c in rows_out]
  text = "\n".join(table)
  print(header + "\n\n" + text)
  if args.out:
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
      f.write("# Trainer overhead benchmark\n\n"
              f"Command: `python -m effjax.train.bench {' '.join(argv or sys.argv[1:])}`\n\n"
              f"{header}\n\n{text}\n\n"
              "On a shared CPU only the ratios within this one run mean anything.\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())

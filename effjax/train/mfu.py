"""Training-step speed and MFU per attention implementation on a GPU: prints a table.

  python -m effjax.train.mfu [--config=configs/gpu_small.py] [--impls=xla,pallas_gpu]
                             [--scores=softmax] [--steps=40] [--out=results/perf/mfu.md]
                             [--pairs=softmax/cudnn,lssa/pallas_gpu] [--config.key=value ...]

The table goes to stdout; --out also writes it to a file (the committed
results/perf/mfu.md only when asked for). Without a GPU backend it exits 2.

--pairs lists (score, impl) pairs explicitly instead of every score x impl.
Each (score, impl) pair is one short trainer run in this process (same data, same model);
the table reports the median step time over the logged steps after the first, tokens/s and
the trainer's own perf/mfu (model FLOPs by formula over the device's peak, effjax.train.flops).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile

import jax

from effjax import checks
from effjax import config as config_lib
from effjax.train import trainer
from effjax.train.metrics import read_metrics


def _run(config, data) -> dict:
  with tempfile.TemporaryDirectory() as workdir:
    result = trainer.train(config, workdir, data=data, quiet=True)
    rows = [r for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))
            if "perf/step_time_s" in r]
  if result.exit_code != 0 or not rows:
    raise RuntimeError(f"trainer exit code {result.exit_code}")
  rows = rows[1:] or rows  # the first logged window can include compilation stragglers
  return {k: statistics.median(r[k] for r in rows)
          for k in ("perf/step_time_s", "perf/tokens_per_sec", "perf/mfu")}


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/gpu_small.py")
  parser.add_argument("--impls", default="xla,pallas_gpu")
  parser.add_argument("--scores", default="softmax")
  parser.add_argument("--steps", type=int, default=40)
  parser.add_argument("--pairs", default="", help="score/impl,... (instead of scores x impls)")
  parser.add_argument("--out", default="", help="also write the table here")
  args, overrides = parser.parse_known_args(argv)
  if jax.default_backend() != "gpu":
    print(f"mfu: needs a GPU backend (MFU against a GPU's peak, Pallas GPU kernels); this is "
          f"{jax.default_backend()!r}. Nothing was run or written.", file=sys.stderr)
    return 2
  base, _ = checks.load(["--config=" + args.config, *overrides], num_devices=jax.device_count())
  base = config_lib.apply_overrides(base, {"train": {"steps": args.steps}})
  data = trainer.load_data(base)
  rows, notes = [], []
  pairs = ([tuple(p.split("/", 1)) for p in args.pairs.split(",")] if args.pairs else
           [(s, i) for s in args.scores.split(",") for i in args.impls.split(",")])
  for score, impl in pairs:
    cfg = config_lib.apply_overrides(base, {"model": {"attention": {"score": score,
                                                                     "impl": impl}}})
    try:
      checks.validate(cfg, jax.device_count())
      r = _run(cfg, data)
    except Exception as e:  # pylint: disable=broad-except  (report and go on)
      notes.append(f"{score}/{impl}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
      continue
    rows.append((score, impl, r["perf/step_time_s"] * 1e3, r["perf/tokens_per_sec"],
                 r["perf/mfu"]))
    print(f"{score}/{impl}: {rows[-1][2]:.1f} ms/step, MFU {rows[-1][4]:.3f}", file=sys.stderr,
          flush=True)
  m, t = base.model, base.train
  header = (f"Device: {jax.devices()[0].device_kind} x {jax.device_count()}; jax {jax.__version__}; "
            f"config {args.config} (d_model {m.d_model}, {m.n_layers} layers, {m.n_heads} heads; "
            f"batch {t.batch_size} x {t.seq_len} tokens; doc_mask {m.attention.doc_mask}, "
            f"loss_chunk {m.loss_chunk}); {args.steps} steps; "
            f"{datetime.datetime.now().isoformat(timespec='seconds')}.")
  table = ["| score | attention impl | step ms | tokens/s | MFU |", "|---|---|---:|---:|---:|"]
  table += [f"| {s} | {i} | {ms:.1f} | {tps:,.0f} | {mfu:.3f} |" for s, i, ms, tps, mfu in rows]
  text = "\n".join(table) + ("\n\nNotes:\n" + "\n".join(f"- {n}" for n in notes) if notes else "")
  print(f"{header}\n\n{text}")
  if not rows:
    print("mfu: no configuration ran; nothing written", file=sys.stderr)
    return 1
  if args.out:
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
      fh.write(f"# Training step speed and MFU\n\nCommand: `python -m effjax.train.mfu "
               f"{' '.join(argv)}`\n\n{header}\n\n{text}\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())

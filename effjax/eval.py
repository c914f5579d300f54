"""Evaluate a run's checkpoint: loss (nats/token) and bits per UTF-8 byte on any corpus.

  python -m effjax.eval --workdir=runs/quickstart [--step=N] [--split=val|train|all]
      [--batches=N] [--batch_size=N] [--config.data.corpus=text --config.data.paths=a.txt,b/*.txt]
      [--config.train.seq_len=N] [--config.model.attention.eval_score=lssar] [--out=FILE]

Each comma-separated entry of data.paths (or of data.sources, for a mixture run) is a source
evaluated on its own, with the token-weighted total when there are several; the built-in
corpus is one source. A mixture also gets `mixture`: the weight-averaged loss and bpb, which
is the trainer's eval/loss and eval/bpb. --split:
the run's validation split by default, every token ('all') when data.* is overridden (a
corpus the run did not train on). --batches: 0 = every full batch of the split (default:
the run's train.eval_batches). Results are printed and merged into <workdir>/eval_<step>.json
(one entry per corpus / split / sequence length, so evaluations on several corpora add up).
Exit codes: 0 done, 2 no run, bad arguments or data.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys

USAGE = __doc__


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m effjax.eval", description=USAGE,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True)
  p.add_argument("--step", type=int, default=None)
  p.add_argument("--split", choices=("val", "train", "all"), default=None)
  p.add_argument("--batches", type=int, default=None)
  p.add_argument("--batch_size", type=int, default=0, help="0: the run's train.batch_size")
  p.add_argument("--out", default="", help="default: <workdir>/eval_<step>.json")
  return p


def split_tokens(corpus, split: str):
  import numpy as np  # pylint: disable=g-import-not-at-top
  if split == "val":
    return corpus.val_tokens
  if split == "train":
    return corpus.train_tokens
  return np.concatenate([corpus.train_tokens, corpus.val_tokens])


def evaluate(run, tokens, *, seq_len: int, batch_size: int, num_batches: int) -> dict:
  """{loss, bpb, tokens, bytes, batches} of `run` (effjax.load.LoadedRun) on a token stream."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from effjax import data as data_lib  # pylint: disable=g-import-not-at-top
  tok = run.tokenizer
  batches = data_lib.eval_batches(tokens, seq_len=seq_len, batch_size=batch_size,
                                  num_batches=num_batches if num_batches > 0 else sys.maxsize,
                                  eos_id=tok.eos_id)
  token_bytes = jnp.asarray(tok.token_byte_lengths, jnp.float32)
  token_bytes = jnp.pad(token_bytes, (0, run.model.dims.vocab - token_bytes.shape[0]))
  eval_fn = run.plan.eval_step(token_bytes)
  sums = None
  for batch in batches:
    out = eval_fn(run.params, run.buffers, {k: jnp.asarray(v) for k, v in batch.items()})
    sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
  sums = {k: float(v) for k, v in jax.device_get(sums).items() if not k.startswith("stat/")}
  result = {"loss": sums["nll_sum"] / sums["tokens"], "tokens": int(sums["tokens"]),
            "batches": len(batches), "nll_sum": sums["nll_sum"]}
  if sums["bytes"] == sums["bytes"] and sums["bytes"] > 0:
    result.update(bpb=sums["nll_sum"] / math.log(2) / sums["bytes"], bytes=int(sums["bytes"]))
  return result


def main(argv: list[str] | None = None) -> int:
  from effjax import data as data_lib  # pylint: disable=g-import-not-at-top
  from effjax import load, paths  # pylint: disable=g-import-not-at-top
  opened = load.open_for_command(argv, parser())
  if isinstance(opened, int):
    return opened
  args, overrides, run = opened.args, opened.overrides, opened.run
  c, d = run.config, run.config.data
  data_overridden = any(k.startswith("data.") for k in overrides)
  split = args.split or ("all" if data_overridden else "val")
  batch_size = args.batch_size or c.train.batch_size
  num_batches = c.train.eval_batches if args.batches is None else args.batches
  kw = dict(val_percent=d.val_percent, token_dtype=d.token_dtype, cache_dir=d.cache_dir or None)
  mixture = None
  try:
    if d.sources:  # a data.sources mixture: each source on its own, as the trainer evaluates
      mixture = data_lib.load_mixture(d.sources, run.tokenizer, **kw)
      sources = [(s.name, lambda s=s: s.corpus) for s in mixture.sources]
    else:  # one corpus per path, loaded when its turn comes
      names = ([p.strip() for p in d.paths.split(",") if p.strip()]
               if d.corpus in ("text", "tokens") else [None])
      sources = [(n or d.corpus, functools.partial(data_lib.load_corpus, d.corpus, n,
                                                   run.tokenizer, **kw)) for n in names]
    load.say(f"step {run.step} loaded in {opened.seconds:.1f}s; evaluating {split} split of "
             f"{len(sources)} source(s) at seq_len {c.train.seq_len} (compiling first) ...")
    results = {}
    for name, corpus in sources:
      results[name] = evaluate(run, split_tokens(corpus(), split), seq_len=c.train.seq_len,
                               batch_size=batch_size, num_batches=num_batches)
      r = results[name]
      load.say(f"{name}: loss {r['loss']:.4f}" + (f", bpb {r['bpb']:.4f}" if "bpb" in r else "")
               + f" over {r['tokens']} tokens")
  except data_lib.DataError as e:
    print(f"effjax: data error: {e}", file=sys.stderr)
    return 2
  if len(results) > 1:
    total = {k: sum(r.get(k, 0) for r in results.values()) for k in ("nll_sum", "tokens", "bytes")}
    results["total"] = {"loss": total["nll_sum"] / total["tokens"], "tokens": total["tokens"]}
    if all("bpb" in r for r in results.values() if r is not results["total"]):
      results["total"]["bpb"] = total["nll_sum"] / math.log(2) / total["bytes"]
  if mixture:  # the trainer's eval/loss of a mixture: the weight-averaged figure
    weights = mixture.weights
    results["mixture"] = {k: sum(w * results[n][k] for n, w in weights.items())
                          for k in ("loss", "bpb") if all(k in results[n] for n in weights)}
  corpus = "mixture" if mixture else d.corpus
  entry = {"corpus": corpus, "paths": d.sources or d.paths, "split": split,
           "seq_len": c.train.seq_len,
           "eval_score": c.model.attention.eval_score or c.model.attention.score,
           "batch_size": batch_size, "sources": results}
  key = f"{corpus}:{entry['paths']}:{split}:seq{c.train.seq_len}:{entry['eval_score']}"
  path = paths.as_path(args.out or paths.as_path(args.workdir) / f"eval_{run.step}.json")
  saved = paths.read_json(path, default={})
  saved.setdefault("step", run.step)
  saved.setdefault("evals", {})[key] = entry
  paths.write_json(path, saved, indent=1)
  print(json.dumps({"step": run.step, **entry}, indent=1))
  load.say(f"written to {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

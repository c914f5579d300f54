"""Mixture-of-Recursions study (issue 13; docs/mor.md). Reruns and rewrites results/mor/:

  python -m effjax.experiments.mor [--parts=a,b] [--only=NAME,...] [--runs=runs/mor]
      [--smoke]

At equal training FLOPs (each variant trains for the vanilla model's FLOP budget: steps =
vanilla steps x vanilla FLOPs per token / its FLOPs per token, effjax/train/flops.py):
  vanilla        8 unique layers
  recursive2     plain recursion (router none), middle_cycle, N_r = 2: 5 unique layers,
                 depth 8 for every token
  mor_expert2    expert-choice MoR, N_r = 2 (5 unique layers; depth 5 or 8)
  mor_expert3    expert-choice MoR, N_r = 3 (4 unique layers; depth 4, 6 or 8)
  mor_token3     token-choice MoR, N_r = 3 (4 unique layers), Switch balance + z-loss
Part A at d_model 128, part B at d_model 64 (the second small size; d_model 256 needs about
2 hours of a 2-core CPU: `SIZES` holds the widths); SEEDS seeds each. eval/loss is the causal
threshold rule; the top-k loss (which sees the future) is reported beside it, with the
dead-token fraction and the router's threshold-vs-top-k accuracy. The MoR paper finds MoR
beats plain recursion at equal FLOPs, and vanilla only from ~360M parameters; report what
this scale gives. --smoke: a few steps of a tiny model into /tmp (proves the script runs
end to end; not a result).
"""

from __future__ import annotations

import dataclasses
import os
import sys

import numpy as np

from effjax import config as config_lib
from effjax import models
from effjax.experiments.study import (Variant, base_name, markdown_table, run_variants,
                                      study_main, with_seeds, write_part)
from effjax.train import flops as flops_lib

OUT = "results/mor"
TITLE = "Mixture-of-Recursions study"
COMMAND = "python -m effjax.experiments.mor"
SEEDS = (0, 1)
STEPS = 300  # the vanilla model's steps; the others get the same FLOPs

TRAIN = {"batch_size": 16, "seq_len": 128, "lr": 3e-3, "eval_batches": 16, "log_every": 10,
         "sample_tokens": 0}
MOR = {"sharing": "middle_cycle"}
VARIANTS = [
    Variant("vanilla", {"model": {"n_layers": 8}}, "vanilla, 8 layers"),
    Variant("recursive2", {"model": {"n_layers": 5, "mor": {**MOR, "recursions": 2,
                                                             "router": "none"}}},
            "plain recursion N_r=2 (5 unique layers, depth 8)"),
    Variant("mor_expert2", {"model": {"n_layers": 5, "mor": {**MOR, "recursions": 2,
                                                              "router": "expert"}}},
            "MoR expert-choice N_r=2 (5 unique layers)"),
    Variant("mor_expert3", {"model": {"n_layers": 4, "mor": {**MOR, "recursions": 3,
                                                              "router": "expert"}}},
            "MoR expert-choice N_r=3 (4 unique layers)"),
    Variant("mor_token3", {"model": {"n_layers": 4, "mor": {**MOR, "recursions": 3,
                                                             "router": "token"}}},
            "MoR token-choice N_r=3 (4 unique layers, Switch + z-loss)"),
]
SIZES = {"a": {"d_model": 128, "n_heads": 4}, "b": {"d_model": 64, "n_heads": 4}}
SMOKE = {"steps": 4, "train": {"batch_size": 4, "seq_len": 32, "eval_batches": 1,
                               "log_every": 1}, "model": {"d_model": 32, "n_heads": 2}}


def _fpt(config) -> float:
  dims = models.resolve_dims(config.model, 256)
  return flops_lib.flops_per_token(dims, config.train.seq_len,
                                   tie_embeddings=config.model.tie_embeddings,
                                   mor=config.model.mor)


def isoflop_variants(base: config_lib.Config, variants, steps: int) -> list[Variant]:
  """Each variant with train.steps set so that it spends the first variant's FLOPs (and its
  eval / checkpoint / warmup intervals scaled with it)."""
  budget = steps * _fpt(config_lib.apply_overrides(base, variants[0].overrides))
  out = []
  for v in variants:
    fpt = _fpt(config_lib.apply_overrides(base, v.overrides))
    n = max(2, int(round(budget / fpt)))
    train = {"steps": n, "warmup_steps": max(1, n // 10), "eval_every": max(1, n // 4),
             "checkpoint_every": max(1, n // 2)}
    over = {**v.overrides, "train": {**v.overrides.get("train", {}), **train}}
    out.append(dataclasses.replace(v, overrides=over))
  return out


def _row(rec, fpt_tokens):
  flops = rec.info["flops_per_token"]
  return {"loss": rec.last("eval/loss"), "topk": rec.last("eval/mor/topk/loss"),
          "dead": rec.last("eval/mor/dead_tokens"), "acc": rec.last("eval/mor/router_acc"),
          "recs": rec.last("eval/mor/mean_recursions"),
          "params": rec.info["params_non_embedding"] / 1e6, "fpt": flops / 1e6,
          "steps": rec.config.train.steps,
          "tokens": rec.config.train.steps * fpt_tokens / 1e6}


def _plot(recs, out, part):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
  for rec in recs:
    if rec.config.seed != 0:
      continue
    tokens = rec.config.train.batch_size * rec.config.train.seq_len
    s = rec.series("eval/loss")
    ax.plot([st * tokens * rec.info["flops_per_token"] for st, _ in s], [v for _, v in s], "o-",
            label=rec.variant.name)
  ax.set(xlabel="training FLOPs", ylabel="eval loss (threshold rule)", xscale="log",
         title=f"Part {part.upper()}: loss vs FLOPs (seed 0)")
  ax.legend(fontsize=7)
  fig.tight_layout()
  path = os.path.join(out, f"part_{part}_loss_vs_flops.png")
  fig.savefig(path)
  plt.close(fig)
  return path


def _part(part: str, smoke: bool):
  def run(args, only):
    size = SIZES[part]
    train, steps, seeds = dict(TRAIN), STEPS, SEEDS
    if smoke:
      size, steps, seeds = SMOKE["model"], SMOKE["steps"], (0,)
      train.update(SMOKE["train"])
    base = config_lib.apply_overrides(config_lib.Config(), {"model": size, "train": train})
    variants = isoflop_variants(base, VARIANTS, steps)
    recs = run_variants(base, with_seeds(variants, seeds), args.runs + f"/{part}", only=only)
    tokens = base.train.batch_size * base.train.seq_len
    rows = [[r.variant.name, r.config.seed, *(_row(r, tokens)[k] for k in (
        "params", "fpt", "steps", "tokens", "loss", "topk", "recs", "dead", "acc"))]
            for r in recs]
    by = {}
    for r in recs:
      by.setdefault(base_name(r.variant.name), []).append(r.last("eval/loss"))
    stats = [[name, len(v), float(np.mean(v)), float(max(v) - min(v)) if len(v) > 1 else
              float("nan")] for name, v in by.items()]
    plot = _plot(recs, args.out, part) if recs else None
    body = (markdown_table(["variant", "seed", "non-emb params (M)", "MFLOPs/token", "steps",
                            "tokens (M)", "eval loss (threshold)", "eval loss (top-k)",
                            "mean recursions (eval)", "dead tokens (eval)",
                            "router acc (eval)"], rows)
            + "\n\n### Mean and seed-to-seed spread\n\n"
            + markdown_table(["variant", "seeds", "eval loss mean", "spread"], stats)
            + (f"\n\n![loss vs FLOPs]({os.path.basename(plot)})" if plot else "")
            + "\n\nEqual training FLOPs: each variant's steps = the vanilla steps x vanilla "
              "FLOPs/token / its FLOPs/token (effjax/train/flops.py counts each recursion at "
              "its capacity). Dead tokens: the fraction never selected past the first "
              "recursion; router acc: threshold decision (sigma > 0.5) vs top-k membership.\n")
    scale = (f"byte-level LM on the built-in corpus, d_model {size['d_model']}, vanilla 8 layers "
             f"x {steps} steps, batch {train['batch_size']} x {train['seq_len']}; seeds "
             f"{', '.join(map(str, seeds))}." + (" SMOKE RUN: not a result." if smoke else ""))
    return write_part(args.out, part, f"Part {part.upper()}: d_model {size['d_model']} at equal "
                      "training FLOPs", body, recs, COMMAND + f" --parts={part}", scale)
  return run


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  smoke = "--smoke" in argv
  if smoke:
    argv.remove("--smoke")
    if not any(a.startswith("--out") for a in argv):
      argv += ["--out=/tmp/mor_smoke/results", "--runs=/tmp/mor_smoke/runs"]
  return study_main(argv, name="mor", doc=__doc__, title=TITLE, out=OUT,
                    parts={p: _part(p, smoke) for p in SIZES})


if __name__ == "__main__":
  sys.exit(main())

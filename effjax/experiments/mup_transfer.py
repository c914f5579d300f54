"""muP transfer study (issue 7; TECHNIQUES.md 6.1, 6.2). Reruns and rewrites
results/mup_transfer/:

  python -m effjax.experiments.mup_transfer [--only=NAME,...] [--runs=runs/mup_transfer]

1. Loss versus lr at widths 64, 128, 256 (head_dim 16, heads grow with width) under SP
   and muP (base width 64): the optimum should stay put under muP and drift under SP.
2. Coordinate check, widths 64..512, 5 Adam steps, both parameterisations.
3. Weight-decay rules under muP at a fixed lr: none, mup (lambda x m) and layerwise
   (lambda x m^1), compared by the top singular value of each matrix type at the end of
   training across widths 64 and 128.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from effjax import config as config_lib
from effjax import coord_check
from effjax.experiments.study import Variant, markdown_table, run_variants, write_summary

OUT = "results/mup_transfer"
WIDTHS = (64, 128, 256)
LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
HEAD_DIM = 16
WD_LR = 1e-2
WD_WIDTHS = (64, 128)  # two widths keep the study within an hour of a 2-core CPU
BASE = {
    "model": {"n_layers": 4, "base_width": WIDTHS[0], "init_std": 0.02},
    "train": {"steps": 200, "batch_size": 16, "seq_len": 64, "warmup_steps": 20,
              "eval_every": 100, "eval_batches": 16, "log_every": 20, "checkpoint_every": 200,
              "sample_tokens": 0, "plot": False},
}


def _width(w):
  return {"d_model": w, "n_heads": w // HEAD_DIM}


def lr_variants():
  return [Variant(f"{p}_w{w}_lr{lr:g}", {"model": {**_width(w), "param": p}, "train": {"lr": lr}},
                  f"{p.upper()} width {w} lr {lr:g}")
          for p in ("sp", "mup") for w in WIDTHS for lr in LRS]


def wd_variants():
  return [Variant(f"wd_{rule}_w{w}", {"model": {**_width(w), "param": "mup"},
                                      "train": {"lr": WD_LR, "steps": 400},
                                      "optim": {"wd_rule": rule, "weight_decay": 0.1}},
                  f"muP, wd rule {rule}, width {w}")
          for rule in ("none", "mup", "layerwise") for w in WD_WIDTHS]


def _plot_lr(records, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=110, sharey=True)
  for ax, p in zip(axes, ("sp", "mup")):
    for w in WIDTHS:
      pts = [(r.config.train.lr, r.last("eval/loss")) for r in records
             if r.config.model.param == p and r.config.model.d_model == w]
      pts = [(lr, l) for lr, l in sorted(pts) if np.isfinite(l)]
      if pts:
        ax.plot(*zip(*pts), "o-", label=f"width {w}")
    ax.set(xscale="log", xlabel="learning rate", title=p.upper())
    ax.grid(alpha=0.3)
    ax.legend()
  axes[0].set_ylabel("eval loss after 200 steps")
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--only", default="")
  parser.add_argument("--runs", default="runs/mup_transfer")
  parser.add_argument("--out", default=OUT)
  args = parser.parse_args(argv)
  only = set(args.only.split(",")) if args.only else None
  os.makedirs(args.out, exist_ok=True)
  base = config_lib.apply_overrides(config_lib.Config(), BASE)

  # 2. coordinate check (cheap; first so its plot exists early)
  cc_path = os.path.join(args.out, "coord_check.json")
  if not os.path.exists(cc_path) or (only and "coord_check" in only):
    cc = coord_check.run(base, [64, 128, 256, 512], steps=5, lr=1e-2, head_dim=HEAD_DIM)
    with open(cc_path, "w") as f:
      json.dump(cc, f, indent=1)
    coord_check.plot(cc, os.path.join(args.out, "coord_check.png"))
  with open(cc_path) as f:
    cc = json.load(f)

  # 1. lr sweeps; 3. wd rules
  lr_recs = run_variants(base, lr_variants(), args.runs, only=only)
  wd_recs = run_variants(base, wd_variants(), args.runs, only=only)
  _plot_lr(lr_recs, os.path.join(args.out, "loss_vs_lr.png"))

  opt_rows = []
  for p in ("sp", "mup"):
    for w in WIDTHS:
      pts = [(r.last("eval/loss"), r.config.train.lr) for r in lr_recs
             if r.config.model.param == p and r.config.model.d_model == w
             and np.isfinite(r.last("eval/loss"))]
      if pts:
        best = min(pts)
        opt_rows.append([p.upper(), w, f"{best[1]:g}", best[0]] +
                        [next((f"{l:.4f}" for l, lr in pts if lr == x), "diverged") for x in LRS])
  lr_table = markdown_table(["param", "width", "best lr", "best eval loss"] +
                            [f"lr {x:g}" for x in LRS], opt_rows)

  cc_table = markdown_table(["module", "SP slope", "muP slope"],
                            [[m, cc["sp"][m]["slope"], cc["mup"][m]["slope"]]
                             for m in coord_check.MODULES])

  types = sorted({k.split("/")[-1] for r in wd_recs for k in r.rows[-1]
                  if k.startswith("spec/sigma_max/")})
  wd_rows = []
  for rule in ("none", "mup", "layerwise"):
    recs = {r.config.model.d_model: r for r in wd_recs if r.config.optim.wd_rule == rule}
    if len(recs) < 2:
      continue
    ratios = [recs[max(recs)].last(f"spec/sigma_max/{t}") / recs[min(recs)].last(f"spec/sigma_max/{t}")
              for t in types]
    wd_rows.append([rule] + [f"{recs[w].last('eval/loss'):.4f}" for w in sorted(recs)] +
                   [f"{x:.2f}" for x in ratios] + [f"{float(np.mean(np.abs(np.log(ratios)))):.3f}"])
  wd_table = markdown_table(
      ["wd rule"] + [f"eval loss w{w}" for w in WD_WIDTHS] +
      [f"sigma_max {t}: w{WD_WIDTHS[-1]}/w{WD_WIDTHS[0]}" for t in types] + ["mean abs log ratio"],
      wd_rows)

  body = (f"## 1. Loss versus learning rate\n\n{lr_table}\n\n![loss vs lr](loss_vs_lr.png)\n\n"
          f"## 2. Coordinate check (widths 64-512, 5 Adam steps at lr 1e-2)\n\nLog-log slope of "
          f"mean |activation| against width at the last step (0 = width-independent).\n\n"
          f"{cc_table}\n\n![coordinate check](coord_check.png)\n\n"
          f"## 3. Weight-decay rules (muP, lr {WD_LR:g}, 400 steps)\n\nTop singular value of each "
          f"matrix type at the end, widest over narrowest width (1.00 = matched across widths, "
          f"the diagnostic of Fan et al. 2025).\n\n{wd_table}\n\n"
          "## What reproduced\n\nSee FINDINGS.md (written by hand from the tables above).\n")
  path = write_summary(args.out, "muP transfer and weight-decay rules", body, lr_recs + wd_recs,
                       "python -m effjax.experiments.mup_transfer",
                       "byte-level LM on the built-in corpus, 4 layers, head_dim 16, widths 64/128/256 "
                       "(0.1M-3M parameters), batch 16 x 64 tokens, 200 steps (0.2M tokens) for the lr "
                       "sweep; wd rules at widths 64 and 128, 400 steps; one seed.")
  print(open(path).read())
  return 0


if __name__ == "__main__":
  sys.exit(main())

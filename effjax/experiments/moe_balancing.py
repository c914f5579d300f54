"""MoE balancing study (issue 5; docs/moe.md). Reruns and rewrites
results/moe_balancing/:

  python -m effjax.experiments.moe_balancing [--parts=a,b] [--only=NAME,...]
      [--runs=runs/moe_balancing]

Each part writes results/moe_balancing/parts/<part>.md with its own provenance; README.md is
assembled from the part files that exist (`--parts=a` reruns and rewrites part A only).

Part A, at equal active compute (dense SwiGLU d_ff=384 versus 16 experts x d_ff=192,
top-2, sigmoid router): no balancing, Switch aux loss at the Loss-Free paper's alpha 1e-3
(and 1e-2 as an extra row), ALF-LB, ALF-LB + sequence loss; every variant at SEEDS_A.
Part B (Sigma-MoE-Tiny setting): 32 experts, top-1, softmax router, 8 layers: plain
LBL, plain LBL with progressive sparsification (k=4 in the lowest 25% of layers until
40% of training).
"""

from __future__ import annotations

import os
import sys

import numpy as np

from effjax import config as config_lib
from effjax.experiments.study import (Variant, base_name, markdown_table, run_variants,
                                      study_main, with_seeds, write_part)
from effjax.paths import save_figure

OUT = "results/moe_balancing"
SEEDS_A = (0, 1)
SEEDS_B = (0,)
TITLE = "MoE balancing study"
COMMAND = "python -m effjax.experiments.moe_balancing"

BASE_A = {
    "model": {"d_model": 128, "n_layers": 4, "n_heads": 4, "mlp_dim": 384},
    "train": {"steps": 500, "batch_size": 16, "seq_len": 128, "lr": 3e-3, "warmup_steps": 50,
              "eval_every": 100, "eval_batches": 16, "log_every": 10, "checkpoint_every": 250,
              "sample_tokens": 0},
}
MOE_A = {"num_experts": 16, "top_k": 2, "expert_dim": 192, "router": "sigmoid"}

VARIANTS_A = [
    Variant("dense", {}, "dense SwiGLU, d_ff 384"),
    Variant("moe_none", {"model": {"moe": {**MOE_A, "balance": "none"}}}, "MoE, no balancing"),
    Variant("moe_aux1e-3", {"model": {"moe": {**MOE_A, "balance": "aux", "aux_coef": 1e-3}}},
            "MoE, Switch aux loss (alpha 1e-3, the Loss-Free paper's baseline)"),
    Variant("moe_aux1e-2", {"model": {"moe": {**MOE_A, "balance": "aux", "aux_coef": 1e-2}}},
            "MoE, Switch aux loss (alpha 1e-2)"),
    Variant("moe_alf", {"model": {"moe": {**MOE_A, "balance": "alf", "bias_update_rate": 1e-3}}},
            "MoE, ALF-LB (u 1e-3)"),
    Variant("moe_alf_seq", {"model": {"moe": {**MOE_A, "balance": "alf+seq_aux",
                                              "bias_update_rate": 1e-3, "seq_aux_coef": 1e-4}}},
            "MoE, ALF-LB + sequence-wise loss (alpha 1e-4)"),
]

BASE_B = {
    "model": {"d_model": 128, "n_layers": 8, "n_heads": 4, "mlp_dim": 384},
    "train": {"steps": 400, "batch_size": 16, "seq_len": 128, "lr": 3e-3, "warmup_steps": 40,
              "eval_every": 100, "eval_batches": 16, "log_every": 10, "checkpoint_every": 200,
              "sample_tokens": 0},
}
MOE_B = {"num_experts": 32, "top_k": 1, "expert_dim": 384, "router": "softmax"}
VARIANTS_B = [
    Variant("sigma_lbl", {"model": {"moe": {**MOE_B, "balance": "aux", "aux_coef": 1e-2}}},
            "32 experts top-1, plain LBL"),
    Variant("sigma_lbl_prog", {"model": {"moe": {**MOE_B, "balance": "aux", "aux_coef": 1e-2,
                                                 "topk_schedule": "0.25:4:0.4"}}},
            "plain LBL + progressive sparsification (k=4 in layers 0-1 until step 160)"),
    # ALF-LB in this setting (the paper saw lower-layer biases run away) did not fit the
    # first session's hour; add Variant("sigma_alf", balance="alf") to run it.
]


def _layers(rec):
  return sorted(int(k.rsplit("layer", 1)[1]) for k in rec.rows[-1]
                if k.startswith("eval/moe/maxvio_global/layer"))


def _maxvio_curve(rec):
  steps, vals = [], []
  for r in rec.rows:
    v = [val for k, val in r.items() if k.startswith("moe/maxvio/layer")]
    if v:
      steps.append(r["step"])
      vals.append(float(np.mean(v)))
  return np.asarray(steps), np.asarray(vals)


def _smooth(x, n=5):
  return np.convolve(x, np.ones(n) / n, mode="valid") if len(x) > n else x


def _plots(recs_a, recs_b, out):
  """Part A plot from the seed-0 runs (recs_a), part B plot from recs_b; either may be None."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  paths = []
  if not recs_a:
    recs_a = []
  fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
  for rec in recs_a:
    s, v = _maxvio_curve(rec)
    if len(s):
      axes[0].plot(s[len(s) - len(_smooth(v)):], _smooth(v), label=rec.variant.name)
  axes[0].set(xlabel="step", ylabel="batch MaxVio (mean over layers)", yscale="log",
              title="Part A: load imbalance during training")
  axes[0].legend()
  for rec in recs_a:
    layers = _layers(rec)
    if layers:
      axes[1].plot(layers, [rec.last(f"eval/moe/max_load/layer{i}") for i in layers], "o-",
                   label=f"{rec.variant.name} max")
      axes[1].plot(layers, [rec.last(f"eval/moe/min_load/layer{i}") for i in layers], "x--",
                   color=axes[1].lines[-1].get_color())
  axes[1].set(xlabel="layer", ylabel="tokens / mean (eval set)",
              title="max (o) and min (x) expert load per layer")
  axes[1].legend(fontsize=7)
  fig.tight_layout()
  if recs_a:
    paths.append(os.path.join(out, "part_a_balance.png"))
    save_figure(fig, paths[-1])
  plt.close(fig)

  if recs_b:
    fig, axes = plt.subplots(1, len(recs_b) + 1, figsize=(4.2 * (len(recs_b) + 1), 3.8), dpi=110)
    for ax, rec in zip(axes, recs_b):
      f = np.asarray(rec.last("eval/moe/f/layer0", []))
      p = np.asarray(rec.last("eval/moe/p/layer0", []))
      if f.size:
        order = np.argsort(-f)
        e = len(f)
        ax.bar(np.arange(e), f[order] * e, label="f: tokens / uniform share")
        ax.plot(np.arange(e), p[order] * e, "r.-", label="p: mean router prob x N")
        ax.axhline(1.0, color="k", lw=0.8)
      ax.set(title=f"{rec.variant.name}: layer 0", xlabel="expert (sorted by load)")
      ax.legend(fontsize=7)
    ax = axes[-1]
    for rec in recs_b:
      layers = _layers(rec)
      ax.plot(layers, [rec.last(f"eval/moe/max_load/layer{i}") for i in layers], "o-",
              label=rec.variant.name)
    ax.set(xlabel="layer", ylabel="max load / mean (eval)", title="Part B: max load per layer")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(os.path.join(out, "part_b_sigma.png"))
    save_figure(fig, paths[-1])
    plt.close(fig)
  return paths


SCALE_A = ("byte-level LM on the built-in corpus, d_model 128, 4 layers, batch 16 x 128 tokens, "
           "500 steps (1.0M tokens); seeds " + ", ".join(map(str, SEEDS_A)) + " (init and data "
           "order). Tiny: directional evidence only.")
SCALE_B = ("byte-level LM on the built-in corpus, d_model 128, 8 layers, batch 16 x 128 tokens, "
           "400 steps (0.8M tokens); seeds " + ", ".join(map(str, SEEDS_B)) + ". Tiny: "
           "directional evidence only.")
NOTE = ("Loads are tokens per expert divided by the mean, over the eval set (global) or per "
        "training batch; MaxVio = (max - mean) / mean. Global MaxVio (eval): the mean over MoE "
        "layers of the eval-set MaxVio. Batch MaxVio: the mean over MoE layers of one training "
        "step's MaxVio (over the whole step's tokens), averaged over the steps logged in the last "
        "100 steps (every 10th step). Bias spread: max - min of the ALF-LB expert bias at the end, "
        "largest over layers (sigmoid scores lie in (0, 1), so a spread near 1 lets the bias "
        "override content).")


def _bias_spread(rec):
  v = [val for k, val in rec.rows[-1].items() if k.startswith("moe/bias_spread")]
  if not v:
    for r in reversed(rec.rows):
      v = [val for k, val in r.items() if k.startswith("moe/bias_spread")]
      if v:
        break
  return max(v) if v else float("nan")


def _row(rec):
  layers = _layers(rec)
  max_load = max((rec.last(f"eval/moe/max_load/layer{i}") for i in layers), default=float("nan"))
  min_load = min((rec.last(f"eval/moe/min_load/layer{i}") for i in layers), default=float("nan"))
  _, curve = _maxvio_curve(rec)
  return {"loss": rec.last("eval/loss"), "bpb": rec.last("eval/bpb"),
          "global": rec.last("eval/moe/maxvio_global"),
          "batch": float(np.mean(curve[-10:])) if len(curve) else float("nan"),
          "min": min_load, "max": max_load, "bias": _bias_spread(rec),
          "params": f"{rec.info['params_active_non_embedding'] / 1e6:.2f}M / "
                    f"{rec.info['params_non_embedding'] / 1e6:.2f}M"}


def _tables(recs, variants):
  by = {}
  for r in recs:
    by.setdefault(base_name(r.variant.name), {})[r.config.seed] = _row(r)
  header = ["variant", "what", "seed", "eval loss", "eval bpb", "global MaxVio (eval)",
            "batch MaxVio (last 100 steps)", "min load", "max load", "bias spread",
            "active / total params (non-embedding)"]
  rows = [[v.name, v.label, seed, x["loss"], x["bpb"], x["global"], x["batch"], x["min"], x["max"],
           x["bias"], x["params"]]
          for v in variants for seed, x in sorted(by.get(v.name, {}).items())]
  stats = []
  for v in variants:
    xs = list(by.get(v.name, {}).values())
    if not xs:
      continue
    row = [v.name, len(xs)]
    for key in ("loss", "global", "batch"):
      vals = [x[key] for x in xs]
      row += [float(np.mean(vals)), float(max(vals) - min(vals)) if len(vals) > 1 else float("nan")]
    stats.append(row)
  stat_table = markdown_table(["variant", "seeds", "eval loss mean", "eval loss spread",
                               "global MaxVio mean", "global MaxVio spread", "batch MaxVio mean",
                               "batch MaxVio spread"], stats)
  return markdown_table(header, rows), stat_table, by


def part_a(args, only):
  base_a = config_lib.apply_overrides(config_lib.Config(), BASE_A)
  recs = run_variants(base_a, with_seeds(VARIANTS_A, SEEDS_A), args.runs, only=only)
  plots = _plots([r for r in recs if r.config.seed == 0], None, args.out)
  table, stat_table, by = _tables(recs, VARIANTS_A)
  pairs = [("moe_alf", "moe_aux1e-3"), ("moe_alf", "moe_aux1e-2"), ("moe_alf_seq", "moe_alf"),
           ("moe_aux1e-3", "moe_none"), ("moe_alf", "moe_none"), ("moe_none", "dense")]
  pair_rows = []
  for a, b in pairs:
    for seed in SEEDS_A:
      xa, xb = by.get(a, {}).get(seed), by.get(b, {}).get(seed)
      if xa and xb:
        pair_rows.append([f"{a} - {b}", seed, xa["loss"] - xb["loss"], xa["global"] - xb["global"],
                          xa["batch"] - xb["batch"]])
  body = (f"{table}\n\n### Mean and seed-to-seed spread (max - min over seeds)\n\n{stat_table}"
          "\n\n### Paired differences, within each seed\n\n"
          + markdown_table(["difference", "seed", "eval loss", "global MaxVio", "batch MaxVio"],
                           pair_rows)
          + (f"\n\n![part A]({os.path.basename(plots[0])}) (seed 0)" if plots else "")
          + f"\n\n{NOTE}\n")
  return write_part(args.out, "a", "Part A: balancing methods at equal active compute", body, recs,
                    COMMAND + " --parts=a", SCALE_A)


def part_b(args, only):
  base_b = config_lib.apply_overrides(config_lib.Config(), BASE_B)
  recs = run_variants(base_b, with_seeds(VARIANTS_B, SEEDS_B), args.runs, only=only)
  plots = _plots(None, [r for r in recs if r.config.seed == 0], args.out)
  table, stat_table, _ = _tables(recs, VARIANTS_B)
  body = (f"{table}\n\n"
          + (f"### Mean and seed-to-seed spread (max - min over seeds)\n\n{stat_table}\n\n"
             if len(SEEDS_B) > 1 else "")
          + (f"![part B]({os.path.basename(plots[-1])})\n\n" if plots else "") + f"{NOTE}\n")
  return write_part(args.out, "b", "Part B: Sigma-MoE setting (32 experts, top-1, 8 layers)", body,
                    recs, COMMAND + " --parts=b", SCALE_B)


def main(argv=None) -> int:
  return study_main(argv, name="moe_balancing", doc=__doc__, title=TITLE, out=OUT,
                    parts={"a": part_a, "b": part_b})


if __name__ == "__main__":
  sys.exit(main())

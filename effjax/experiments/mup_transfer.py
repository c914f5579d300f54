"""muP transfer study (issue 7; docs/mup.md). Reruns and rewrites
results/mup_transfer/:

  python -m effjax.experiments.mup_transfer [--parts=1,2,3,4] [--only=NAME,...]
      [--runs=runs/mup_transfer]

Each part writes results/mup_transfer/parts/<part>.md with its own provenance; README.md is
assembled from the part files that exist (`--parts=3` reruns and rewrites part 3 only).

1. Loss versus lr at widths 64, 128, 256 (head_dim 16, heads grow with width) under SP
   and muP (base width 64): the optimum should stay put under muP and drift under SP.
2. Coordinate check, widths 64..512, 5 Adam steps, both parameterisations; heads grow at
   head_dim 16, and head_dim grows at 4 heads (catches attention-scale bugs).
3. Weight-decay rules under muP at a fixed lr: none, mup (lambda x m_in), layerwise
   (lambda x m^(1/2), Fan et al.) and power_lines (lambda from a timescale tau that grows with
   N^0.527 at fixed tokens), compared by eval loss and by the top singular value of each
   matrix type at the end of training across WD_WIDTHS; the `none` rule again at seed 1 for
   the seed-to-seed spread.
4. Wider is better under muP: muP at the transferred lr (3e-3) at widths 64, 128, 256 for
   WIDER_STEPS steps, per-width eval-loss curves.
"""

from __future__ import annotations

import sys

import numpy as np

from effjax import config as config_lib
from effjax import coord_check
from effjax import paths
from effjax.experiments.study import Variant, markdown_table, run_variants, study_main, write_part
from effjax.paths import save_figure

OUT = "results/mup_transfer"
WIDTHS = (64, 128, 256)
LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
HEAD_DIM = 16
WD_LR = 1e-2
WD_WIDTHS = (64, 128)  # two widths: what the issue-11 rerun's CPU budget allowed
WD_STEPS = 400
WD_RULES = ("none", "mup", "layerwise", "power_lines")
PL_EXPONENT = 0.527  # Power Lines: tau_opt ~ (D/N)^-0.527; at fixed D, tau ~ N^0.527
WIDER_LR = 3e-3
WIDER_STEPS = 1000
TITLE = "muP transfer and weight-decay rules"
COMMAND = "python -m effjax.experiments.mup_transfer"
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


def _blocks_params(w: int) -> int:
  from effjax.models import transformer  # pylint: disable=g-import-not-at-top
  cfg = config_lib.apply_overrides(config_lib.Config(), BASE)
  cfg = config_lib.apply_overrides(cfg, {"model": {**_width(w), "param": "mup"}})
  dims = transformer.resolve_dims(cfg.model, 256)
  return transformer.count_params(dims, cfg.model.tie_embeddings, cfg.model)["blocks"]


def power_lines_tau(w: int) -> float:
  """tau at width w: equal to the `none` rule's tau (lambda 0.1) at the base width, growing as
  N^0.527 at fixed tokens (N = non-embedding parameters)."""
  tau0 = 1.0 / (WD_LR * 0.1 * WD_STEPS)
  return tau0 * (_blocks_params(w) / _blocks_params(WD_WIDTHS[0])) ** PL_EXPONENT


def wd_variants():
  out = []
  for rule in WD_RULES:
    for w in WD_WIDTHS:
      optim = {"wd_rule": rule, "weight_decay": 0.1}
      if rule == "power_lines":
        optim["wd_tau"] = round(power_lines_tau(w), 4)
      out.append(Variant(f"wd_{rule}_w{w}", {"model": {**_width(w), "param": "mup"},
                                             "train": {"lr": WD_LR, "steps": WD_STEPS},
                                             "optim": optim},
                         f"muP, wd rule {rule}, width {w}"))
  for w in WD_WIDTHS:  # seed-to-seed spread
    out.append(Variant(f"wd_none_w{w}_seed1", {"model": {**_width(w), "param": "mup"},
                                               "train": {"lr": WD_LR, "steps": WD_STEPS},
                                               "optim": {"wd_rule": "none", "weight_decay": 0.1},
                                               "seed": 1},
                       f"muP, wd rule none, width {w}, seed 1"))
  return out


def wider_variants():
  return [Variant(f"wider_mup_w{w}", {"model": {**_width(w), "param": "mup"},
                                      "train": {"lr": WIDER_LR, "steps": WIDER_STEPS,
                                                "warmup_steps": 50, "checkpoint_every": 500}},
                  f"muP width {w} lr {WIDER_LR:g}, {WIDER_STEPS} steps")
          for w in WIDTHS]


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
  save_figure(fig, path)
  plt.close(fig)


SCALE_1 = ("byte-level LM on the built-in corpus, 4 layers, head_dim 16, widths 64/128/256 "
           "(0.2M-3.2M non-embedding parameters), batch 16 x 64 tokens, 200 steps (0.2M tokens) "
           "per lr point; one seed.")
SCALE_3 = (f"byte-level LM on the built-in corpus, 4 layers, head_dim 16, muP (base width 64), "
           f"widths {'/'.join(map(str, WD_WIDTHS))}, batch 16 x 64 tokens, {WD_STEPS} steps "
           f"({WD_STEPS * 1024 / 1e6:.1f}M tokens), lr {WD_LR:g}, base decay 0.1; seed 0 (the "
           "`none` rule also at seed 1).")
SCALE_4 = (f"byte-level LM on the built-in corpus, 4 layers, head_dim 16, muP (base width 64), widths "
           f"{'/'.join(map(str, WIDTHS))}, batch 16 x 64 tokens, {WIDER_STEPS} steps "
           f"({WIDER_STEPS * 1024 / 1e6:.2f}M tokens), lr {WIDER_LR:g}, seed 0.")


def part_1(args, only):
  base = config_lib.apply_overrides(config_lib.Config(), BASE)
  lr_recs = run_variants(base, lr_variants(), args.runs, only=only)
  _plot_lr(lr_recs, paths.as_path(args.out) / "loss_vs_lr.png")
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
  return write_part(args.out, "1", "1. Loss versus learning rate",
                    f"{lr_table}\n\n![loss vs lr](loss_vs_lr.png)\n", lr_recs,
                    COMMAND + " --parts=1", SCALE_1)


def part_2(args, only):
  del only
  from effjax.train import trainer  # pylint: disable=g-import-not-at-top
  commit = trainer._git_commit()  # pylint: disable=protected-access
  base = config_lib.apply_overrides(config_lib.Config(), BASE)
  widths = [64, 128, 256, 512]
  sections = []
  for grow, suffix, what in (("heads", "", "heads grow at head_dim 16"),
                             ("head_dim", "_head_dim", "head_dim grows at 4 heads")):
    cc = coord_check.run(base, widths, steps=5, lr=1e-2, head_dim=HEAD_DIM, grow=grow, heads=4)
    paths.write_json(paths.as_path(args.out) / f"coord_check{suffix}.json", cc, indent=1)
    coord_check.plot(cc, paths.as_path(args.out) / f"coord_check{suffix}.png")
    table = markdown_table(["module", "SP slope", "muP slope"],
                           [[m, cc["sp"][m]["slope"], cc["mup"][m]["slope"]]
                            for m in coord_check.MODULES])
    sections.append(f"### {what}\n\n{table}\n\n![coordinate check, {what}]"
                    f"(coord_check{suffix}.png)")
  body = ("Log-log slope of mean |activation| against width at the last step (0 = "
          "width-independent); zero-initialised readout, no weight decay, constant lr.\n\n"
          + "\n\n".join(sections) + "\n")
  return write_part(args.out, "2", "2. Coordinate check (widths 64-512, 5 Adam steps at lr 1e-2)",
                    body, [], "python -m effjax.experiments.mup_transfer --parts=2",
                    "4 layers, widths 64/128/256/512, batch 16 x 64 tokens, 5 steps, seed 0.", commit)


def _hidden_lr_wd(rule: str, w: int) -> float:
  """lr x decay of a hidden matrix whose fan_in grows with width (m_in = m) under muP."""
  m = w / WIDTHS[0]
  lam = {"none": 0.1, "mup": 0.1 * m, "layerwise": 0.1 * m ** 0.5,
         "power_lines": 1.0 / (WD_LR * power_lines_tau(w) * WD_STEPS)}[rule]
  return WD_LR / m * lam


def part_3(args, only):
  base = config_lib.apply_overrides(config_lib.Config(), BASE)
  wd_recs = run_variants(base, wd_variants(), args.runs, only=only)
  main_recs = [r for r in wd_recs if r.config.seed == 0]
  types = sorted({k.split("/")[-1] for r in main_recs for k in r.rows[-1]
                  if k.startswith("spec/sigma_max/")})
  lo, hi = WD_WIDTHS[0], WD_WIDTHS[-1]
  wd_rows = []
  for rule in WD_RULES:
    recs = {r.config.model.d_model: r for r in main_recs if r.config.optim.wd_rule == rule}
    if len(recs) < 2:
      continue
    ratios = [recs[hi].last(f"spec/sigma_max/{t}") / recs[lo].last(f"spec/sigma_max/{t}")
              for t in types]
    wd_rows.append([rule] + [f"{_hidden_lr_wd(rule, w):.2e}" for w in sorted(recs)]
                   + [f"{recs[w].last('eval/loss'):.4f}" for w in sorted(recs)]
                   + [f"{x:.2f}" for x in ratios]
                   + [f"{float(np.mean(np.abs(np.log(ratios)))):.3f}"])
  wd_table = markdown_table(
      ["wd rule"] + [f"hidden lr x wd, w{w}" for w in WD_WIDTHS]
      + [f"eval loss w{w}" for w in WD_WIDTHS]
      + [f"sigma_max {t}: w{hi}/w{lo}" for t in types] + ["mean abs log ratio"], wd_rows)
  seed_rows = []
  for w in WD_WIDTHS:
    rs = {r.config.seed: r for r in wd_recs
          if r.config.optim.wd_rule == "none" and r.config.model.d_model == w}
    if len(rs) == 2:
      l0, l1 = rs[0].last("eval/loss"), rs[1].last("eval/loss")
      seed_rows.append([f"none, w{w}", l0, l1, abs(l1 - l0)])
  seed_table = markdown_table(["rule, width", "eval loss seed 0", "eval loss seed 1",
                               "spread |s1 - s0|"], seed_rows)
  body = (f"Top singular value of each matrix type at the end, widest over narrowest width (1.00 = "
          f"matched across widths, the diagnostic of Fan et al. 2025). Rules (docs/mup.md): `none` "
          f"decays every matrix, embedding and readout by 0.1; `mup` multiplies it by m_in on "
          f"matrices; `layerwise` by m^(1/2) on matrices and 0 on embedding, readout and vectors "
          f"(Fan et al.: lambda_2 ~ sqrt(d)); `power_lines` sets one lambda = 1/(lr tau S) for every "
          f"decayed role with tau = tau_0 (N/N_64)^{PL_EXPONENT}, tau_0 = 2.5 (lambda 0.1 at width "
          f"64), i.e. the optimal-timescale power law in tokens per parameter at fixed tokens "
          f"(wd_tau {', '.join(f'{power_lines_tau(w):.3f} at w{w}' for w in WD_WIDTHS)}).\n\n"
          f"{wd_table}\n\n### Seed-to-seed spread\n\n{seed_table}\n")
  return write_part(args.out, "3", f"3. Weight-decay rules (muP, lr {WD_LR:g}, {WD_STEPS} steps)",
                    body, wd_recs, COMMAND + " --parts=3", SCALE_3)


def _plot_wider(recs, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
  curves = {r.config.model.d_model: dict(r.series("eval/loss")) for r in recs}
  for w, c in sorted(curves.items()):
    axes[0].plot(list(c), list(c.values()), "o-", ms=3, label=f"width {w}")
  base = curves.get(WIDTHS[0], {})
  for w, c in sorted(curves.items()):
    if w != WIDTHS[0]:
      steps = [s for s in c if s in base]
      axes[1].plot(steps, [c[s] - base[s] for s in steps], "o-", ms=3,
                   label=f"width {w} - width {WIDTHS[0]}")
  axes[1].axhline(0, color="k", lw=0.8)
  axes[0].set(xlabel="step", ylabel="eval loss", title=f"muP, lr {WIDER_LR:g}")
  axes[1].set(xlabel="step", ylabel="eval loss difference", title="wider minus base width")
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  save_figure(fig, path)
  plt.close(fig)


def part_4(args, only):
  base = config_lib.apply_overrides(config_lib.Config(), BASE)
  recs = run_variants(base, wider_variants(), args.runs, only=only)
  _plot_wider(recs, paths.as_path(args.out) / "wider_is_better.png")
  steps = sorted({s for r in recs for s, _ in r.series("eval/loss")})
  rows = []
  for r in sorted(recs, key=lambda r: r.config.model.d_model):
    c = dict(r.series("eval/loss"))
    rows.append([r.config.model.d_model] + [f"{c[s]:.4f}" if s in c else "" for s in steps]
                + [r.last("train/loss")])
  table = markdown_table(["width"] + [f"eval loss @{s}" for s in steps] + ["final train loss"],
                         rows)
  body = (f"{table}\n\n![wider is better](wider_is_better.png)\n")
  return write_part(args.out, "4", f"4. Wider is better under muP (lr {WIDER_LR:g}, "
                    f"{WIDER_STEPS} steps)", body, recs, COMMAND + " --parts=4", SCALE_4)


def main(argv=None) -> int:
  return study_main(argv, name="mup_transfer", doc=__doc__, title=TITLE, out=OUT,
                    parts={"1": part_1, "2": part_2, "3": part_3, "4": part_4})


if __name__ == "__main__":
  sys.exit(main())

"""Dynamic loss-based sample reweighting study (issue 18; docs/data.md). Writes results/reweighting/:

  python -m effjax.experiments.reweighting [--parts=a] [--only=NAME,...] [--runs=runs/reweighting]
  python -m effjax.experiments.reweighting --smoke --runs=/tmp/rw --out=/tmp/rw_out   # 2 steps

Part A: uniform weights (train.reweight=none) against linear, softmax and linupper (the
paper's best) on a mixture where half the samples are redundant: the built-in corpus
(clean) at weight 0.5 and a small subset of its own training files (the `json` package,
copied once into the runs folder) at weight 0.5, so that subset is seen many times over.
Each scheme starts after a uniform warm-up of 10% of the steps. Reported: eval loss on the
built-in corpus's validation set (the clean figure), on the repeated subset, and the mixed
figure, per seed and as the mean over seeds with the seed-to-seed spread; plus the mean
effective sample size and weight spread during training. The paper reports that
down-weighting low-loss (already learned, redundant) samples helps.
"""

from __future__ import annotations

import os
import shutil
import sys

from effjax import config as config_lib
from effjax import paths
from effjax.data import builtin_corpus_files, builtin_corpus_root, is_validation
from effjax.experiments.study import (Variant, markdown_table, run_variants, seed_stats,
                                      study_main, with_seeds, write_part)

OUT = "results/reweighting"
TITLE = "Dynamic loss-based sample reweighting"
COMMAND = "python -m effjax.experiments.reweighting"
SEEDS = (0, 1)
STEPS = 600
SMOKE = {"steps": 2}
REPEATED_PACKAGE = "json/"

SCHEMES = [("none", "uniform (baseline)", 1.0), ("linear", "w ~ loss", 1.0),
           ("softmax", "softmax(loss / 0.5)", 0.5), ("linupper", "LinUpper, r = 1 (paper's best)", 1.0)]


def repeated_subset(runs_dir: str) -> str:
  """Copies the built-in corpus's training files of REPEATED_PACKAGE into runs_dir/repeated
  (so the subset never overlaps the clean validation set) and returns a glob of them."""
  root, dst = builtin_corpus_root(), os.path.join(runs_dir, "repeated")
  files = [f for f in builtin_corpus_files(root)
           if f.startswith(REPEATED_PACKAGE) and not is_validation(f, 5)]
  os.makedirs(dst, exist_ok=True)
  for f in files:
    target = os.path.join(dst, f.replace("/", "__"))
    if not os.path.exists(target):
      shutil.copy(os.path.join(root, f), target)
  return os.path.join(dst, "*.py")


def _base(runs_dir: str, steps: int) -> dict:
  return {
      "model": {"d_model": 64, "n_layers": 4, "n_heads": 4},
      "train": {"steps": steps, "batch_size": 16, "seq_len": 128, "lr": 3e-3,
                "warmup_steps": min(30, steps), "eval_every": max(steps // 4, 1),
                "eval_batches": 16, "log_every": 10, "checkpoint_every": max(steps // 2, 1),
                "sample_tokens": 0, "plot": False},
      "data": {"sources": f"builtin:0.5,repeated={repeated_subset(runs_dir)}:0.5",
               "val_percent": 5},
  }


def variants(steps: int) -> list[Variant]:
  out = []
  for scheme, label, temperature in SCHEMES:
    over = {} if scheme == "none" else {"train": {
        "reweight": scheme, "reweight_temperature": temperature,
        "reweight_warmup": steps // 10}}
    out.append(Variant(scheme, over, label))
  return with_seeds(out, SEEDS)


def _mean_metric(rec, key):
  vals = [v for _, v in rec.series(key)]
  return sum(vals) / len(vals) if vals else float("nan")


def plot(recs, out_dir: str) -> str:
  """part_a.png: clean eval loss against step (left) and the effective sample size of the
  batch weights (right), one line per run."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (ax_loss, ax_ess) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
  colors = {scheme: f"C{i}" for i, (scheme, _, _) in enumerate(SCHEMES)}
  for r in recs:
    scheme = r.variant.name.split("_seed")[0]
    style = dict(color=colors.get(scheme, "k"), lw=1,
                 ls="--" if "_seed" in r.variant.name else "-")
    s = r.series("eval/builtin/loss")
    if s:
      ax_loss.plot(*zip(*s), label=r.variant.name, marker="o", ms=3, **style)
    e = r.series("train/reweight/ess")
    if e:
      ax_ess.plot(*zip(*e), label=r.variant.name, **style)
  ax_loss.set(xlabel="step", ylabel="eval loss, clean (builtin)", title="clean validation loss")
  ax_ess.set(xlabel="step", ylabel="effective sample size / batch",
             title="batch-weight ESS (uniform = 1)")
  for ax in (ax_loss, ax_ess):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  path = str(paths.as_path(out_dir) / "part_a.png")
  paths.save_figure(fig, path)
  plt.close(fig)
  return path


def part_a(args, only):
  steps = SMOKE["steps"] if args.smoke else STEPS
  base = config_lib.apply_overrides(config_lib.Config(), _base(args.runs, steps))
  recs = run_variants(base, variants(steps), args.runs, only=only)
  rows, by = [], {}
  for r in recs:
    name = r.variant.name.split("_seed")[0]
    by.setdefault(name, []).append(r)
    rows.append([r.variant.name, r.config.seed, r.last("eval/builtin/loss"),
                 r.last("eval/repeated/loss"), r.last("eval/loss"), r.last("train/loss"),
                 _mean_metric(r, "train/reweight/ess"),
                 _mean_metric(r, "train/reweight/weight_std")])
  per_seed = markdown_table(["variant", "seed", "eval loss, clean (builtin)",
                             "eval loss, repeated", "eval loss, mixed", "final train loss",
                             "mean ESS", "mean weight std"], rows)
  base_clean = seed_stats([r.last("eval/builtin/loss") for r in by.get("none", [])])[0]
  summary = []
  for scheme, label, _ in SCHEMES:
    rs = by.get(scheme, [])
    clean, spread = seed_stats([r.last("eval/builtin/loss") for r in rs])
    rep, _ = seed_stats([r.last("eval/repeated/loss") for r in rs])
    summary.append([scheme, label, len(rs), clean, spread, clean - base_clean, rep])
  table = markdown_table(["scheme", "what", "seeds", "clean eval loss (mean)", "seed spread",
                          "vs uniform", "repeated-subset eval loss (mean)"], summary)
  scale = (f"byte-level LM, 4 layers, d_model 64, batch 16 x 128 tokens, {steps} steps per run, "
           f"warm-up of uniform weights {steps // 10} steps; mixture builtin 0.5 + the "
           f"built-in corpus's `{REPEATED_PACKAGE}` training files 0.5; seeds {SEEDS}. "
           "Tiny: directional evidence only.")
  plot(recs, args.out)
  body = (f"![clean eval loss and ESS](part_a.png)\n\n"
          f"### Mean over seeds\n\n{table}\n\n### Per seed\n\n{per_seed}\n\n"
          "Read a difference to uniform against the seed spread; a gain smaller than the "
          "spread is not evidence.\n")
  return write_part(args.out, "a", "Part A: uniform vs loss-based reweighting on a redundant "
                    "mixture", body, recs, COMMAND + (" --smoke" if args.smoke else ""), scale)


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  smoke = "--smoke" in argv
  argv = [a for a in argv if a != "--smoke"]

  def part(args, only):
    args.smoke = smoke
    return part_a(args, only)

  return study_main(argv, name="reweighting", doc=__doc__, title=TITLE, out=OUT,
                    parts={"a": part})


if __name__ == "__main__":
  sys.exit(main())

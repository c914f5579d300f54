"""QAT study (issue 6; docs/qat.md). Reruns and rewrites results/qat/:

  python -m effjax.experiments.qat [--parts=a,b,c] [--only=NAME,...] [--runs=runs/qat]

Each part writes results/qat/parts/<part>.md with its own provenance; README.md is
assembled from the part files that exist (`--parts=b` reruns and rewrites part B only).

Part A (QuEST): no quantization, W8A8, W4A4 with and without the Hadamard rotation, W3A3,
W2A2, W1A1, at two widths (d_model 64 and 128, 4 layers) and equal tokens.
Part B (OFQ weights at 2 bits, 8-bit LSQ inputs, d_model 128): StatsQ versus LSQ weights
(oscillating fraction and loss), and StatsQ with CGA over the last 20% of training; then the
pair again with the cosine ending at 1e-5 and CGA over the last 10% (the paper's low-lr regime);
every variant at seeds 0 and 1 (SEEDS_B), reported per seed with the seed-to-seed spread.
Part C (noise floor): the unquantized and W8A8 runs again with seed 1 (init and data order):
how much the gap W8A8 - unquantized moves between seeds, per width, the scale against which
part A's gaps are read.
"""

from __future__ import annotations

import os
import sys

from effjax import config as config_lib
from effjax.experiments.study import Variant, markdown_table, run_variants, study_main, write_part
from effjax.paths import save_figure

OUT = "results/qat"
WIDTHS = (64, 128)
BITS = (8, 4, 3, 2, 1)
SEEDS_B = (0, 1)
TITLE = "QAT study (QuEST, StatsQ, LSQ)"
COMMAND = "python -m effjax.experiments.qat"


def _base(width: int) -> dict:
  return {
      "model": {"d_model": width, "n_layers": 4, "n_heads": 4, "tie_embeddings": False},
      "train": {"steps": 300, "batch_size": 16, "seq_len": 128, "lr": 3e-3, "warmup_steps": 30,
                "eval_every": 100, "eval_batches": 16, "log_every": 10, "checkpoint_every": 150,
                "sample_tokens": 0, "plot": False},
      "optim": {"b2": 0.95, "grad_clip": 1.0},
  }


def _quest(bits: int, hadamard: str = "full") -> dict:
  return {"quant": {"method": "quest", "weight_bits": bits, "act_bits": bits,
                    "hadamard": hadamard}}


def variants_a(width: int) -> list[Variant]:
  out = [Variant(f"d{width}_fp32", {}, "no quantization (fp32 on CPU)")]
  for bits in BITS:
    out.append(Variant(f"d{width}_w{bits}a{bits}", _quest(bits), f"QuEST W{bits}A{bits}"))
    if bits == 4:
      out.append(Variant(f"d{width}_w4a4_noh", _quest(4, "none"), "QuEST W4A4, no Hadamard"))
  return out


VARIANTS_B = [
    Variant("d128_statsq_w2a8", {"quant": {"method": "statsq", "weight_bits": 2, "act_bits": 8}},
            "StatsQ W2, LSQ A8"),
    Variant("d128_lsq_w2a8", {"quant": {"method": "lsq", "weight_bits": 2, "act_bits": 8}},
            "LSQ W2, LSQ A8"),
    Variant("d128_statsq_w2a8_cga", {"quant": {"method": "statsq", "weight_bits": 2,
                                               "act_bits": 8, "cga_start": 0.8}},
            "StatsQ W2, LSQ A8, CGA over the last 20% (BR 0.005)"),
    # The paper anneals with CGA at lr 1e-5: the same pair with the cosine ending at 1e-5
    # (min_lr_ratio 1/300) and CGA over the last 10%, where lr <= 1e-4.
    Variant("d128_statsq_w2a8_lowlr", {"quant": {"method": "statsq", "weight_bits": 2,
                                                 "act_bits": 8},
                                       "train": {"min_lr_ratio": 1 / 300}},
            "StatsQ W2, LSQ A8, cosine to 1e-5"),
    Variant("d128_statsq_w2a8_lowlr_cga", {"quant": {"method": "statsq", "weight_bits": 2,
                                                     "act_bits": 8, "cga_start": 0.9},
                                           "train": {"min_lr_ratio": 1 / 300}},
            "StatsQ W2, LSQ A8, cosine to 1e-5, CGA over the last 10%"),
]


def variants_b() -> list[Variant]:
  """VARIANTS_B at every seed in SEEDS_B; seed 0 keeps the original names."""
  out = []
  for seed in SEEDS_B:
    for v in VARIANTS_B:
      if seed == 0:
        out.append(v)
      else:
        out.append(Variant(f"{v.name}_seed{seed}", {**v.overrides, "seed": seed},
                           f"{v.label}, seed {seed}"))
  return out


def _base_name(name: str) -> str:
  return name.split("_seed")[0]


def variants_c(width: int) -> list[Variant]:
  return [Variant(f"d{width}_fp32_seed1", {"seed": 1}, "no quantization, seed 1"),
          Variant(f"d{width}_w8a8_seed1", {**_quest(8), "seed": 1}, "QuEST W8A8, seed 1")]


def _plot(recs_by_width, out: str, noise: dict) -> str:
  """Left: eval loss versus bits per width. Right: the gap to the unquantized model versus
  width per bit count, with the seed-to-seed change of the W8A8 gap (part C, per width) as
  a grey band."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  gaps = {}  # bits -> [(width, gap)]
  for width, recs in recs_by_width.items():
    by_name = {r.variant.name: r for r in recs}
    base = by_name.get(f"d{width}_fp32")
    bits = [b for b in BITS if f"d{width}_w{b}a{b}" in by_name]
    loss = [by_name[f"d{width}_w{b}a{b}"].last("eval/loss") for b in bits]
    axes[0].plot(bits, loss, "o-", label=f"d_model {width}")
    if base is not None:
      axes[0].axhline(base.last("eval/loss"), ls=":", color=axes[0].lines[-1].get_color())
      for b, x in zip(bits, loss):
        gaps.setdefault(b, []).append((width, x - base.last("eval/loss")))
  for b, points in sorted(gaps.items()):
    axes[1].plot(*zip(*points), "o-", label=f"W{b}A{b}")
  axes[1].axhline(0, color="k", lw=0.8)
  widths = sorted(w for w in noise if noise[w] == noise[w])  # skip nan
  if widths:
    band = [noise[w] for w in widths]
    axes[1].fill_between(widths, [-b for b in band], band, color="0.85",
                         label="seed change of the W8A8 gap (part C)")
  axes[0].set(xlabel="bits (weights = activations)", ylabel="eval loss",
              title="QuEST: eval loss vs bits (dotted: unquantized)")
  axes[1].set(xlabel="d_model", ylabel="eval loss - unquantized", xscale="log",
              xticks=list(recs_by_width), xticklabels=[str(w) for w in recs_by_width],
              title="gap to the unquantized model vs width")
  axes[1].minorticks_off()
  for ax in axes:
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
  path = os.path.join(out, "loss_vs_bits.png")
  fig.tight_layout()
  save_figure(fig, path, dpi=120)
  return path


SCALE_A_C = ("byte-level LM on the built-in corpus, 4 layers, d_model 64 / 128, untied head, batch "
             "16 x 128 tokens, 300 steps (0.6M tokens) per run; fp32 compute on CPU; seed 0 (part C "
             "repeats two variants per width with seed 1). Tiny: directional evidence only.")
SCALE_B = ("byte-level LM on the built-in corpus, 4 layers, d_model 128, untied head, batch 16 x 128 "
           "tokens, 300 steps (0.6M tokens) per run; fp32 compute on CPU; seeds "
           + ", ".join(str(s) for s in SEEDS_B) + " (init and data order). Tiny: directional "
           "evidence only.")
HEADER = ["variant", "what", "eval loss", "gap to unquantized", "eval bpb", "final train loss"]


def _row(rec, base_loss):
  loss = rec.last("eval/loss")
  return [rec.variant.name, rec.variant.label, loss, loss - base_loss, rec.last("eval/bpb"),
          rec.last("train/loss")]


def _per_type(rec, metric):
  return " / ".join(f"{rec.last(f'quant/{metric}/{k}'):.4f}" for k in ("qkv", "attn_out", "mlp"))


def _osc_mean(rec):
  return sum(rec.last(f"quant/osc/{k}") for k in ("qkv", "attn_out", "mlp")) / 3


def part_a(args, only):
  recs = {}
  for width in WIDTHS:
    base = config_lib.apply_overrides(config_lib.Config(), _base(width))
    recs[width] = run_variants(base, variants_a(width), args.runs, only=only)
  noise = {w: r[-1] for w, r in zip(WIDTHS, _seed_rows(recs, _load_c(args)))}
  plot = _plot(recs, args.out, noise)
  tables = []
  for width, rs in recs.items():
    base_loss = next((r.last("eval/loss") for r in rs if r.variant.name.endswith("fp32")),
                     float("nan"))
    tables.append(f"### d_model {width}\n\n" + markdown_table(HEADER, [_row(r, base_loss)
                                                                     for r in rs]))
  body = "\n\n".join(tables) + f"\n\n![loss vs bits]({os.path.basename(plot)})\n"
  return write_part(args.out, "a", "Part A: QuEST, loss versus bits at two widths (equal tokens)",
                    body, [r for rs in recs.values() for r in rs], COMMAND + " --parts=a",
                    SCALE_A_C)


def part_b(args, only):
  base = config_lib.apply_overrides(config_lib.Config(), _base(128))
  recs = run_variants(base, variants_b(), args.runs, only=only)
  by = {}  # base name -> {seed: rec}
  for r in recs:
    by.setdefault(_base_name(r.variant.name), {})[r.config.seed] = r
  header = ["variant", "what", "seed", "eval loss", "eval bpb", "final train loss",
            "oscillating (qkv / attn_out / mlp)", "oscillating, mean of the 3",
            "CGA trainable fraction", "weight rel. MSE (qkv / attn_out / mlp)"]
  rows = []
  for v in VARIANTS_B:
    for seed, r in sorted(by.get(v.name, {}).items()):
      rows.append([v.name, v.label, seed, r.last("eval/loss"), r.last("eval/bpb"),
                   r.last("train/loss"), _per_type(r, "osc"), _osc_mean(r),
                   r.last("quant/cga_trainable"), _per_type(r, "weight_rel_mse")])

  def stat_rows():
    out = []
    for v in VARIANTS_B:
      rs = by.get(v.name, {})
      loss = [rs[s].last("eval/loss") for s in sorted(rs)]
      osc = [_osc_mean(rs[s]) for s in sorted(rs)]
      out.append([v.name, len(rs), sum(loss) / max(len(loss), 1),
                  (max(loss) - min(loss)) if len(loss) > 1 else float("nan"),
                  sum(osc) / max(len(osc), 1),
                  (max(osc) - min(osc)) if len(osc) > 1 else float("nan")])
    return out

  pairs = [("d128_statsq_w2a8_cga", "d128_statsq_w2a8", "CGA (last 20%) - no CGA, cosine to 3e-4"),
           ("d128_statsq_w2a8_lowlr_cga", "d128_statsq_w2a8_lowlr",
            "CGA (last 10%) - no CGA, cosine to 1e-5"),
           ("d128_lsq_w2a8", "d128_statsq_w2a8", "LSQ - StatsQ"),
           ("d128_statsq_w2a8_lowlr", "d128_statsq_w2a8", "cosine to 1e-5 - cosine to 3e-4")]
  pair_rows = []
  for a, b, what in pairs:
    for seed in SEEDS_B:
      ra, rb = by.get(a, {}).get(seed), by.get(b, {}).get(seed)
      if ra is None or rb is None:
        continue
      pair_rows.append([what, seed, ra.last("eval/loss") - rb.last("eval/loss"),
                        _osc_mean(ra) - _osc_mean(rb)])
  body = (markdown_table(header, rows) + "\n\n### Mean and seed-to-seed spread (max - min over "
          "seeds)\n\n" + markdown_table(["variant", "seeds", "eval loss mean", "eval loss spread",
                                          "oscillating mean", "oscillating spread"], stat_rows())
          + "\n\n### Paired differences, within each seed\n\n"
          + markdown_table(["difference", "seed", "eval loss", "oscillating (mean of 3)"], pair_rows)
          + "\n\nOscillating fraction: weights whose EMA (momentum 0.01) of integer-code "
            "direction flips exceeds 0.01, at the last eval (effjax/train/quant_extension.py). "
            "CGA (OFQ's confidence-guided annealing, as fixed in issue 11): a weight stays "
            "trainable only while its scaled value u lies within BR = 0.005 of an interior "
            "rounding boundary (|u - (i + 1/2)| <= BR, -n <= i <= n - 2); every other weight, "
            "clipped ones included, is frozen; the mask is recomputed from the current weights "
            "at every step of the phase and only grows, so the trainable set only shrinks; "
            "frozen weights get no gradient and are restored after each step. CGA trainable "
            "fraction: quantized weights still training at the end. The lr schedule is the "
            "run's own cosine (to 10% of peak, or to 1e-5 in the lowlr pair), inside the same 300 steps, not the paper's extra "
            "constant-1e-5 phase.\n")
  return write_part(args.out, "b", "Part B: 2-bit weights, StatsQ versus LSQ, and CGA "
                    "(8-bit LSQ inputs, d_model 128)", body, recs, COMMAND + " --parts=b", SCALE_B)


def _load_c(args, only=frozenset()):
  recs_c = {}
  for width in WIDTHS:
    base = config_lib.apply_overrides(config_lib.Config(), _base(width))
    recs_c[width] = run_variants(base, variants_c(width), args.runs, only=only)
  return recs_c


def _seed_rows(recs_a, recs_c):
  """Per width: eval loss of the unquantized and W8A8 models at seeds 0 and 1, the W8A8
  gap at each seed, and how much the gap moved."""
  nan = float("nan")
  rows = []
  for width, rs in recs_c.items():
    loss = {r.variant.name: r.last("eval/loss") for r in list(recs_a.get(width, [])) + list(rs)}
    fp0, fp1 = loss.get(f"d{width}_fp32", nan), loss.get(f"d{width}_fp32_seed1", nan)
    w80, w81 = loss.get(f"d{width}_w8a8", nan), loss.get(f"d{width}_w8a8_seed1", nan)
    rows.append([f"d_model {width}", fp0, fp1, w80, w81, w80 - fp0, w81 - fp1,
                 abs((w81 - fp1) - (w80 - fp0))])
  return rows


def part_c(args, only):
  recs_c = _load_c(args, only)
  recs_a = {}
  for width in WIDTHS:  # part A's seed-0 runs, loaded (not trained) if present
    base = config_lib.apply_overrides(config_lib.Config(), _base(width))
    recs_a[width] = run_variants(base, variants_a(width), args.runs, only=set())
  body = (markdown_table(["width", "unquantized s0", "unquantized s1", "W8A8 s0", "W8A8 s1",
                          "W8A8 gap s0", "W8A8 gap s1", "gap change (abs)"],
                         _seed_rows(recs_a, recs_c))
          + "\n\nThe levels move together between seeds (data order and init), so the gap is "
            "compared within a seed; its change between seeds, the last column, is the grey "
            "band in part A's right plot.\n")
  return write_part(args.out, "c", "Part C: seed-to-seed spread (seed 1 against part A's seed 0)",
                    body, [r for rs in recs_c.values() for r in rs], COMMAND + " --parts=c",
                    SCALE_A_C)


def main(argv=None) -> int:
  return study_main(argv, name="qat", doc=__doc__, title=TITLE, out=OUT,
                    parts={"a": part_a, "b": part_b, "c": part_c})


if __name__ == "__main__":
  sys.exit(main())

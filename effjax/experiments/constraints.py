"""Weight-constraints study (issue 15; docs/constraints.md). Reruns and rewrites
results/constraints/:

  python -m effjax.experiments.constraints [--parts=a,b] [--only=NAME,...] [--runs=runs/constraints]

Part A (Lipschitz transformers, model.arch=lipschitz, built-in corpus): at two per-matrix
bounds w_max (on every hidden matrix and the readout; logits x LOGIT_SCALE), AdamW + spectral
normalisation, Muon + soft cap and Muon + hard cap, against unconstrained AdamW and Muon and the
standard model; eval loss, the certified Lipschitz bound and the activation bound
against the largest activation seen, and the largest constrained norm over all evals (it must
never exceed w_max). Paper (Newhouse et al. 2025): Muon beats AdamW on the Lipschitz-versus-
accuracy trade-off.
Part B (weight conditioning, standard model): baseline, weight normalisation, weight
conditioning with and without a gain (gradient through E), and with stop-gradient, at the
default lr and 3x it; loss curves and kappa. Paper (Saratchandran et al. 2024): conditioning
allows larger stable learning rates.

EFFJAX_STUDY_SMOKE=1 shrinks every run to a few steps of a tiny model (to check the script end to
end; its numbers are not findings).
"""

from __future__ import annotations

import os
import sys

from effjax import config as config_lib
from effjax.experiments.study import Variant, markdown_table, run_variants, study_main, write_part

OUT = "results/constraints"
TITLE = "Weight constraints study (Lipschitz transformers, weight conditioning)"
COMMAND = "python -m effjax.experiments.constraints"
SMOKE = os.environ.get("EFFJAX_STUDY_SMOKE") == "1"
W_MAXES = (1.0, 2.0)
LRS = (3e-3, 9e-3)


def _base() -> dict:
  if SMOKE:
    return {"model": {"d_model": 32, "n_layers": 2, "n_heads": 4},
            "train": {"steps": 4, "batch_size": 4, "seq_len": 32, "lr": 3e-3, "warmup_steps": 1,
                      "eval_every": 2, "eval_batches": 1, "log_every": 2, "checkpoint_every": 4,
                      "sample_tokens": 0, "plot": False}}
  return {"model": {"d_model": 128, "n_layers": 4, "n_heads": 4},
          "train": {"steps": 400, "batch_size": 16, "seq_len": 128, "lr": 3e-3,
                    "warmup_steps": 40, "eval_every": 100, "eval_batches": 16, "log_every": 10,
                    "checkpoint_every": 200, "sample_tokens": 0, "plot": False}}


SCALE = ("d_model 128, 4 layers, 4 heads, seq 128, batch 16, 400 steps (~0.8M tokens), "
         "byte tokenizer, built-in corpus" if not SMOKE else "SMOKE (not a finding)")


# The paper's setup (docs/constraints.md): unit-RMS embedding rows (the model.arch=lipschitz
# defaults), the readout a constrained matrix like the hidden ones (under Muon with Muon), its
# logits times a fixed scale (an inverse temperature, which multiplies the certified bound).
LOGIT_SCALE = 4.0
ROLES = ("hidden", "expert", "readout")


def _lip(opt: str, method: str = "none", w_max: float = 1.0) -> dict:
  optim = {"name": opt, **({"muon_roles": ROLES} if opt == "muon" else {})}
  return {"model": {"arch": "lipschitz", "output_mult": LOGIT_SCALE}, "optim": optim,
          "constraints": {"method": method, "w_max": w_max, "roles": ROLES}}


def variants_a() -> list[Variant]:
  out = [Variant("std_adamw", {}, "standard model (RMSNorm, SwiGLU), AdamW, no constraints"),
         Variant("lip_adamw_free", _lip("adamw"), "AdamW, unconstrained"),
         Variant("lip_muon_free", _lip("muon"), "Muon, unconstrained")]
  for w in W_MAXES:
    out += [Variant(f"lip_adamw_snorm_w{w:g}", _lip("adamw", "spectral_normalize", w),
                    f"AdamW + spectral normalize, w_max {w:g}"),
            Variant(f"lip_muon_softcap_w{w:g}", _lip("muon", "soft_cap", w),
                    f"Muon + soft cap, w_max {w:g}"),
            Variant(f"lip_muon_hardcap_w{w:g}", _lip("muon", "hard_cap", w),
                    f"Muon + hard cap, w_max {w:g}")]
  return out + _second_seeds(out, ("lip_adamw_snorm_w1", "lip_muon_softcap_w1"))


def _second_seeds(variants: list, names: tuple) -> list[Variant]:
  """Seed-1 repeats of the named variants: the seed-to-seed spread the table reports."""
  return [Variant(f"{v.name}_seed1", {**v.overrides, "seed": 1}, f"{v.label}, seed 1")
          for v in variants if v.name in names]


def _seed_spread(recs, key: str = "eval/loss") -> str:
  """The largest |seed 0 - seed 1| difference of `key` over the repeated variants."""
  by_name = {r.variant.name: r for r in recs}
  gaps = [abs(by_name[n].last(key) - by_name[n[:-len("_seed1")]].last(key))
          for n in by_name if n.endswith("_seed1") and n[:-len("_seed1")] in by_name]
  return (f"Seed-to-seed spread of {key} (seed 0 vs seed 1, largest over the repeated "
          f"variants): {max(gaps):.4f}. A difference below it is not resolved.\n"
          if gaps else "")


def variants_b() -> list[Variant]:
  reparams = (("base", {}, "baseline"),
              ("wn", {"reparam": "weight_norm"}, "weight norm"),
              ("wc", {"reparam": "weight_cond"}, "weight cond, no gain"),
              ("wc_gain", {"reparam": "weight_cond", "cond_gain": True}, "weight cond + gain"),
              ("wc_sg", {"reparam": "weight_cond", "cond_stop_grad": True},
               "weight cond, stop-grad E"))
  out = []
  for lr in LRS:
    for name, c, label in reparams:
      out.append(Variant(f"{name}_lr{lr:g}", {"constraints": c, "train": {"lr": lr}},
                         f"{label}, lr {lr:g}"))
  return out + _second_seeds(out, (f"base_lr{LRS[0]:g}", f"wc_lr{LRS[0]:g}"))


def _max_over_evals(rec, key):
  vals = [v for _, v in rec.series(key)]
  return max(vals) if vals else float("nan")


def _plot(recs, out: str, name: str, key: str = "train/loss") -> str:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
  for r in recs:
    s = r.series(key)
    if s:
      ax.plot(*zip(*s), label=r.variant.name, lw=1)
  ax.set_xlabel("step")
  ax.set_ylabel(key)
  ax.legend(fontsize=6)
  fig.tight_layout()
  path = os.path.join(out, name)
  fig.savefig(path)
  plt.close(fig)
  return path


def part_a(args, only):
  base = config_lib.apply_overrides(config_lib.Config(), _base())
  recs = run_variants(base, variants_a(), args.runs, only=only)
  header = ["variant", "what", "eval loss", "eval bpb", "certified Lipschitz bound (residual)",
            "activation bound", "max activation seen", "max constrained norm (all evals)",
            "w_max"]
  rows = [[r.variant.name, r.variant.label, r.last("eval/loss"), r.last("eval/bpb"),
           r.last("constraints/lipschitz_bound_residual"), r.last("constraints/activation_bound"),
           r.last("constraints/max_activation_norm"),
           _max_over_evals(r, "constraints/max_rms_norm"), r.config.constraints.w_max
           if r.config.constraints.method != "none" else "-"] for r in recs]
  plot = _plot(recs, args.out, "lipschitz_loss.png")
  body = (markdown_table(header, rows) + "\n\n" + _seed_spread(recs)
          + f"\n![train loss]({os.path.basename(plot)})\n")
  return write_part(args.out, "a", "Part A: Lipschitz transformers, AdamW versus Muon at two "
                    "bounds", body, recs, COMMAND + " --parts=a", SCALE)


def part_b(args, only):
  base = config_lib.apply_overrides(config_lib.Config(), _base())
  recs = run_variants(base, variants_b(), args.runs, only=only)
  kappa = lambda r, k: r.last(f"constraints/{k}/up/layer0", "-")
  header = ["variant", "what", "eval loss", "final train loss", "kappa(W) up/layer0",
            "kappa(W~) up/layer0"]
  rows = [[r.variant.name, r.variant.label, r.last("eval/loss"), r.last("train/loss"),
           kappa(r, "kappa"), kappa(r, "kappa_eff")] for r in recs]
  plot = _plot(recs, args.out, "conditioning_loss.png")
  body = (markdown_table(header, rows) + "\n\n" + _seed_spread(recs)
          + f"\n![train loss]({os.path.basename(plot)})\n")
  return write_part(args.out, "b", "Part B: weight conditioning and weight normalisation at two "
                    "learning rates", body, recs, COMMAND + " --parts=b", SCALE)


def main(argv=None) -> int:
  return study_main(argv, name="constraints", doc=__doc__, title=TITLE, out=OUT,
                    parts={"a": part_a, "b": part_b})


if __name__ == "__main__":
  sys.exit(main())

"""MASA study A: attention parameter efficiency (issue 14; docs/masa.md). Reruns and rewrites
results/masa/:

  python -m effjax.experiments.masa [--parts=a,b] [--only=NAME,...] [--runs=runs/masa]

Part A, at an equal attention-parameter budget (MASA-QKVO with S = L/3 keeps a third of the
dense attention parameters): dense, MASA-QKV, MASA-QKVO, low-rank q/k/v/o (rank chosen by
`equal_budget_rank` to match MASA-QKVO; the paper's d/3 keeps two thirds), GQA (MQA: one kv
head, the smallest GQA budget, still above a third: see the budget table), sequential and
repeat-all-over sharing (S full matrix sets); every variant at SEEDS_A.
Part B: MASA-QKVO with S = 2, 4, 6 atoms (more atoms should help; S = 6 = L saves nothing).

EFFJAX_SMOKE=1 shrinks every run to a few steps of a tiny model (to check the script end to
end; never report smoke numbers).
"""

from __future__ import annotations

import os
import sys

from effjax import config as config_lib
from effjax import models
from effjax.experiments.study import (Variant, base_name, markdown_table, run_variants,
                                      seed_stats, study_main, with_seeds, write_part)
from effjax.models import masa

OUT = "results/masa"
SEEDS_A = (0, 1)
SEEDS_B = (0, 1)
TITLE = "MASA study: attention parameter efficiency"
COMMAND = "python -m effjax.experiments.masa"
SMOKE = bool(os.environ.get("EFFJAX_SMOKE"))

BASE = {
    "model": {"d_model": 128, "n_layers": 6, "n_heads": 4, "tie_embeddings": False},
    "train": {"steps": 400, "batch_size": 16, "seq_len": 128, "lr": 3e-3, "warmup_steps": 40,
              "eval_every": 100, "eval_batches": 16, "log_every": 10, "checkpoint_every": 200,
              "sample_tokens": 0, "plot": False},
    "optim": {"b2": 0.95, "grad_clip": 1.0},
}
if SMOKE:
  BASE = {"model": {"d_model": 32, "n_layers": 3, "n_heads": 4, "tie_embeddings": False},
          "train": {"steps": 3, "batch_size": 4, "seq_len": 32, "lr": 3e-3, "warmup_steps": 1,
                    "eval_every": 3, "eval_batches": 1, "log_every": 1, "checkpoint_every": 3,
                    "sample_tokens": 0, "plot": False}}


def _sharing(method: str, **masa_keys) -> dict:
  return {"model": {"attention": {"sharing": method}, "masa": masa_keys}}


def base_config() -> config_lib.Config:
  return config_lib.apply_overrides(config_lib.Config(), BASE)


def equal_budget_rank(config: config_lib.Config, target: int) -> int:
  """The low-rank rank whose attention-parameter count is closest to `target`."""
  dims = models.resolve_dims(config.model, 256)

  def count(rank):
    c = config_lib.apply_overrides(config, {"model.attention.sharing": "lowrank",
                                            "model.masa.rank": rank})
    return masa.attention_param_counts(c.model, dims)["total"]
  return min(range(1, dims.d_model + 1), key=lambda r: abs(count(r) - target))


def attention_budget(config: config_lib.Config) -> dict:
  """masa.attention_param_counts of a (resolved) config, at the byte vocabulary."""
  return masa.attention_param_counts(config.model, models.resolve_dims(config.model, 256))


def variants_a(base: config_lib.Config) -> list[Variant]:
  masa_qkvo = config_lib.apply_overrides(base, _sharing("masa", projections="qkvo"))
  rank = equal_budget_rank(base, attention_budget(masa_qkvo)["total"])
  return [
      Variant("dense", {}, "dense attention"),
      Variant("masa_qkv", _sharing("masa", projections="qkv"), "MASA-QKV, S = L/3 (o dense)"),
      Variant("masa_qkvo", _sharing("masa", projections="qkvo"), "MASA-QKVO, S = L/3"),
      Variant("lowrank", _sharing("lowrank", projections="qkvo", rank=rank),
              f"low-rank q/k/v/o, rank {rank} (equal budget)"),
      Variant("gqa", {"model": {"n_kv_heads": 1}}, "GQA with one kv head (MQA)"),
      Variant("sequential", _sharing("sequential", projections="qkvo"),
              "sequential sharing, L/3 matrix sets (0,0,1,1,..)"),
      Variant("repeat_all_over", _sharing("repeat_all_over", projections="qkvo"),
              "repeat-all-over sharing, L/3 matrix sets (0,1,0,1,..)"),
  ]


EQUAL_BUDGET = ("masa_qkvo", "lowrank", "sequential", "repeat_all_over")


def variants_b(base: config_lib.Config) -> list[Variant]:
  n = base.model.n_layers
  return [Variant(f"masa_qkvo_s{s}", _sharing("masa", projections="qkvo", atoms=s),
                  f"MASA-QKVO, S = {s}") for s in sorted({max(1, n // 3), 2 * n // 3, n})]


def budget_table(base: config_lib.Config, variants: list[Variant]) -> str:
  dense = attention_budget(base)["dense"]
  rows = []
  for v in variants:
    c = attention_budget(config_lib.apply_overrides(base, v.overrides))
    rows.append([v.name, c["total"], c["coef"], f"{c['total'] / dense:.3f}"])
  return markdown_table(["variant", "attention params", "of which MASA coefficients",
                         "fraction of dense"], rows)


def _results(recs, variants) -> tuple[str, dict]:
  by = {}
  for r in recs:
    by.setdefault(base_name(r.variant.name), []).append(r)
  rows = []
  for v in variants:
    rs = by.get(v.name, [])
    if not rs:
      continue
    loss_mean, loss_spread = seed_stats([r.last("eval/loss") for r in rs])
    rows.append([v.name, v.label, len(rs), loss_mean, loss_spread,
                 float(sum(r.last("perf/mfu", float("nan")) for r in rs) / len(rs)),
                 rs[0].info["params_non_embedding"]])
  return markdown_table(["variant", "what", "seeds", "eval loss (mean)", "seed spread",
                         "MFU (mean)", "non-embedding params"], rows), by


def _plot(by: dict, variants, path: str) -> str | None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
  for v in variants:
    for r in by.get(v.name, [])[:1]:
      s = r.series("eval/loss")
      if s:
        ax.plot(*zip(*s), "o-", label=v.name)
  ax.set(xlabel="step", ylabel="eval loss (nats/byte)", title="eval loss, seed 0")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path


def part_a(args, only):
  base = base_config()
  variants = variants_a(base)
  recs = run_variants(base, with_seeds(variants, SEEDS_A), args.runs, only=only)
  table, by = _results(recs, variants)
  plot = _plot(by, variants, os.path.join(args.out, "part_a_eval_loss.png")) if recs else None
  body = (f"### Attention-parameter budget (from the configs)\n\n{budget_table(base, variants)}"
          f"\n\nEqual-budget group: {', '.join(EQUAL_BUDGET)}.\n\n### Results\n\n{table}"
          + (f"\n\n![part A]({os.path.basename(plot)})" if plot else "") + "\n")
  return write_part(args.out, "a", "Part A: MASA and baselines at an equal attention budget",
                    body, recs, COMMAND + " --parts=a", _scale(SEEDS_A))


def part_b(args, only):
  base = base_config()
  variants = variants_b(base)
  recs = run_variants(base, with_seeds(variants, SEEDS_B), args.runs, only=only)
  table, _ = _results(recs, variants)
  body = f"{budget_table(base, variants)}\n\n{table}\n"
  return write_part(args.out, "b", "Part B: MASA-QKVO, more atoms", body, recs,
                    COMMAND + " --parts=b", _scale(SEEDS_B))


def _scale(seeds) -> str:
  m, t = BASE["model"], BASE["train"]
  tokens = t["steps"] * t["batch_size"] * t["seq_len"]
  return (f"{'SMOKE (not results): ' if SMOKE else ''}byte-level LM on the built-in corpus, "
          f"d_model {m['d_model']}, {m['n_layers']} layers, {m['n_heads']} heads, batch "
          f"{t['batch_size']} x {t['seq_len']} tokens, {t['steps']} steps ({tokens / 1e6:.2f}M "
          f"tokens); seeds {', '.join(map(str, seeds))}. Tiny: directional evidence only.")


def main(argv=None) -> int:
  return study_main(argv, name="masa", doc=__doc__, title=TITLE, out=OUT,
                    parts={"a": part_a, "b": part_b})


if __name__ == "__main__":
  sys.exit(main())

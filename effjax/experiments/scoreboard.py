"""The efficiency scoreboard: what each technique buys, as an effective compute multiplier
against a dense scaling law fitted on the same corpus (docs/scoreboard.md).

  python -m effjax.experiments.scoreboard [--scale=1] [--runs=runs/scoreboard]
      [--out=results/scoreboard] [--only=NAME,...] [--skip_stack] [--bootstrap=200]
  python -m effjax.experiments.scoreboard --emit      # one train command per run (a cluster)
  python -m effjax.experiments.scoreboard --report    # tables and plot from finished runs only

Stages, each resumable (a finished run is skipped, an interrupted one resumes):
  1. dense grid: DENSE_SIZES x DENSE_STEPS, then a second seed for the runs on the
     loss-vs-FLOPs lower envelope; fit L(N, D) and the compute-optimal frontier.
  2. techniques: each at the reference size and TECH_STEPS with its recommended settings
     (TECHNIQUES below); a second seed at the larger budget for those whose size-matched
     interval reaches SECOND_SEED_FROM (--emit prints second seeds for all).
  3. stack: the compatible techniques whose size-matched multiplier interval lies above 1 at
     the larger budget (the best of each exclusive group), trained together at TECH_STEPS.
After every run the table (results/scoreboard/README.md) and the plot are rewritten.
--scale=S multiplies every width (rounded to a multiple of 16) and every step budget by S.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time

import numpy as np

from effjax import checks
from effjax import config as config_lib
from effjax import paths
from effjax.experiments import scoreboard_fit as sf
from effjax.experiments.study import (RunRecord, Variant, markdown_table, provenance,
                                      run_variants)

OUT = "results/scoreboard"
COMMAND = "python -m effjax.experiments.scoreboard"
BATCH, SEQ = 16, 128
DENSE_SIZES = ((32, 2), (64, 3), (96, 4), (128, 5))  # (d_model, n_layers); head_dim 16
DENSE_STEPS = (150, 300, 600)
REF_SIZE = (96, 4)
TECH_STEPS = (300, 600)
SEEDS = (0, 1)
SECOND_SEED_FROM = 0.9  # size-matched interval top at which a technique gets a second seed


@dataclasses.dataclass(frozen=True)
class Technique:
  name: str
  label: str
  overrides: object     # callable(ref_overrides: dict, steps: int) -> dict
  group: str = ""       # at most one technique per group goes into the stack
  stackable: bool = True
  bits: int = 0         # QAT weight bits (memory figure)
  note: str = ""        # scale caveat from the paper


def _moe_alf(ref, steps):
  del ref, steps
  return {"model": {"moe": {"num_experts": 8, "top_k": 2, "router": "sigmoid",
                            "balance": "alf", "bias_update_rate": 1e-3}}}


def _moe_sigma(ref, steps):
  del steps
  return {"model": {"moe": {"num_experts": 8, "top_k": 1, "router": "softmax",
                            "balance": "aux", "aux_coef": 1e-2,
                            "expert_dim": _mlp_dim(ref["model"]["d_model"]),
                            "topk_schedule": "0.25:4:0.4"}}}


def _mor(ref, steps):
  del steps  # one unique first and last layer, the middle (L - 2) cycled twice: depth 2L - 2
  return {"model": {"n_layers": ref["model"]["n_layers"] - 1,
                    "mor": {"recursions": 2, "sharing": "middle_cycle", "router": "expert"}}}


def _masa(ref, steps):
  del ref, steps
  return {"model": {"attention": {"sharing": "masa"}, "masa": {"projections": "qkvo"}}}


def _quest(bits):
  return lambda ref, steps: {"quant": {"method": "quest", "weight_bits": bits,
                                       "act_bits": bits, "hadamard": "full"}}


TECHNIQUES = (
    Technique("moe_alf", "MoE 8 experts top-2 (active = dense), ALF-LB", _moe_alf, "ffn"),
    Technique("moe_sigma", "MoE 8 experts top-1, aux 1e-2, progressive sparsification "
              "(k 4 in the first quarter of layers for 40% of steps)", _moe_sigma, "ffn"),
    Technique("mor", "MoR expert-choice, N_r 2, middle-cycle (L-1 unique layers)", _mor, "depth",
              note="the paper's gains are reported above ~360M parameters"),
    Technique("masa", "MASA dictionary-shared Q/K/V/O", _masa, "attention",
              note="the paper's edge shrinks with model size; mostly a parameter saving"),
    Technique("lssa", "softplus attention (LSSA)",
              lambda ref, steps: {"model": {"attention": {"score": "lssa"}}}, "attention_score"),
    Technique("quest_w4a4", "QuEST W4A4 (Hadamard)", _quest(4), "quant", bits=4),
    Technique("quest_w8a8", "QuEST W8A8 (Hadamard)", _quest(8), "quant", bits=8),
    Technique("mup", "muP, lr 3e-3 transferred from width 64, muP weight decay",
              lambda ref, steps: {"model": {"param": "mup", "base_width": 64},
                                  "optim": {"wd_rule": "mup"}}, "param"),
    Technique("muon", "Muon on hidden matrices (lr x 10)",
              lambda ref, steps: {"optim": {"name": "muon"}}, "optimizer"),
    Technique("lipschitz", "Lipschitz architecture, Muon + soft cap (w_max 1) on hidden "
              "matrices and readout, logits x 4 (the paper's setup)",
              lambda ref, steps: {
                  "model": {"arch": "lipschitz", "output_mult": 4.0},
                  "optim": {"name": "muon", "muon_roles": ("hidden", "expert", "readout")},
                  "constraints": {"method": "soft_cap", "w_max": 1.0,
                                  "roles": ("hidden", "expert", "readout")}},
              "optimizer", stackable=False,
              note="a certified Lipschitz bound is the point; compute is what it costs"),
    Technique("weight_cond", "weight conditioning of block linears",
              lambda ref, steps: {"constraints": {"reparam": "weight_cond"}}, "reparam"),
    Technique("reweight", "loss-based sample reweighting (LinUpper, 10% uniform warm-up)",
              lambda ref, steps: {"train": {"reweight": "linupper",
                                            "reweight_warmup": steps // 10}}, "data"),
)


def _mlp_dim(d_model: int) -> int:
  return -(-int(8 * d_model / 3) // 64) * 64


def _width(d: int, scale: float) -> int:
  return max(16, int(round(d * scale / 16)) * 16)


def dense_overrides(d_model: int, n_layers: int, steps: int) -> dict:
  return {"model": {"d_model": d_model, "n_layers": n_layers, "n_heads": d_model // 16},
          "train": {"steps": steps, "batch_size": BATCH, "seq_len": SEQ, "lr": 3e-3,
                    "warmup_steps": max(steps // 10, 1), "eval_every": max(steps // 2, 1),
                    "eval_batches": 16, "log_every": max(min(10, steps // 10), 1),
                    "checkpoint_every": max(steps // 2, 1), "sample_tokens": 0,
                    "plot": False}}


def _merge(a: dict, b: dict) -> dict:
  out = dict(a)
  for k, v in b.items():
    out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
  return out


def _seeded(name: str, overrides: dict, label: str, seed: int) -> Variant:
  if seed == 0:
    return Variant(name, overrides, label)
  return Variant(f"{name}_seed{seed}", {**overrides, "seed": seed}, f"{label}, seed {seed}")


@dataclasses.dataclass
class Plan:
  scale: float = 1.0

  def steps(self, s: int) -> int:
    return max(int(round(s * self.scale)), 2)

  def size(self, d: int, layers: int) -> tuple:
    return _width(d, self.scale), layers

  def ref(self, steps: int) -> dict:
    return dense_overrides(*self.size(*REF_SIZE), self.steps(steps))

  def dense(self, seed: int = 0, only_names=None) -> list[Variant]:
    out = []
    for d, layers in DENSE_SIZES:
      d, layers = self.size(d, layers)
      for s in DENSE_STEPS:
        name = f"dense_d{d}_l{layers}_s{self.steps(s)}"
        if only_names is None or name in only_names:
          out.append(_seeded(name, dense_overrides(d, layers, self.steps(s)),
                             f"dense d_model {d}, {layers} layers, {self.steps(s)} steps", seed))
    return out

  def technique(self, tech: Technique, steps: int, seed: int = 0) -> Variant:
    ref = self.ref(steps)
    over = _merge(ref, tech.overrides(ref, self.steps(steps)))
    return _seeded(f"{tech.name}_s{self.steps(steps)}", over, tech.label, seed)

  def stack(self, techs: list, steps: int, seed: int = 0) -> Variant:
    ref = self.ref(steps)
    over = ref
    for t in techs:
      over = _merge(over, t.overrides(ref, self.steps(steps)))
    return _seeded(f"stack_s{self.steps(steps)}", over,
                   "stack: " + " + ".join(t.name for t in techs), seed)


# ----------------------------------------------------------------------------- reading runs


@dataclasses.dataclass
class Point:
  name: str
  kind: str            # dense | technique name | stack
  seed: int
  loss: float          # final eval loss (clean validation set)
  flops: float         # counted training FLOPs
  tokens: float
  params: float        # non-embedding parameters (active for MoE)
  seconds: float       # wall time of the training steps on this machine
  steps: int


def read_point(workdir, kind: str) -> Point | None:
  wd = paths.as_path(workdir)
  final = paths.read_json(wd / "final_metrics.json")
  if final is None:
    return None
  cfg = paths.read_json(wd / "config.json") or {}
  rows = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()
          if line.strip()]
  seconds, prev = 0.0, 0
  for r in rows:
    if "perf/step_time_s" in r:
      seconds += r["perf/step_time_s"] * (r["step"] - prev)
      prev = r["step"]
  flops = final.get("perf/flops_seen")
  if flops is None:  # runs from before the trainer counted FLOPs: per-token figure x tokens
    flops = final["flops_per_token"] * final["tokens"]
  return Point(wd.name, kind, int(cfg.get("seed", 0)), float(final["eval/loss"]), float(flops),
               float(final["tokens"]), float(final["params_active_non_embedding"]), seconds,
               int(final["step"]))


def envelope(points: list) -> list:
  """Seed-0 dense points on the lower envelope of loss against FLOPs."""
  pts = sorted((p for p in points if p.seed == 0), key=lambda p: p.flops)
  out, best = [], math.inf
  for p in pts:
    if p.loss < best:
      out.append(p)
      best = p.loss
  return out


def _mean_by_name(points: list) -> dict:
  """{base name: [points over seeds]}."""
  out = {}
  for p in points:
    out.setdefault(p.name.split("_seed")[0], []).append(p)
  return out


# ----------------------------------------------------------------------------- report


def fit_dense_points(dense: list, resamples: int):
  groups = _mean_by_name(dense)
  cols = {k: np.array([np.mean([getattr(p, k) for p in g]) for g in groups.values()])
          for k in ("params", "tokens", "loss", "flops")}
  law = sf.fit_dense(cols["params"], cols["tokens"], cols["loss"], cols["flops"])
  boots = sf.bootstrap_laws(cols["params"], cols["tokens"], cols["loss"], cols["flops"], law,
                            resamples)
  return law, boots, cols


def reference(plan: Plan, dense: list) -> tuple | None:
  """(N_ref, FLOPs per token) of the dense model at REF_SIZE, the techniques' base model
  (None until one of its runs has finished)."""
  d, layers = plan.size(*REF_SIZE)
  runs = [p for p in dense if p.name.startswith(f"dense_d{d}_l{layers}_s")]
  if not runs:
    return None
  return runs[0].params, float(np.mean([p.flops / p.tokens for p in runs]))


def reference_points(plan: Plan, dense: list) -> list:
  """The dense reference model's runs at the technique budgets, as rows of the table."""
  d, layers = plan.size(*REF_SIZE)
  names = {f"dense_d{d}_l{layers}_s{plan.steps(s)}" for s in TECH_STEPS}
  return [dataclasses.replace(p, kind="dense reference") for p in dense
          if p.name.split("_seed")[0] in names]


def report(plan: Plan, runs_dir: str, out_dir: str, resamples: int) -> str:
  """Rewrites README.md and scoreboard.png from every finished run; returns the table."""
  dense, techs, stack = collect(plan, runs_dir)
  out = paths.as_path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  lines = [f"# Efficiency scoreboard\n",
           "What each technique buys, as an **effective compute multiplier**: the dense compute "
           "that reaches the technique's eval loss, divided by the technique's counted training "
           "FLOPs (> 1: worth more than it costs). Two dense references: **size-matched** (the "
           "dense model the technique modifies, trained for as many tokens as it needs: the "
           "technique's own effect) and **frontier** (the compute-optimal dense model for that "
           "loss: also charges the choice of model size; compare with the dense reference's "
           "own row). Interval: 95% bootstrap over the dense runs and the technique's seeds. A "
           "multiplier whose interval contains 1 is no measurable effect at this scale.\n"]
  dense_groups = _mean_by_name(dense)
  if len({p.tokens for p in dense}) < 2 or len({p.params for p in dense}) < 2:
    lines.append(f"Dense grid not finished ({len(dense)} runs): no fit yet.\n")
    paths.write_text(out / "README.md", "\n".join(lines))
    return lines[-1]
  law, boots, cols = fit_dense_points(dense, resamples)
  res = sf.residuals(law, cols["params"], cols["tokens"], cols["loss"])
  p = law.params
  lines.append("## Dense law\n")
  if not (0 < p["alpha"] < 2 and 0 < p["beta"] < 2):
    lines.append(f"**Warning:** a fitted exponent lies outside (0, 2) (alpha {p['alpha']:.3f}, "
                 f"beta {p['beta']:.3f}; published fits give 0.3-0.5): at this scale the dense runs "
                 "do not pin down the law, so the multipliers below are not meaningful.\n")
  lines.append(f"L(N, D) = {p['E']:.3f} + {p['A']:.3g} / N^{p['alpha']:.3f} + "
               f"{p['B']:.3g} / D^{p['beta']:.3f}, training FLOPs per token f(N) = "
               f"{law.fpt_c:.3g} N^{law.fpt_k:.3f}; fitted on {len(cols['loss'])} dense "
               f"configurations ({len(dense)} runs, seeds averaged); residuals: RMS "
               f"{float(np.sqrt(np.mean(res ** 2))):.4f}, max |r| {float(np.max(np.abs(res))):.4f}"
               f"; {len(boots)} bootstrap refits.\n")
  rows = []
  for name, g in sorted(dense_groups.items(), key=lambda kv: kv[1][0].flops):
    losses = [q.loss for q in g]
    rows.append([name, f"{g[0].params:.3g}", f"{g[0].tokens:.3g}", f"{g[0].flops:.3g}",
                 float(np.mean(losses)), _spread(losses),
                 float(law.loss(g[0].params, g[0].tokens)), f"{g[0].seconds:.0f}"])
  lines.append(markdown_table(["run", "N (non-emb.)", "tokens", "train FLOPs", "eval loss",
                               "seed spread", "law", "wall s"], rows) + "\n")
  members = paths.read_json(paths.as_path(runs_dir) / "stack.json") or []
  table, mults = technique_table(law, boots, reference_points(plan, dense) + techs + stack,
                                 ref=reference(plan, dense),
                                 stack_note="stack: " + " + ".join(members))
  lines.append("## What each technique buys\n")
  lines.append(table + "\n")
  paths.write_text(out / "README.md", "\n".join(lines) + "\n" + provenance_text(plan, runs_dir))
  paths.write_json(out / "scoreboard.json", {"law": {k: v for k, v in p.items()
                                                     if not k.startswith("_")},
                                             "fpt": [law.fpt_c, law.fpt_k],
                                             "multipliers": mults}, indent=1)
  plot(law, dense, techs + stack, out / "scoreboard.png")
  return table


def _spread(values) -> str:
  return f"{max(values) - min(values):.4f}" if len(values) > 1 else "-"


def technique_table(law, boots, points, ref: tuple | None, stack_note: str = "") -> tuple:
  """Markdown table and {run: multipliers} of the technique (and reference) points: the
  size-matched multiplier (ref=(N_ref, FLOPs per token)) and the frontier one."""
  by_tech = {}
  for q in points:
    by_tech.setdefault(q.name.split("_seed")[0], []).append(q)
  notes = {t.name: t for t in TECHNIQUES}
  rows, mults = [], {}
  order = lambda kv: (kv[1][0].kind != "dense reference", kv[0])
  for name, g in sorted(by_tech.items(), key=order):
    kind = g[0].kind
    losses = [q.loss for q in g]
    flops = float(np.mean([q.flops for q in g]))
    frontier = sf.multiplier(law, losses, flops, boots)
    m = sf.multiplier(law, losses, flops, boots, ref=ref) if ref else frontier
    mults[name] = {"size_matched": dataclasses.asdict(m),
                   "frontier": dataclasses.asdict(frontier)}
    tech = notes.get(kind)
    extra = ""
    if tech is not None and tech.bits:
      n_eff = law.effective_params(float(np.mean(losses)), g[0].tokens)
      extra = (f"N_eff/N {n_eff / g[0].params:.2f}; per weight bit "
               f"{n_eff * 16 / (g[0].params * tech.bits):.2f}x bf16")
    if kind == "stack":
      extra = stack_note
    verdict = m.verdict() + (" (extrapolated)" if m.extrapolated else "")
    rows.append([name, f"{g[0].flops:.3g}", f"{g[0].seconds:.0f}", len(g),
                 float(np.mean(losses)), _spread(losses), f"{m.value:.2f}",
                 f"[{m.lo:.2f}, {m.hi:.2f}]", verdict, f"{frontier.value:.2f}",
                 f"[{frontier.lo:.2f}, {frontier.hi:.2f}]",
                 "; ".join(x for x in (extra, tech.note if tech else "") if x)])
  return markdown_table(["run", "train FLOPs", "wall s", "seeds", "eval loss", "seed spread",
                         "multiplier (size-matched)", "95% interval", "verdict",
                         "multiplier (frontier)", "95% interval", "notes"], rows), mults


def plot(law, dense, points, path) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
  for name, g in _mean_by_name(dense).items():
    ax.scatter([q.flops for q in g], [q.loss for q in g], c="0.5", s=14)
  lo, hi = law.c_range
  c = np.geomspace(lo / 2, hi * 4, 100)
  ax.plot(c, law.frontier(c), "k-", lw=1.2, label="dense frontier (fit)")
  ax.scatter([], [], c="0.5", s=14, label="dense runs")
  kinds = sorted({q.kind for q in points})
  cmap = plt.get_cmap("tab20")
  for name, g in sorted(_mean_by_name(points).items()):
    color = cmap(kinds.index(g[0].kind) % 20)
    ax.scatter([q.flops for q in g], [q.loss for q in g], s=30, color=color, marker="D",
               label=g[0].kind if name == min(n for n, h in _mean_by_name(points).items()
                                               if h[0].kind == g[0].kind) else None)
  ax.set_xscale("log")
  ax.set_xlabel("training FLOPs (counted)")
  ax.set_ylabel("eval loss (built-in corpus, validation)")
  ax.legend(fontsize=6, ncol=2)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  paths.save_figure(fig, path)
  plt.close(fig)


def provenance_text(plan: Plan, runs_dir: str) -> str:
  scale = (f"byte-level LMs on the built-in corpus, batch {BATCH} x {SEQ} tokens; dense "
           f"d_model x layers {[plan.size(*s) for s in DENSE_SIZES]} at "
           f"{[plan.steps(s) for s in DENSE_STEPS]} steps; techniques at "
           f"{plan.size(*REF_SIZE)} and {[plan.steps(s) for s in TECH_STEPS]} steps; fp32 on "
           "CPU. Tiny: directional evidence only.")
  records = []
  wd = paths.as_path(runs_dir)
  for d in sorted(wd.iterdir()) if wd.exists() else []:
    info = paths.read_json(d / "run_info.json") if d.is_dir() else None
    if info is not None:
      records.append(RunRecord(Variant(d.name, {}), str(d), None, [], info))
  return "## Provenance\n\n" + provenance(records, COMMAND + (
      f" --scale={plan.scale:g}" if plan.scale != 1 else ""), scale) + "\n"


# ----------------------------------------------------------------------------- driver


def collect(plan: Plan, runs_dir: str) -> tuple:
  """(dense, technique, stack) points of every finished run under runs_dir."""
  wd = paths.as_path(runs_dir)
  dense, techs, stack = [], [], []
  names = {t.name for t in TECHNIQUES}
  if not wd.exists():
    return dense, techs, stack
  for d in sorted(wd.iterdir()):
    base = d.name.split("_seed")[0]
    kind = base.rsplit("_s", 1)[0]
    if base.startswith("dense_"):
      target, kind = dense, "dense"
    elif kind == "stack":
      target = stack
    elif kind in names:
      target = techs
    else:
      continue
    p = read_point(d, kind)
    if p is not None:
      target.append(p)
  return dense, techs, stack


def stack_members(plan: Plan, runs_dir: str, resamples: int) -> list:
  """The techniques whose size-matched multiplier interval lies above 1 at the larger budget,
  best per group, that validate together."""
  dense, techs, _ = collect(plan, runs_dir)
  law, boots, _ = fit_dense_points(dense, resamples)
  ref = reference(plan, dense)
  big = f"_s{plan.steps(TECH_STEPS[-1])}"
  by = _mean_by_name([t for t in techs if t.name.split("_seed")[0].endswith(big)])
  best = {}
  for t in TECHNIQUES:
    g = by.get(t.name + big)
    if not g or not t.stackable:
      continue
    m = sf.multiplier(law, [q.loss for q in g], float(np.mean([q.flops for q in g])), boots,
                      ref=ref)
    if m.lo > 1.0 and (t.group not in best or m.value > best[t.group][1]):
      best[t.group] = (t, m.value)
  members = []
  for t, _ in sorted(best.values(), key=lambda tm: -tm[1]):
    try:
      checks.validate(config_lib.apply_overrides(
          config_lib.Config(), plan.stack(members + [t], TECH_STEPS[-1]).overrides), 1)
      members.append(t)
    except (config_lib.ConfigError, ValueError) as e:
      print(f"[scoreboard] stack: {t.name} left out ({e})", file=sys.stderr)
  return members


def second_seed_techniques(plan: Plan, runs_dir: str, resamples: int) -> list:
  """The techniques whose size-matched interval at the larger budget reaches SECOND_SEED_FROM
  (a second seed could move their verdict; one clearly below it needs none on a 2-core CPU).
  Every technique while the dense law cannot be fitted yet."""
  dense, techs, _ = collect(plan, runs_dir)
  ref = reference(plan, dense)
  if ref is None or len({p.tokens for p in dense}) < 2 or len({p.params for p in dense}) < 2:
    return list(TECHNIQUES)
  law, boots, _ = fit_dense_points(dense, resamples)
  big = f"_s{plan.steps(TECH_STEPS[-1])}"
  by = _mean_by_name(techs)
  out = []
  for t in TECHNIQUES:
    g = by.get(t.name + big)
    if not g or sf.multiplier(law, [q.loss for q in g], float(np.mean([q.flops for q in g])),
                              boots, ref=ref).hi >= SECOND_SEED_FROM:
      out.append(t)
  return out


def all_variants(plan: Plan, runs_dir: str, resamples: int, skip_stack: bool):
  """Yields (stage, variant) in order; later stages read earlier results."""
  for v in plan.dense():
    yield "dense", v
  dense, _, _ = collect(plan, runs_dir)
  for p in envelope(dense):
    yield "dense (second seed, frontier)", plan.dense(seed=1, only_names={p.name})[0]
  for steps in TECH_STEPS:
    for t in TECHNIQUES:
      yield "technique", plan.technique(t, steps)
  for t in second_seed_techniques(plan, runs_dir, resamples):
    yield "technique (second seed)", plan.technique(t, TECH_STEPS[-1], seed=1)
  if skip_stack:
    return
  members = stack_members(plan, runs_dir, resamples)
  if not members:
    print("[scoreboard] stack: no technique's interval lies above 1; nothing to stack",
          file=sys.stderr)
    return
  paths.write_json(paths.as_path(runs_dir) / "stack.json", [t.name for t in members])
  for steps in TECH_STEPS:
    yield "stack", plan.stack(members, steps)
  yield "stack (second seed)", plan.stack(members, TECH_STEPS[-1], seed=1)


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flat(v, key + "."))
    else:
      out[key] = ",".join(map(str, v)) if isinstance(v, (list, tuple)) else v
  return out


def emit(plan: Plan, runs_dir: str) -> int:
  """Prints one `python -m effjax.train` command per stage-1 and stage-2 run (the frontier
  seeds and the stack depend on results: rerun --emit after those finish)."""
  variants = plan.dense() + [plan.technique(t, s) for s in TECH_STEPS for t in TECHNIQUES]
  variants += [plan.technique(t, TECH_STEPS[-1], seed=1) for t in TECHNIQUES]
  dense, _, _ = collect(plan, runs_dir)
  variants += [plan.dense(seed=1, only_names={p.name})[0] for p in envelope(dense)]
  for v in variants:
    args = " ".join(f"--config.{k}={v_}" for k, v_ in _flat(v.overrides).items())
    print(f"python -m effjax.train --workdir={runs_dir}/{v.name} {args}")
  return 0


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--scale", type=float, default=1.0)
  parser.add_argument("--runs", default="runs/scoreboard")
  parser.add_argument("--out", default=OUT)
  parser.add_argument("--only", default="", help="comma-separated run names to (re)run")
  parser.add_argument("--bootstrap", type=int, default=200)
  parser.add_argument("--skip_stack", action="store_true")
  parser.add_argument("--emit", action="store_true")
  parser.add_argument("--report", action="store_true")
  args = parser.parse_args(argv)
  if args.scale <= 0:
    parser.error(f"--scale must be > 0; got {args.scale}")
  plan = Plan(args.scale)
  if args.emit:
    return emit(plan, args.runs)
  if not args.report:
    only = set(args.only.split(",")) if args.only else None
    base = config_lib.Config()
    t0 = time.time()
    for i, (stage, v) in enumerate(all_variants(plan, args.runs, args.bootstrap,
                                                args.skip_stack)):
      if only is not None and v.name not in only:
        continue
      done = paths.read_json(paths.as_path(args.runs) / v.name / "final_metrics.json")
      if done is not None:
        continue
      print(f"[scoreboard] run {i + 1} ({stage}): {v.name}, {time.time() - t0:.0f}s so far",
            file=sys.stderr, flush=True)
      run_variants(base, [v], args.runs)
      report(plan, args.runs, args.out, args.bootstrap)
  print(report(plan, args.runs, args.out, args.bootstrap))
  return 0


if __name__ == "__main__":
  sys.exit(main())

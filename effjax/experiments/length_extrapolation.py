"""Study B: softplus attention length extrapolation (issue 14; docs/attention.md, docs/masa.md).
Reruns and rewrites results/length_extrapolation/:

  python -m effjax.experiments.length_extrapolation [--only=NAME,...]
      [--runs=runs/length_extrapolation]

Every model trains at TRAIN_LEN tokens (no document mask: positions 0..TRAIN_LEN-1 every
step): softmax, softmax + QK-norm + log-n scaling, LSSA, LSSAR (p = 15) trained in; the LSSA
run is also evaluated with LSSAR re-weighting (model.attention.eval_score=lssar, the
inference-only mode). Each is evaluated at 1x, 2x, 4x, 8x TRAIN_LEN on the same validation
windows (EVAL_WINDOWS windows of 8 x TRAIN_LEN + 1 tokens; length T uses each window's first
T + 1 tokens), with the query-chunked reference (model.attention.query_chunk) so memory grows
linearly with length (the log-n baseline has no chunked path: full score matrix). Results:
mean next-token loss (nats/byte) per evaluation length, a table and a plot.

Paper (GPT-2 124M + RoPE, trained at 1K, eval at 1K/2K/4K/8K): softmax 3.19/4.17/5.45/6.28,
LSSA 3.19/4.13/5.30/5.94, LSSAR p = 15 3.19/3.19/3.23/3.32.

EFFJAX_SMOKE=1 shrinks every run to a few steps of a tiny model (to check the script end to
end; never report smoke numbers).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from effjax import checks
from effjax import config as config_lib
from effjax import models
from effjax.experiments.study import (Variant, base_name, markdown_table, run_variants, seed_stats,
                                      study_main, with_seeds, write_part)

OUT = "results/length_extrapolation"
TITLE = "Softplus attention (LSSA / LSSAR): length extrapolation"
COMMAND = "python -m effjax.experiments.length_extrapolation"
SMOKE = bool(os.environ.get("EFFJAX_SMOKE"))
TRAIN_LEN = 32 if SMOKE else 128
FACTORS = (1, 2, 4, 8)
EVAL_WINDOWS = 2 if SMOKE else 16
SEEDS = (0,) if SMOKE else (0, 1)
QUERY_CHUNK = 16 if SMOKE else 128

BASE = {
    "model": {"d_model": 128, "n_layers": 4, "n_heads": 4, "tie_embeddings": False,
              "attention": {"doc_mask": False}},
    "train": {"steps": 600, "batch_size": 16, "seq_len": TRAIN_LEN, "lr": 3e-3,
              "warmup_steps": 60, "eval_every": 200, "eval_batches": 16, "log_every": 20,
              "checkpoint_every": 300, "sample_tokens": 0, "plot": False},
    "optim": {"b2": 0.95, "grad_clip": 1.0},
}
if SMOKE:
  BASE = {"model": {"d_model": 32, "n_layers": 2, "n_heads": 4, "tie_embeddings": False,
                    "attention": {"doc_mask": False}},
          "train": {"steps": 3, "batch_size": 4, "seq_len": TRAIN_LEN, "lr": 3e-3,
                    "warmup_steps": 1, "eval_every": 3, "eval_batches": 1, "log_every": 1,
                    "checkpoint_every": 3, "sample_tokens": 0, "plot": False}}


def _attn(**keys) -> dict:
  return {"model": {"attention": keys}}


VARIANTS = [
    Variant("softmax", {}, "softmax"),
    Variant("softmax_qknorm_logn", _attn(qk_norm=True, log_n_scale=True),
            "softmax + QK-norm + log-n scaling"),
    Variant("lssa", _attn(score="lssa"), "LSSA"),
    Variant("lssar_p15", _attn(score="lssar", lssar_p=15.0), "LSSAR p = 15, trained in"),
]
# Evaluated, not trained: (name, trained variant, eval score, label)
EVAL_ONLY = [("lssa_eval_lssar", "lssa", "lssar", "LSSA trained, LSSAR p = 15 at evaluation")]


def eval_windows(val_tokens: np.ndarray, n: int, length: int) -> np.ndarray:
  """n windows of `length` tokens, evenly spaced over the validation stream."""
  if val_tokens.size < n * length:
    raise ValueError(f"the validation split has {val_tokens.size} tokens, fewer than "
                     f"{n} windows x {length}")
  starts = np.linspace(0, val_tokens.size - length, n).astype(int)
  return np.stack([val_tokens[s:s + length] for s in starts]).astype(np.int32)


def _final_params(config: config_lib.Config, workdir: str, vocab: int):
  from effjax.parallel import make_mesh, sharding  # pylint: disable=g-import-not-at-top
  from effjax.train.checkpoint import Checkpointer  # pylint: disable=g-import-not-at-top
  from effjax.train.plan import plan_state  # pylint: disable=g-import-not-at-top
  mesh = make_mesh(config.mesh, jax.devices()[:1])
  plan = plan_state(config, vocab, mesh, sharding.rules_for(config.mesh))
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=10**6)
  state = ckpt.restore(ckpt.latest_step(), plan.abstract())
  ckpt.close()
  return state.params, state.buffers


def length_losses(config: config_lib.Config, params, buffers, windows: np.ndarray,
                  vocab: int, score: str | None = None) -> dict[int, float]:
  """{eval length: mean next-token loss} on each window's first length + 1 tokens; the model
  built with the query-chunked reference (and `score` in place of the trained score)."""
  att = dataclasses.replace(config.model.attention, impl="xla", query_chunk=QUERY_CHUNK,
                            **({"score": score} if score else {}))
  cfg = dataclasses.replace(config, model=dataclasses.replace(config.model, attention=att))
  model = models.build(cfg, vocab, batch_groups=1)

  @jax.jit
  def nll(ids_BxT):
    logits, _ = model.apply(params, buffers, ids_BxT[:, :-1])
    logp = jax.nn.log_softmax(logits, -1)
    return -jnp.mean(jnp.take_along_axis(logp, ids_BxT[:, 1:, None], -1))

  out = {}
  for f in FACTORS:
    t = f * TRAIN_LEN
    out[t] = float(np.mean([nll(jnp.asarray(windows[i:i + 1, :t + 1]))
                            for i in range(len(windows))]))
  return out


def _plot(results: dict, labels: dict, path: str) -> str:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
  for name, losses in results.items():
    lengths = sorted(int(t) for t in losses)
    ax.plot(lengths, [losses[str(t)] for t in lengths], "o-", label=labels[name])
  ax.set(xscale="log", xlabel="evaluation length (tokens)", ylabel="eval loss (nats/byte)",
         title=f"trained at {TRAIN_LEN} tokens")
  ax.set_xticks([f * TRAIN_LEN for f in FACTORS], [str(f * TRAIN_LEN) for f in FACTORS])
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path


def part_a(args, only):
  from effjax.train.trainer import load_data  # pylint: disable=g-import-not-at-top
  base = config_lib.apply_overrides(config_lib.Config(), BASE)
  recs = run_variants(base, with_seeds(VARIANTS, SEEDS), args.runs, only=only)
  data = load_data(base)
  vocab = data.tokenizer.vocab_size
  windows = eval_windows(np.asarray(data.corpus.val_tokens), EVAL_WINDOWS,
                         FACTORS[-1] * TRAIN_LEN + 1)
  by = {r.variant.name: r for r in recs}
  jobs = [(r.variant.name, r.variant.name, None, r.variant.label) for r in recs]
  for seed in SEEDS[1:]:
    jobs += [(f"{n}_seed{seed}", f"{src}_seed{seed}", s, f"{label}, seed {seed}")
             for n, src, s, label in EVAL_ONLY]
  jobs += [(n, src, s, label) for n, src, s, label in EVAL_ONLY]
  jobs = [j for j in jobs if j[1] in by]
  results, labels = {}, {}
  for name, src, score, label in jobs:
    rec = by[src]
    cache = os.path.join(rec.workdir, f"length_eval_{name}.json")
    if os.path.exists(cache) and (only is None or src not in only):
      with open(cache) as f:
        results[name] = json.load(f)
    else:
      config = checks.validate(rec.config, 1)
      params, buffers = _final_params(config, rec.workdir, vocab)
      losses = length_losses(config, params, buffers, windows, vocab, score)
      results[name] = {str(t): v for t, v in losses.items()}
      with open(cache, "w") as f:
        json.dump(results[name], f)
    labels[name] = label
    print(f"[length_extrapolation] {name}: {results[name]}", file=sys.stderr)
  lengths = [f * TRAIN_LEN for f in FACTORS]
  names = list(dict.fromkeys(base_name(n) for n in results))   # variants, in run order
  means, rows = {}, []
  for name in names:
    per_seed = [n for n in results if base_name(n) == name]
    stats = [seed_stats([results[n][str(t)] for n in per_seed]) for t in lengths]
    means[name] = {str(t): m for t, (m, _) in zip(lengths, stats)}
    rows.append([name, labels[name], len(per_seed)] + [m for m, _ in stats]
                + [max(sp for _, sp in stats)])
  table = markdown_table(["variant", "what", "seeds"] + [f"loss @ {t} (mean)" for t in lengths]
                         + ["largest seed spread"], rows)
  plot = (_plot(means, labels, os.path.join(args.out, "loss_vs_length.png"))
          if results else None)
  body = (f"{table}\n\n" + (f"![loss vs length]({os.path.basename(plot)})\n\n" if plot else "")
          + f"Evaluation: {EVAL_WINDOWS} validation windows of {FACTORS[-1] * TRAIN_LEN + 1} "
          f"tokens, the same for every length and variant; length T scores the T next-token "
          f"predictions of each window's first T + 1 tokens, positions 0..T-1.\n")
  m, t = BASE["model"], BASE["train"]
  scale = (f"{'SMOKE (not results): ' if SMOKE else ''}byte-level LM on the built-in corpus, "
           f"d_model {m['d_model']}, {m['n_layers']} layers, trained at {TRAIN_LEN} tokens "
           f"without the document mask, batch {t['batch_size']}, {t['steps']} steps; seeds "
           f"{', '.join(map(str, SEEDS))}.")
  return write_part(args.out, "a", f"Loss vs evaluation length (trained at {TRAIN_LEN})", body,
                    recs, COMMAND, scale)


def main(argv=None) -> int:
  return study_main(argv, name="length_extrapolation", doc=__doc__, title=TITLE, out=OUT,
                    parts={"a": part_a})


if __name__ == "__main__":
  sys.exit(main())

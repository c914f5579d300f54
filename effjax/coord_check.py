"""muP coordinate check (Yang et al. 2022, Tensor Programs V, section 7 / Fig. 5).

  python -m effjax.coord_check --config=configs/tiny.py --widths=64,128,256,512 --steps=5 \\
      --out=DIR [--lr=1e-2] [--grow=heads --head-dim=16 | --grow=head_dim --heads=4]
      [--config.key=value ...]

For SP and muP: trains each width for a few Adam steps at a fixed, large lr on the same
seed and data, and records the mean |activation| of every module output (embedding,
attention logits, attention output, MLP output, residual stream, output logits)
before each update. Writes DIR/coord_check.json (values per width per step, and the
fitted log-log slope against width at the last step) and DIR/coord_check.png. Under
muP the curves are flat (slope ~ 0); growth with width (usually in the logits) marks
standard parameterisation, or a muP bug. --grow=heads: heads grow with width at a fixed head_dim; --grow=head_dim:
head_dim grows at a fixed number of heads, which exposes attention-scale bugs (1/sqrt(d_head)
instead of alpha/d_head makes the attention logits grow). Width multiplier
m = width / widths[0]; the readout starts at zero in both parameterisations so the
logits measure the update alone. MoE (model.moe.*) is kept from the config.
"""

from __future__ import annotations

import argparse
import re
import sys

import jax
import numpy as np

from effjax import checks
from effjax import config as config_lib
from effjax import data as data_lib
from effjax import paths
from effjax.parallel import make_mesh, sharding
from effjax.resolve import resolve
from effjax.train import trainer
from effjax.train.plan import plan_state

MODULES = ("embed", "attn_logits", "attn_out", "mlp_out", "residual", "logits")


def activation_trace(config: config_lib.Config, batches: list[dict], tokenizer_vocab: int) -> dict:
  """{module: [mean |act| per step]} (per-layer values averaged over layers), from the
  trainer's step (effjax/train/plan.py) with the probes on."""
  mesh = make_mesh(config.mesh)
  plan = plan_state(resolve(config, mesh.devices.flat), tokenizer_vocab, mesh,
                    sharding.rules_for(config.mesh))
  state = plan.init()
  batches = [{k: jax.device_put(v, plan.batch_sharding) for k, v in b.items()} for b in batches]
  step, _ = plan.compile_step(state, batches[0], phase=(("probe", True),))
  trace: dict[str, list[float]] = {m: [] for m in MODULES}
  for batch in batches:
    state, metrics = step(state, batch)
    metrics = jax.device_get(metrics)
    for m in MODULES:
      vals = [float(v) for k, v in metrics.items()
              if re.fullmatch(rf"act/{m}(/layer\d+)?", k)]
      trace[m].append(float(np.mean(vals)))
  return trace


def loglog_slope(widths, values) -> float:
  return float(np.polyfit(np.log2(widths), np.log2(np.maximum(values, 1e-30)), 1)[0])


def train_batches(config: config_lib.Config, steps: int) -> tuple[list[dict], int]:
  """`steps` training batches of the config's data (data.corpus or a data.sources mixture,
  loaded as the trainer loads it) and the tokenizer's vocabulary size."""
  data = trainer.load_data(config)
  it = data_lib.make_data_iterator(data.corpus, seq_len=config.train.seq_len,
                                   batch_size=config.train.batch_size, seed=config.seed,
                                   eos_id=data.tokenizer.eos_id)
  batches = [{k: jax.numpy.asarray(v) for k, v in next(it).items()} for _ in range(steps)]
  return batches, data.tokenizer.vocab_size


def run(base: config_lib.Config, widths: list[int], steps: int, lr: float, head_dim: int = 16,
        verbose: bool = True, grow: str = "heads", heads: int = 4) -> dict:
  """grow='heads': n_heads = width // head_dim; grow='head_dim': n_heads = heads,
  head_dim = width // heads."""
  batches, vocab = train_batches(base, steps)
  out = {"widths": widths, "steps": steps, "lr": lr, "grow": grow,
         **({"head_dim": head_dim} if grow == "heads" else {"heads": heads})}
  for param in ("sp", "mup"):
    per_width = []
    for w in widths:
      cfg = config_lib.apply_overrides(base, {
          "model": {"d_model": w, "n_heads": w // head_dim if grow == "heads" else heads,
                    "n_kv_heads": 0, "head_dim": 0, "mlp_dim": 0, "param": param,
                    "base_width": widths[0], "zero_init_readout": True},
          "train": {"lr": lr, "warmup_steps": 0, "schedule": "constant", "steps": steps,
                    "grad_accum": 1},
          "optim": {"weight_decay": 0.0, "grad_clip": 0.0}})
      per_width.append(activation_trace(checks.validate(cfg), batches, vocab))
      if verbose:
        print(f"[coord_check] {param} width {w}: logits "
              f"{per_width[-1]['logits'][-1]:.3g}, attn_logits "
              f"{per_width[-1]['attn_logits'][-1]:.3g}", file=sys.stderr, flush=True)
    out[param] = {m: {"values": [pw[m] for pw in per_width],
                      "slope": loglog_slope(widths, [pw[m][-1] for pw in per_width])}
                  for m in MODULES}
  return out


def plot(result: dict, path) -> str:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  widths = result["widths"]
  fig, axes = plt.subplots(2, len(MODULES), figsize=(3 * len(MODULES), 5.6), dpi=100,
                           sharex=True)
  cmap = plt.get_cmap("viridis")
  for row, param in enumerate(("sp", "mup")):
    for col, m in enumerate(MODULES):
      ax = axes[row, col]
      values = np.asarray(result[param][m]["values"])  # [width, step]
      for s in range(values.shape[1]):
        ax.plot(widths, values[:, s], "o-", ms=3, color=cmap(s / max(values.shape[1] - 1, 1)),
                label=f"step {s + 1}")
      ax.set_xscale("log", base=2)
      ax.set_yscale("log")
      ax.set_title(f"{param.upper()} {m}\nslope {result[param][m]['slope']:+.2f}", fontsize=9)
      if row == 1:
        ax.set_xlabel("width")
      if col == 0:
        ax.set_ylabel("mean |activation|")
  axes[0, 0].legend(fontsize=6)
  fig.tight_layout()
  path = paths.save_figure(fig, path)
  plt.close(fig)
  return path


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--widths", default="64,128,256,512")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--lr", type=float, default=1e-2)
  parser.add_argument("--grow", choices=("heads", "head_dim"), default="heads")
  parser.add_argument("--head-dim", type=int, default=16, help="--grow=heads: fixed head dim")
  parser.add_argument("--heads", type=int, default=4, help="--grow=head_dim: fixed head count")
  parser.add_argument("--out", required=True)
  args, rest = parser.parse_known_args(argv)
  try:
    base, unknown = checks.load(rest)
    if unknown:
      raise config_lib.ConfigError(f"unknown arguments {unknown}")
    widths = [int(w) for w in args.widths.split(",")]
    unit, name = ((args.head_dim, "--head-dim") if args.grow == "heads"
                  else (args.heads, "--heads"))
    bad = [w for w in widths if w % unit]
    if bad:
      raise config_lib.ConfigError(f"--widths {bad} are not multiples of {name} {unit}")
  except (config_lib.ConfigError, ValueError) as e:
    print(f"coord_check: {e}", file=sys.stderr)
    return 2
  result = run(base, widths, args.steps, args.lr, args.head_dim, grow=args.grow,
               heads=args.heads)
  out = paths.as_path(args.out)  # a local folder, file:// or a cloud URL
  out.mkdir(parents=True, exist_ok=True)
  paths.write_json(out / "coord_check.json", result, indent=1)
  path = plot(result, out / "coord_check.png")
  print("module        SP slope   muP slope")
  for m in MODULES:
    print(f"{m:12s} {result['sp'][m]['slope']:+9.2f} {result['mup'][m]['slope']:+11.2f}")
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""Compare runs: final metrics, size, compute, speed and config differences; overlay plot.

  python -m effjax.compare runs/a runs/b [runs/c ...] [--plot=compare.png] [--metric=eval/loss]

Prints two markdown tables: per run the step, final train/eval loss and bpb, parameters
(total and active non-embedding), FLOPs per token, tokens, total training FLOPs (FLOPs per
token x tokens) and the median tokens/s; then every config key whose value differs between
the runs. Writes a figure of --metric against steps and against training FLOPs, one line per
run (--plot='' for none). Unfinished runs are read from their metrics.jsonl so far. Workdirs
may be local or cloud URLs (effjax/paths.py). Exit codes: 0 done, 2 a workdir without a run.
"""

from __future__ import annotations

import argparse
import statistics
import sys

from effjax import paths
from effjax.train.metrics import read_metrics

USAGE = __doc__
METRICS = ("train/loss", "eval/loss", "eval/bpb")


def _flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[prefix + k] = v
  return out


def load_summary(workdir: str) -> dict:
  """What the tables and the plot need from one workdir (ValueError if it holds no run)."""
  wd = paths.as_path(workdir)
  config = paths.read_json(wd / "config.json")
  rows = read_metrics(wd / "metrics.jsonl")
  if config is None or not rows:
    raise ValueError(f"{workdir} holds no run (config.json and metrics.jsonl are needed)")
  info = paths.read_json(wd / "run_info.json", default={})
  final = paths.read_json(wd / "final_metrics.json")
  last = {}
  for row in rows:
    last.update(row)
  tokens_per_step = config["train"]["batch_size"] * config["train"]["seq_len"]
  step = (final or last).get("step", 0)
  tps = [r["perf/tokens_per_sec"] for r in rows if isinstance(r.get("perf/tokens_per_sec"), float)]
  fpt = info.get("flops_per_token")
  summary = {
      "run": str(workdir), "finished": final is not None,
      "step": step, **{k: (final or last).get(k) for k in METRICS},
      "params": info.get("params_total"),
      "active_params": info.get("params_active_non_embedding"),
      "flops_per_token": fpt, "tokens": step * tokens_per_step,
      "train_flops": fpt * step * tokens_per_step if fpt else None,
      "tokens_per_sec": statistics.median(tps[1:] or tps) if tps else None,
  }
  return {"summary": summary, "config": _flatten(config), "rows": rows,
          "tokens_per_step": tokens_per_step}


def config_differences(configs: list[dict]) -> dict:
  """{key: [value per run]} for keys whose values are not all equal."""
  keys = sorted(set().union(*configs))
  return {k: [c.get(k) for c in configs] for k in keys
          if any(c.get(k) != configs[0].get(k) for c in configs)}


def _fmt(v) -> str:
  if v is None:
    return "-"
  if isinstance(v, bool):
    return str(v).lower()
  if isinstance(v, float):
    return f"{v:.4g}" if abs(v) >= 1e4 or abs(v) < 1e-3 else f"{v:.4f}"
  if isinstance(v, int) and abs(v) >= 10000:
    return f"{v:.3g}"
  return str(v)


def markdown(header: list[str], rows: list[list]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  return "\n".join(lines + ["| " + " | ".join(_fmt(x) for x in row) + " |" for row in rows])


def tables(runs: list[dict]) -> str:
  cols = ["run", "step", *METRICS, "params", "active_params", "flops_per_token", "tokens",
          "train_flops", "tokens_per_sec"]
  main = markdown(cols, [[r["summary"][c] for c in cols] for r in runs])
  diffs = config_differences([r["config"] for r in runs])
  diff = (markdown(["config key", *(r["summary"]["run"] for r in runs)],
                   [[k, *v] for k, v in diffs.items()]) if diffs
          else "(the runs' configs are identical)")
  return main + "\n\n" + diff


def plot(runs: list[dict], path, metric: str = "eval/loss") -> str | None:
  """--metric against steps and against training FLOPs, one line per run."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (ax_steps, ax_flops) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
  plotted = False
  for r in runs:
    pts = [(row["step"], row[metric]) for row in r["rows"]
           if isinstance(row.get(metric), (int, float))]
    if not pts:
      continue
    steps, values = zip(*pts)
    label = r["summary"]["run"]
    ax_steps.plot(steps, values, "o-", markersize=3, label=label)
    fpt = r["summary"]["flops_per_token"]
    if fpt:
      ax_flops.plot([s * r["tokens_per_step"] * fpt for s in steps], values, "o-", markersize=3,
                    label=label)
    plotted = True
  if not plotted:
    plt.close(fig)
    return None
  ax_steps.set_xlabel("step")
  ax_flops.set_xlabel("training FLOPs (FLOPs/token x tokens)")
  ax_flops.set_xscale("log")
  for ax in (ax_steps, ax_flops):
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  out = paths.save_figure(fig, path)
  plt.close(fig)
  return out


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  p = argparse.ArgumentParser(prog="python -m effjax.compare", description=USAGE,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("workdirs", nargs="+")
  p.add_argument("--plot", default="compare.png", help="'' for no figure")
  p.add_argument("--metric", default="eval/loss")
  args = p.parse_args(argv)
  try:
    runs = [load_summary(w) for w in args.workdirs]
  except ValueError as e:
    print(f"effjax: {e}", file=sys.stderr)
    return 2
  print(tables(runs))
  if args.plot:
    out = plot(runs, args.plot, args.metric)
    print(f"\nplot: {out}" if out else f"\n(no {args.metric} values to plot)")
  return 0


if __name__ == "__main__":
  sys.exit(main())

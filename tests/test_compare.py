"""`python -m effjax.compare` (issue 20): final metrics, size, compute, speed and config
differences of several runs, and the overlay plot."""

import json

from effjax import compare
from effjax import config as C


def _run(path, *, lr, steps, finished=True, fpt=1000.0):
  """A workdir as the trainer leaves it (config.json, run_info, metrics, final metrics)."""
  path.mkdir()
  cfg = C.to_dict(C.apply_overrides(C.Config(), {"train.lr": lr, "train.batch_size": 2,
                                                 "train.seq_len": 8}))
  (path / "config.json").write_text(json.dumps(cfg))
  (path / "run_info.json").write_text(json.dumps(
      {"params_total": 5000, "params_active_non_embedding": 3000, "flops_per_token": fpt}))
  rows = [{"step": s, "train/loss": 5.0 - s * lr, "perf/tokens_per_sec": 100.0 * s}
          for s in range(1, steps + 1)]
  rows += [{"step": steps, "eval/loss": 4.0 - lr, "eval/bpb": 6.0}]
  (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  if finished:
    (path / "final_metrics.json").write_text(json.dumps(
        {"step": steps, "train/loss": 5.0 - steps * lr, "eval/loss": 4.0 - lr, "eval/bpb": 6.0}))
  return str(path)


def test_compare_tables_and_plot(tmp_path, capsys):
  a = _run(tmp_path / "a", lr=0.01, steps=4)
  b = _run(tmp_path / "b", lr=0.02, steps=6, finished=False, fpt=2000.0)
  png = tmp_path / "cmp.png"
  assert compare.main([a, b, f"--plot={png}"]) == 0
  out = capsys.readouterr().out
  runs = [compare.load_summary(w)["summary"] for w in (a, b)]
  assert runs[0]["tokens"] == 4 * 16 and runs[0]["train_flops"] == 4 * 16 * 1000.0
  assert runs[1]["step"] == 6 and not runs[1]["finished"]  # read from metrics.jsonl
  assert runs[1]["train/loss"] == 5.0 - 6 * 0.02 and runs[1]["eval/loss"] == 4.0 - 0.02
  assert runs[0]["tokens_per_sec"] == 300.0  # median over log rows, the first skipped
  diff_table = out.split("\n\n")[1]
  assert diff_table.splitlines()[2:] == ["| train.lr | 0.0100 | 0.0200 |"]
  assert f"| {a} | 4 |" in out and png.stat().st_size > 1000


def test_compare_refuses_a_workdir_without_a_run(tmp_path, capsys):
  assert compare.main([str(tmp_path), "--plot="]) == 2
  assert "holds no run" in capsys.readouterr().err

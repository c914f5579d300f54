"""Studies: named variants of one base config, run in sequence, summarised into a results
folder (README table, plots, the configs, the command, commit and corpus fingerprint).

Each study has parts (A, B, ... or 1, 2, ...) that can be rerun on their own (`--parts`):
every part writes its own section to results/<study>/parts/<part>.md with its own
provenance (command, scale, corpus fingerprint, commits, date), and README.md is
assembled from the part files that exist, so rerunning one part leaves the others'
sections (and their provenance) as they were.

Resumable: each variant trains in its own workdir under `runs_dir`; rerunning the
study skips finished variants and resumes interrupted ones (the trainer's resume).
Only the summary goes to results/; the workdirs (checkpoints) stay under runs/.
"""

from __future__ import annotations

import dataclasses
import datetime
import sys
import time

import jax

from effjax import checks
from effjax import config as config_lib
from effjax import paths
from effjax.train import trainer
from effjax.train.metrics import read_metrics


@dataclasses.dataclass
class Variant:
  name: str
  overrides: dict
  label: str = ""


@dataclasses.dataclass
class RunRecord:
  variant: Variant
  workdir: str
  config: config_lib.Config
  rows: list
  info: dict

  def last(self, key, default=float("nan")):
    for row in reversed(self.rows):
      if key in row:
        return row[key]
    return default

  def series(self, key):
    return [(r["step"], r[key]) for r in self.rows if key in r]


def run_variants(base_config: config_lib.Config, variants: list[Variant], runs_dir: str,
                 *, only: set[str] | None = None) -> list[RunRecord]:
  data = None
  records = []
  for i, v in enumerate(variants):
    cfg = checks.validate(config_lib.apply_overrides(base_config, v.overrides),
                          jax.device_count())
    workdir = str(paths.as_path(runs_dir) / v.name)  # local or a cloud URL
    if only is None or v.name in only:
      data = data or trainer.load_data(cfg)
      t0 = time.time()
      print(f"[study] ({i + 1}/{len(variants)}) {v.name}: {v.label}", file=sys.stderr, flush=True)
      result = trainer.train(cfg, workdir, data=data)
      if result.exit_code not in (trainer.EXIT_OK, trainer.EXIT_NONFINITE):
        raise SystemExit(result.exit_code)  # interrupted: rerun the study to resume
      print(f"[study] {v.name} done in {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    wd = paths.as_path(workdir)
    if not (wd / "metrics.jsonl").exists():
      continue
    info = paths.read_json(wd / "run_info.json")
    records.append(RunRecord(v, workdir, cfg, read_metrics(wd / "metrics.jsonl"), info))
  return records


def with_seeds(variants: list[Variant], seeds) -> list[Variant]:
  """Each variant at each seed; seed 0 keeps the variant's name, seed s adds '_seed<s>'."""
  out = []
  for seed in seeds:
    for v in variants:
      out.append(v if seed == 0 else Variant(f"{v.name}_seed{seed}", {**v.overrides, "seed": seed},
                                             f"{v.label}, seed {seed}"))
  return out


def base_name(name: str) -> str:
  return name.split("_seed")[0]


def parse_parts(arg: str, all_parts: tuple) -> list:
  """--parts=a,c -> ['a', 'c'] (in the study's order); '' -> all parts."""
  if not arg:
    return list(all_parts)
  want = {p.strip().lower() for p in arg.split(",") if p.strip()}
  unknown = want - set(all_parts)
  if unknown:
    raise SystemExit(f"unknown part(s) {sorted(unknown)}; parts are {list(all_parts)}")
  return [p for p in all_parts if p in want]


def provenance(records: list[RunRecord], command: str, scale: str, commit: str = "") -> str:
  """commit: for parts without training runs, the commit read before the part wrote any files
  (read later, the part's own outputs would mark it -dirty)."""
  info = records[0].info if records else {"devices": f"{jax.device_count()} x "
                                          f"{jax.devices()[0].platform}",
                                          "jax_version": jax.__version__}
  commits = sorted({r.info.get("commit", "?") for r in records} or {commit or trainer._git_commit()})  # pylint: disable=protected-access
  return (f"Command: `{command}`\n\n"
          f"Scale: {scale}\n\n"
          f"Corpus: `{info.get('corpus')}` (fingerprint `{info.get('corpus_fingerprint', '')[:16]}`), "
          f"devices: {info.get('devices')}, jax {info.get('jax_version')}, commit(s) "
          f"{', '.join(commits)}, written {datetime.date.today()}. Resolved configs: `configs/`.")


def write_part(out_dir: str, part: str, title: str, body: str, records: list[RunRecord],
               command: str, scale: str, commit: str = "") -> str:
  """results/<study>/parts/<part>.md: '## title', this part's provenance, then body; and the
  part's resolved configs under configs/."""
  (paths.as_path(out_dir) / "parts").mkdir(parents=True, exist_ok=True)
  copy_configs(out_dir, records)
  path = paths.as_path(out_dir) / "parts" / f"{part}.md"
  paths.write_text(path, f"## {title}\n\n{provenance(records, command, scale, commit)}\n\n"
                   f"{body.strip()}\n")
  return str(path)


def copy_configs(out_dir: str, records: list[RunRecord]) -> None:
  """Each run's config.json as configs/<variant>.json (run and output dirs: local or URLs)."""
  configs = paths.as_path(out_dir) / "configs"
  configs.mkdir(parents=True, exist_ok=True)
  for r in records:
    (configs / f"{r.variant.name}.json").write_text(
        (paths.as_path(r.workdir) / "config.json").read_text())


def assemble_readme(out_dir: str, title: str, intro: str, part_order: tuple) -> str:
  """README.md = title + intro + every parts/<part>.md that exists, in the study's order."""
  sections = []
  for part in part_order:
    path = paths.as_path(out_dir) / "parts" / f"{part}.md"
    if path.exists():
      sections.append(path.read_text().strip())
  text = (f"# {title}\n\n{intro.strip()}\n\n" + "\n\n".join(sections)
          + "\n\n## What reproduced\n\nSee FINDINGS.md (written by hand from the tables above).\n")
  path = paths.as_path(out_dir) / "README.md"
  paths.write_text(path, text)
  return str(path)


def seed_stats(values: list) -> tuple:
  """(mean, spread) over seeds; spread = max - min (the seed-to-seed range), nan for one seed."""
  import math  # pylint: disable=g-import-not-at-top
  vals = [v for v in values if v == v]
  if not vals:
    return float("nan"), float("nan")
  mean = sum(vals) / len(vals)
  return mean, (max(vals) - min(vals)) if len(vals) > 1 else math.nan


def write_summary(out_dir: str, title: str, body: str, records: list[RunRecord], command: str,
                  scale: str) -> str:
  """README.md with provenance, plus each variant's resolved config under configs/."""
  copy_configs(out_dir, records)
  info = records[0].info if records else {}
  commits = sorted({r.info.get("commit", "?") for r in records})
  text = (f"# {title}\n\n"
          f"Command: `{command}`\n\n"
          f"Scale: {scale}\n\n"
          f"Corpus: `{info.get('corpus')}` (fingerprint `{info.get('corpus_fingerprint', '')[:16]}`), "
          f"devices: {info.get('devices')}, jax {info.get('jax_version')}, commit(s) "
          f"{', '.join(commits)}, written {datetime.date.today()}. Resolved configs: `configs/`.\n\n"
          f"{body}\n")
  path = paths.as_path(out_dir) / "README.md"
  paths.write_text(path, text)
  return str(path)


def markdown_table(header: list[str], rows: list[list]) -> str:
  fmt = lambda x: f"{x:.4f}" if isinstance(x, float) else str(x)
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(fmt(x) for x in row) + " |" for row in rows]
  return "\n".join(lines)


PARTS_INTRO = ("Each part below is a separate section with its own provenance (command, scale, "
               "corpus, commits, date): parts are rerun on their own with `--parts`, and this "
               "README is assembled from `parts/*.md`. FINDINGS.md says what the tables show and, "
               "where the code changed between parts, which parts were rerun.")


def study_main(argv, *, name: str, doc: str, title: str, parts: dict, out: str) -> int:
  """The command line shared by the studies: --parts (default all), --only, --runs, --out;
  runs each selected part function part(args, only) -> path, then assembles README.md."""
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description=doc.splitlines()[0])
  parser.add_argument("--parts", default="",
                      help=f"comma-separated parts to (re)run: {','.join(parts)}")
  parser.add_argument("--only", default="", help="comma-separated variant names to (re)run")
  parser.add_argument("--runs", default=f"runs/{name}")
  parser.add_argument("--out", default=out)
  args = parser.parse_args(argv)
  only = set(args.only.split(",")) if args.only else None
  paths.as_path(args.out).mkdir(parents=True, exist_ok=True)
  for part in parse_parts(args.parts, tuple(parts)):
    print(f"[{name}] part {part}: {parts[part](args, only)}", file=sys.stderr)
  path = assemble_readme(args.out, title, PARTS_INTRO, tuple(parts))
  print(paths.as_path(path).read_text())
  return 0

"""One prepared accelerator benchmark: every speed number issue 16 asks for, in one run.

  python -m effjax.bench.accelerator --out=results/perf/accelerator [--wheels=.whl]
  bench/accelerator.sh --out=results/perf/accelerator --wheels=.whl    # the same
  python -m effjax.bench.accelerator --tiny                            # CPU dry run

Stages, in priority order, each a subprocess with its own time box (a hang or a crash costs
that stage only), each writing its table the moment it ends:

  env        versions, devices, nvidia-smi, git commit                     -> env.md
  tests      pytest -m gpu: the vendor kernels, the Triton path, the Mosaic GPU kernels'
             first hardware run (per-test timeout where pytest-timeout is installed)
                                                                            -> tests.md
  attention  kernels vs cuDNN at T = 2k and 8k with packed documents (segment ids, as
             training passes them): softmax (cudnn, pallas_gpu), LSSA and LSSAR (pallas_gpu,
             + pallas_mgpu if its tests passed); fwd and fwd+bwd; warm-up, block_until_ready,
             --repeats >= 5, median and min                               -> attention_2k.md,
                                                                              attention_8k.md
  mfu        training-step MFU: configs/gpu_small.py and configs/gpt2_125m.py, softmax on
             cuDNN and on our kernel, LSSA on our kernel                   -> mfu.md
  moe        MoE layer vs dense SwiGLU of equal active FLOPs, bf16, gradients of params and
             input, dropless and capacity 1.25, + ragged_dot's lowering (fwd, dgrad, wgrad)
                                                                            -> moe.md
  (run.log: everything the stages printed.)

Tables are written under --out only (the repository's benchmark rule: results/perf/ changes
only when asked); without it they go to a temporary folder and are printed. At most 8 files.
Needs only the standard library to orchestrate; the stages need jax, flax, optax,
orbax-checkpoint, chex, pytest, and grain (with its dependencies) which --wheels installs
from local wheel files into a private folder (no index, nothing downloaded). --budget caps
the whole run (default 570 s, inside a 10-minute device call); a stage that would start with
less than its minimum left is skipped and listed.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STAGES = ("env", "tests", "attention", "mfu", "moe")


@dataclasses.dataclass
class Run:
  out: str
  log: str
  env: dict
  deadline: float
  tiny: bool
  gpu: bool = False
  mgpu_ok: bool = False
  mgpu_ws_ok: bool = False
  skipped: list = dataclasses.field(default_factory=list)

  def left(self) -> float:
    return self.deadline - time.monotonic()

  def say(self, text: str) -> None:
    line = f"=== {datetime.datetime.now().strftime('%H:%M:%S')} {text}"
    print(line, flush=True)
    with open(self.log, "a") as fh:
      fh.write(line + "\n")


def sh(run: Run, argv: list[str], timeout: float, *, name: str) -> tuple[int, str]:
  """Runs argv (in the repository, its own process group) for at most `timeout` seconds
  (and never past the run's deadline); returns (exit code, output); 124 on timeout."""
  timeout = max(1.0, min(timeout, run.left()))
  proc = subprocess.Popen(argv, cwd=REPO, env=run.env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, start_new_session=True)
  try:
    out, _ = proc.communicate(timeout=timeout)
    rc = proc.returncode
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)  # this stage's own process group only
    out, _ = proc.communicate()
    rc, out = 124, (out or "") + f"\n[{name}: stopped at its {timeout:.0f} s time box]\n"
  with open(run.log, "a") as fh:
    fh.write(f"$ {' '.join(argv)}\n{out}\n[{name}: exit {rc}]\n")
  return rc, out or ""


def py(*args) -> list[str]:
  return [sys.executable, *args]


def _write(run: Run, name: str, text: str) -> None:
  with open(os.path.join(run.out, name), "w") as fh:
    fh.write(text)


# ------------------------------------------------------------------ stages

def stage_env(run: Run) -> None:
  code = ("import importlib, jax\n"
          "mods = ['jax', 'jaxlib', 'flax', 'optax', 'orbax.checkpoint', 'chex', 'grain', "
          "'tokenizers', 'pytest']\n"
          "for m in mods:\n"
          "  try:\n"
          "    print(f'| {m} | {getattr(importlib.import_module(m), \"__version__\", \"?\")} |')\n"
          "  except Exception as e:\n"
          "    print(f'| {m} | missing ({type(e).__name__}) |')\n"
          "print(f'| backend | {jax.default_backend()} |')\n"
          "print(f'| devices | {jax.devices()} |')\n"
          "d = jax.devices()[0]\n"
          "print(f'| device kind | {d.device_kind}, compute capability '"
          "f'{getattr(d, \"compute_capability\", \"-\")} |')\n")
  _, versions = sh(run, py("-c", code), 60, name="env")
  run.gpu = "| backend | gpu |" in versions
  _, commit = sh(run, ["git", "log", "-1", "--format=%h %s"], 10, name="git")
  smi = ""
  if shutil.which("nvidia-smi"):
    _, smi = sh(run, ["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm,"
                      "clocks.mem,power.draw,temperature.gpu,memory.total", "--format=csv"],
                20, name="nvidia-smi")
  _write(run, "env.md", f"# Environment\n\n{datetime.datetime.now().isoformat(timespec='seconds')}"
         f"; commit {commit.strip()}\n\n| package | version |\n|---|---|\n{versions}\n"
         f"```\n{smi.strip()}\n```\n")


def stage_tests(run: Run) -> None:
  if not run.gpu:
    run.skipped.append("tests: pytest -m gpu needs a GPU backend")
    return
  timeout = []
  rc, _ = sh(run, py("-c", "import pytest_timeout"), 20, name="pytest-timeout?")
  if rc == 0:
    timeout = ["--timeout=60"]
  base = py("-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *timeout)
  rc_mgpu, out_mgpu = sh(run, base + ["tests/kernels/test_attention_mgpu.py", "-k",
                                      "matches_reference"], 50, name="tests mgpu")
  run.mgpu_ok = rc_mgpu == 0
  rc_ws, out_ws = 1, "(not run: the Mosaic GPU kernels failed)"
  if run.mgpu_ok:   # the opt-in warp-specialised kernels against the plain ones
    rc_ws, out_ws = sh(run, base + ["tests/kernels/test_attention_mgpu_ws.py", "-k", "hopper"],
                       60, name="tests mgpu ws")
  run.mgpu_ws_ok = rc_ws == 0
  rc, out = sh(run, base + ["tests/kernels/test_vendor.py", "tests/kernels/test_attention.py"],
               50, name="tests vendor+triton")
  tail = lambda s: "\n".join(s.strip().splitlines()[-15:])
  _write(run, "tests.md", f"# pytest -m gpu\n\n## Mosaic GPU kernels (exit {rc_mgpu})\n\n```\n"
         f"{tail(out_mgpu)}\n```\n\n## Warp-specialised kernels (exit {rc_ws})\n\n```\n"
         f"{tail(out_ws)}\n```\n\n## cuDNN / splash wrappers and Triton path (exit {rc})\n\n"
         f"```\n{tail(out)}\n```\n")


def stage_attention(run: Run) -> None:
  if run.tiny:
    shapes = [("tiny", ["--seq-lens=128", "--batch=1", "--heads=2", "--head-dim=16"])]
    impls = "xla,interpret_splash,cudnn" + (",pallas_gpu" if run.gpu else "")
  else:
    shapes = [("2k", ["--seq-lens=2048", "--batch=8", "--heads=16", "--head-dim=128"]),
              ("8k", ["--seq-lens=8192", "--batch=2", "--heads=16", "--head-dim=128"])]
    # cudnn:8: the packed layout sized for 8 documents per row instead of T (what it costs).
    impls = ("cudnn,cudnn:8,pallas_gpu" + (",pallas_mgpu" if run.mgpu_ok else "")
             + (",pallas_mgpu_ws" if run.mgpu_ws_ok else ""))
  for label, shape in shapes:
    sh(run, py("-m", "pallas_kernels.attention.bench", *shape, f"--impls={impls}",
               "--scores=softmax,lssa,lssar", "--segments=4", "--repeats=2" if run.tiny else
               "--repeats=7", "--no-memory", f"--out={run.out}/attention_{label}.md"),
       75, name=f"attention {label}")


def stage_mfu(run: Run) -> None:
  if not run.gpu:
    run.skipped.append("mfu: training-step MFU needs a GPU backend")
    return
  own = "pallas_mgpu" if run.mgpu_ok else "pallas_gpu"
  common = ["--steps=25", "--config.train.eval_batches=0", "--config.train.log_every=5"]
  parts = []
  for config, budget in (("configs/gpu_small.py", 120), ("configs/gpt2_125m.py", 120)):
    name = os.path.basename(config)[:-3]
    target = f"{run.out}/mfu_{name}.part"
    sh(run, py("-m", "effjax.train.mfu", f"--config={config}", *common,
               f"--pairs=softmax/cudnn,softmax/{own},lssa/{own}", f"--out={target}"),
       budget, name=f"mfu {name}")
    if os.path.exists(target):
      parts.append(open(target).read())
      os.remove(target)
      if "- softmax/cudnn:" in parts[-1] and run.left() > 60:  # packed documents refused
        sh(run, py("-m", "effjax.train.mfu", f"--config={config}", *common,
                   "--config.model.attention.doc_mask=false", "--pairs=softmax/cudnn",
                   f"--out={target}"), 60, name=f"mfu {name} cudnn without doc_mask")
        if os.path.exists(target):
          parts.append("(cuDNN without packed documents, doc_mask=false:)\n\n"
                       + open(target).read())
          os.remove(target)
    _write(run, "mfu.md", "\n\n".join(parts) or "# MFU\n\nno configuration finished\n")


def stage_moe(run: Run) -> None:
  size = (["--tokens=512", "--d=32", "--d-ff=64", "--experts=4", "--repeats=2"] if run.tiny else
          ["--tokens=32768", "--d=1024", "--d-ff=4096", "--experts=8,64", "--repeats=7"])
  sh(run, py("-m", "effjax.models.moe_bench", *size, "--top-k=2", "--dispatch=ragged_dot,gmm",
             "--capacity-factor=0,1.25", "--dtype=bfloat16", "--grad-x", "--hlo",
             f"--out={run.out}/moe.md"), 90, name="moe")


RUNNERS = {"env": stage_env, "tests": stage_tests, "attention": stage_attention,
           "mfu": stage_mfu, "moe": stage_moe}
# Time boxes (s): env ~10, tests 2 x 50, attention 2 x 75, mfu 2 x 120, moe 90: ~590 in all,
# so under the default --budget the last stage may be cut short (listed as such in run.log).
MIN_SECONDS = {"env": 5, "tests": 40, "attention": 40, "mfu": 60, "moe": 30}


def install_wheels(folder: str, log) -> str:
  """pip-installs every wheel in `folder` (no index, no dependencies resolved) into a
  private site folder; returns its path."""
  wheels = sorted(glob.glob(os.path.join(folder, "*.whl")))
  if not wheels:
    raise SystemExit(f"--wheels={folder}: no .whl files there")
  site = os.path.join(tempfile.gettempdir(), "effjax_bench_site")
  cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
         "--no-cache-dir", "--upgrade", "--target", site, *wheels]
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  log(f"wheels: {len(wheels)} from {folder} -> {site} (exit {proc.returncode})")
  if proc.returncode:
    raise SystemExit(f"installing --wheels failed:\n{proc.stderr[-2000:]}")
  return site


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default="", help="write the tables here (e.g. results/perf/"
                      "accelerator); default: a temporary folder, printed only")
  parser.add_argument("--wheels", default="", help="folder of .whl files (grain and its "
                      "dependencies) to install privately first")
  parser.add_argument("--stages", default=",".join(STAGES), help=f"subset of {','.join(STAGES)}")
  parser.add_argument("--budget", type=float, default=570.0, help="seconds for the whole run")
  parser.add_argument("--tiny", action="store_true", help="CPU dry run at toy sizes")
  args = parser.parse_args(argv)
  stages = args.stages.split(",")
  unknown = set(stages) - set(STAGES)
  if unknown:
    parser.error(f"--stages: unknown {sorted(unknown)}; valid: {', '.join(STAGES)}")
  out = os.path.abspath(args.out) if args.out else tempfile.mkdtemp(prefix="effjax_bench_")
  os.makedirs(out, exist_ok=True)
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  paths = [REPO]
  run = Run(out=out, log=os.path.join(out, "run.log"), env=env,
            deadline=time.monotonic() + args.budget, tiny=args.tiny)
  open(run.log, "w").close()
  if args.wheels:
    paths.append(install_wheels(args.wheels, run.say))
  env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [os.environ.get("PYTHONPATH")] if p])
  for name in STAGES:
    if name not in stages:
      continue
    if run.left() < MIN_SECONDS[name]:
      run.skipped.append(f"{name}: {run.left():.0f} s left of --budget, needs {MIN_SECONDS[name]}")
      continue
    run.say(f"{name} ({run.left():.0f} s left)")
    RUNNERS[name](run)
  run.say("done" + ("; skipped: " + "; ".join(run.skipped) if run.skipped else ""))
  for path in sorted(glob.glob(os.path.join(out, "*.md"))):
    print(f"\n--- {path}\n{open(path).read()}")
  if not args.out:
    print(f"(tables in {out}; pass --out to keep them)", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""Records the golden training losses that `tests/test_golden.py` checks.

The model-builder redesign (issue 12) must not change behaviour: these are the first 30
per-step training losses of four configurations, recorded once at the commit named in
`losses.json`, and compared bit-for-bit on CPU afterwards. XLA's CPU code differs between
processor families, so each recording names the machine it ran on (`machine()`); running this
on a new machine adds its recording beside the others. Re-record everything only for a change
that is meant to alter the numbers, and say so in the commit message:

  python -m tests.golden.record          # add (or refresh) this machine's recording
"""

import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile

from effjax import config as C
from effjax.train import trainer
from effjax.train.metrics import read_metrics

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
STEPS = 30
_COMMON = (f"--config.train.steps={STEPS}", "--config.train.log_every=1",
           "--config.train.eval_every=1000", "--config.train.checkpoint_every=1000",
           "--config.train.sample_tokens=0", "--config.train.plot=false",
           "--config.train.log_spectral=false")
CASES = {
    "quickstart": ("--config=" + os.path.join(REPO, "configs", "quickstart.py"),
                   "--config.train.batch_size=8", "--config.train.warmup_steps=10"),
    "moe": ("--config=" + os.path.join(REPO, "configs", "tiny.py"),
            "--config.model.moe.num_experts=8", "--config.model.moe.top_k=2",
            "--config.model.moe.balance=alf+seq_aux"),
    "qat": ("--config=" + os.path.join(REPO, "configs", "tiny.py"),
            "--config.quant.method=quest", "--config.quant.weight_bits=4",
            "--config.quant.act_bits=4"),
    "lssa": ("--config=" + os.path.join(REPO, "configs", "tiny.py"),
             "--config.model.attention.score=lssa"),
}


def run_case(name: str, workdir: str) -> list[float]:
  cfg, _ = C.load([*CASES[name], *_COMMON])
  result = trainer.train(cfg, workdir, quiet=True)
  assert result.exit_code == trainer.EXIT_OK, (name, result)
  rows = read_metrics(os.path.join(workdir, "metrics.jsonl"))
  losses = {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
  return [losses[s] for s in sorted(losses)]


def machine() -> str:
  """The CPU model and a hash of its instruction-set flags: XLA's CPU code depends on both."""
  model, flags = platform.processor() or platform.machine(), ""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key.strip() == "model name" and not model.startswith("cpu:"):
          model = "cpu:" + value.strip()
        elif key.strip() in ("flags", "Features") and not flags:
          flags = " ".join(sorted(value.split()))
  except OSError:
    pass
  return f"{model} flags:{hashlib.sha1(flags.encode()).hexdigest()[:10]}"


def load() -> dict:
  with open(os.path.join(HERE, "losses.json")) as f:
    return json.load(f)


def main():
  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, cwd=REPO).stdout.strip()
  import jax  # pylint: disable=g-import-not-at-top
  golden = load() if os.path.exists(os.path.join(HERE, "losses.json")) else {
      "jax": jax.__version__, "steps": STEPS, "recordings": []}
  if golden["jax"] != jax.__version__:
    sys.exit(f"losses.json holds jax {golden['jax']} recordings; this is jax {jax.__version__}: "
             f"move the file aside to start a new set")
  entry = {"machine": machine(), "commit": commit, "losses": {}}
  for name in CASES:
    with tempfile.TemporaryDirectory() as workdir:
      entry["losses"][name] = run_case(name, workdir)
    print(name, entry["losses"][name][:3], "...", entry["losses"][name][-1], file=sys.stderr)
  golden["recordings"] = [r for r in golden["recordings"] if r["machine"] != entry["machine"]]
  golden["recordings"].append(entry)
  with open(os.path.join(HERE, "losses.json"), "w") as f:
    json.dump(golden, f, indent=1)


if __name__ == "__main__":
  main()

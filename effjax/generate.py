"""Generate text from a run's checkpoint with a KV cache (docs/generate.md).

  python -m effjax.generate --workdir=runs/quickstart --prompt="def " [--max_tokens=200]
      [--temperature=0.8] [--top_k=0] [--top_p=1.0] [--step=N] [--seed=0] [--context=0]
      [--num_samples=1] [--config.key=value ...]

Prints the prompt and its continuation to stdout (progress on stderr). --context: tokens the
model sees at once (0: the run's train.seq_len, or model.max_positions with learned
positions). --config.* overrides the run's config.json for generation only, e.g.
--config.model.attention.eval_score=lssar. Exit codes: 0 done, 2 no run / bad arguments.
"""

from __future__ import annotations

import argparse
import sys
import time

USAGE = __doc__


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m effjax.generate", description=USAGE,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True)
  p.add_argument("--prompt", default="")
  p.add_argument("--max_tokens", type=int, default=200)
  p.add_argument("--temperature", type=float, default=0.8)
  p.add_argument("--top_k", type=int, default=0)
  p.add_argument("--top_p", type=float, default=1.0)
  p.add_argument("--step", type=int, default=None)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--context", type=int, default=0)
  p.add_argument("--num_samples", type=int, default=1)
  return p


def _check(args) -> str | None:
  if args.max_tokens < 1 or not 0 < args.top_p <= 1 or args.top_k < 0 or args.num_samples < 1:
    return "--max_tokens and --num_samples must be >= 1, --top_k >= 0 and --top_p in (0, 1]"
  return None


def main(argv: list[str] | None = None) -> int:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from effjax import load, sampling  # pylint: disable=g-import-not-at-top
  opened = load.open_for_command(argv, parser(), check=_check)
  if isinstance(opened, int):
    return opened
  args, run = opened.args, opened.run
  c = run.config
  limit = c.model.max_positions or c.train.seq_len if c.model.position == "learned" else None
  context = args.context or limit or c.train.seq_len
  if limit and context > limit:
    print(f"effjax: --context={context} exceeds the learned position table "
          f"(model.max_positions={limit})", file=sys.stderr)
    return 2
  tok = run.tokenizer
  prompt_ids = list(np.asarray(tok.encode(args.prompt)).tolist()) or [tok.eos_id]
  load.say(f"step {run.step} loaded in {opened.seconds:.1f}s; generating "
           f"{args.max_tokens} tokens (context {context}, compiling first) ...")
  rng = jax.random.PRNGKey(args.seed)
  for i in range(args.num_samples):
    t1 = time.perf_counter()
    out = sampling.generate(run.model, run.params, run.buffers, prompt_ids,
                            max_tokens=args.max_tokens, rng=jax.random.fold_in(rng, i),
                            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            context=context, vocab=tok.vocab_size)
    if i:
      print("-" * 60)
    print(args.prompt + tok.decode(np.asarray(out, np.int32)), flush=True)
    load.say(f"sample {i}: {len(out)} tokens in {time.perf_counter() - t1:.1f}s")
  return 0


if __name__ == "__main__":
  sys.exit(main())

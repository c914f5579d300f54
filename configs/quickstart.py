"""Quick start: a ~2M-parameter byte-level LM on the built-in corpus (Python's own sources).

The loss falls visibly within a few minutes on 2 CPU cores.
  python -m effjax.train --config=configs/quickstart.py --workdir=runs/quickstart
"""


def get_config():
  return {
      "model": {"d_model": 192, "n_layers": 4, "n_heads": 6},
      "train": {"steps": 600, "batch_size": 16, "seq_len": 128, "lr": 3e-3, "warmup_steps": 50,
                "eval_every": 150, "eval_batches": 8, "log_every": 10, "checkpoint_every": 200},
      "data": {"corpus": "builtin", "tokenizer": "byte"},
  }

"""Tiny model for tests: d=32, 2 layers, sequences of 32 bytes."""


def get_config():
  return {
      "model": {"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2},
      "train": {"steps": 40, "batch_size": 8, "seq_len": 32, "lr": 1e-2, "warmup_steps": 5,
                "eval_every": 20, "eval_batches": 2, "log_every": 5, "checkpoint_every": 20,
                "sample_tokens": 0, "plot": False},
  }

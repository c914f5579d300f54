"""A ~100M-parameter byte-level LM sized for one GPU (MFU measurements, attention comparisons).

  python -m effjax.train.mfu --config=configs/gpu_small.py --impls xla,pallas_gpu
d_model 1024, 8 layers, 8 heads of 128 (a power of two, so the Pallas GPU kernels apply),
2048-token windows, 16 sequences per step; bf16 compute ('auto' on GPU).
"""


def get_config():
  return {
      "model": {"d_model": 1024, "n_layers": 8, "n_heads": 8},
      "train": {"steps": 40, "batch_size": 16, "seq_len": 2048, "lr": 1e-3, "warmup_steps": 10,
                "eval_every": 10 ** 9, "checkpoint_every": 10 ** 9, "log_every": 5,
                "sample_tokens": 0, "plot": False},
      "data": {"corpus": "builtin", "tokenizer": "byte"},
  }

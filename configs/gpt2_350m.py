"""GPT-2-medium-shaped LM (~355M parameters) with a real BPE vocabulary, for one GPU.

  python -m effjax.data.bpe --vocab-size=50257      # once: trains and caches the vocabulary
  python -m effjax.train --config=configs/gpt2_350m.py

GPT-2 medium's shapes (Radford et al. 2019): d_model 1024, 24 layers, 16 heads of 64, a tied
50304-row embedding, with RoPE and a SwiGLU FFN of 2752 (the default 8/3 d_model rounded up to
a multiple of 64, ~ GPT-2's 4 d_model GELU FFN in parameters). Vocabulary, chunked loss and
batch as configs/gpt2_125m.py.
"""


def get_config():
  return {
      "model": {"d_model": 1024, "n_layers": 24, "n_heads": 16, "vocab_size": 50304,
                "tie_embeddings": True, "loss_chunk": 256},
      "train": {"steps": 40, "batch_size": 16, "seq_len": 2048, "lr": 3e-4, "warmup_steps": 10,
                "eval_every": 10 ** 9, "checkpoint_every": 10 ** 9, "log_every": 5,
                "sample_tokens": 0, "plot": False},
      "data": {"corpus": "builtin", "tokenizer": "bpe:50257"},
  }

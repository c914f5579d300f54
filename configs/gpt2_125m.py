"""GPT-2-small-shaped LM (~124M parameters) with a real BPE vocabulary, for one GPU.

  python -m effjax.data.bpe --vocab-size=50257      # once: trains and caches the vocabulary
  python -m effjax.train --config=configs/gpt2_125m.py
  python -m effjax.train.mfu --config=configs/gpt2_125m.py --impls cudnn --scores softmax

GPT-2 small's shapes (Radford et al. 2019): d_model 768, 12 layers, 12 heads of 64, a tied
50304-row embedding (50257 BPE tokens padded to a multiple of 128), here with RoPE and a
SwiGLU FFN of 2048 (3 x 768 x 2048 = GPT-2's 2 x 768 x 3072). The vocabulary is a byte-level
BPE trained on the built-in corpus (data.tokenizer=bpe:50257, effjax/data/bpe.py), so the LM
head is a real 50k-way softmax: the loss runs chunked (model.loss_chunk, 256 positions x 16
sequences at a time) instead of holding [16, 2048, 50304] fp32 logits. 16 x 2048 tokens per
step, bf16 compute on GPU/TPU ('auto').
"""


def get_config():
  return {
      "model": {"d_model": 768, "n_layers": 12, "n_heads": 12, "mlp_dim": 2048,
                "vocab_size": 50304, "tie_embeddings": True, "loss_chunk": 256},
      "train": {"steps": 40, "batch_size": 16, "seq_len": 2048, "lr": 6e-4, "warmup_steps": 10,
                "eval_every": 10 ** 9, "checkpoint_every": 10 ** 9, "log_every": 5,
                "sample_tokens": 0, "plot": False},
      "data": {"corpus": "builtin", "tokenizer": "bpe:50257"},
  }

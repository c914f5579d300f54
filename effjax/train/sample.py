"""Short sampled continuation at the end of a run (no KV cache: fixed-length window)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def sample_text(model, params, buffers, tokenizer, *, prompt: str, num_tokens: int, seq_len: int,
                temperature: float, rng: jax.Array) -> str:
  """Samples `num_tokens` tokens after `prompt`; the model sees the last seq_len tokens.

  One jitted forward over a fixed [1, seq_len] window per token, so it compiles once.
  """
  ids = list(np.asarray(tokenizer.encode(prompt)).tolist()) or [tokenizer.eos_id]
  vocab = tokenizer.vocab_size

  @jax.jit
  def next_token(window_1xL, length, key):
    logits, _ = model.apply(params, buffers, window_1xL)
    logits_V = logits[0, length - 1, :vocab]  # never sample padded vocabulary ids
    if temperature <= 0:
      return jnp.argmax(logits_V)
    return jax.random.categorical(key, logits_V / temperature)

  out = []
  for _ in range(num_tokens):
    context = ids[-seq_len:]
    window = np.zeros((1, seq_len), np.int32)
    window[0, :len(context)] = context
    rng, key = jax.random.split(rng)
    tok = int(next_token(jnp.asarray(window), len(context), key))
    ids.append(tok)
    out.append(tok)
  return tokenizer.decode(np.asarray(out))

"""Short sampled continuation at the end of a run, through the KV-cache generator
(effjax/sampling.py): the model sees at most train.seq_len tokens at a time."""

from __future__ import annotations

import jax
import numpy as np

from effjax import sampling


def sample_text(model, params, buffers, tokenizer, *, prompt: str, num_tokens: int, seq_len: int,
                temperature: float, rng: jax.Array) -> str:
  """Samples `num_tokens` tokens after `prompt` (an empty prompt starts from EOS)."""
  ids = list(np.asarray(tokenizer.encode(prompt)).tolist()) or [tokenizer.eos_id]
  out = sampling.generate(model, params, buffers, ids, max_tokens=num_tokens, rng=rng,
                          temperature=temperature, context=seq_len, vocab=tokenizer.vocab_size)
  return tokenizer.decode(np.asarray(out, np.int32))

"""Text generation with a KV cache: prefill the prompt once, then one token per step.

`generate(model, params, buffers, prompt_ids, ...)` returns the new token ids. The model's
`decode` (effjax/models/kv_cache.py) gives, token by token, the logits the full forward
gives; two jitted functions run it (the prefill for each prompt length, the one-token
step), so a long generation compiles twice.

The cache holds `context` tokens (default: the training length). When it is full, the last
`context // 2` tokens are prefilled again at positions 0.. (a sliding window in strides
of half the context), so the model never sees positions beyond those it was trained on.

Models without incremental decoding (shared attention weights built by the stack, an
expert-choice Mixture-of-Recursions under its top-k training rule: `decode_unsupported`
names why) are sampled with
one full forward over a fixed [1, context] window per token instead: the same tokens, slower.

Sampling (`sample`): temperature <= 0 is greedy; otherwise logits / temperature, restricted
to the top_k most likely tokens (0: all), then to the smallest set whose probability
reaches top_p (nucleus sampling, Holtzman et al. 2020; 1.0: all).
"""

from __future__ import annotations

import functools
import logging
from typing import Sequence

import jax
import jax.numpy as jnp


def filter_logits(logits_BxV, *, top_k: int = 0, top_p: float = 1.0):
  """Logits with everything outside the top-k / top-p set at -inf."""
  if top_k and top_k < logits_BxV.shape[-1]:
    kth = jax.lax.top_k(logits_BxV, top_k)[0][..., -1:]
    logits_BxV = jnp.where(logits_BxV < kth, -jnp.inf, logits_BxV)
  if top_p < 1.0:
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_BxV, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
    # the smallest logit still needed to reach top_p (the most likely token always stays)
    cutoff = jnp.min(jnp.where(before < top_p, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
    logits_BxV = jnp.where(logits_BxV < cutoff, -jnp.inf, logits_BxV)
  return logits_BxV


def sample(logits_BxV, key, *, temperature: float, top_k: int = 0, top_p: float = 1.0):
  """Token ids [B] from the last-position logits."""
  if temperature <= 0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits_BxV = filter_logits(logits_BxV / temperature, top_k=top_k, top_p=top_p)
  return jax.random.categorical(key, logits_BxV, axis=-1).astype(jnp.int32)


def decode_unsupported(model, params, buffers) -> str | None:
  """Why `model` has no KV-cache decoding (None: it has)."""
  module = model.module(params, buffers)
  stack = module.blocks
  if not hasattr(stack, "init_cache"):
    return f"{type(stack).__name__} has no KV cache"
  if hasattr(stack, "decode_unsupported"):  # the stack knows best (Mixture-of-Recursions)
    return stack.decode_unsupported()
  if getattr(stack, "shared", None) is not None:
    return "the attention weights are built by the stack (model.attention.sharing)"
  layers = getattr(stack, "layers", ())
  blocks = [layers] if hasattr(layers, "decode") else list(layers)  # scanned: one Block
  for block in blocks:
    if not hasattr(block, "decode"):
      return f"{type(block).__name__} has no decode"
  return None


def generate(model, params, buffers, prompt_ids: Sequence[int], *, max_tokens: int,
             rng: jax.Array, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             context: int, vocab: int | None = None, stop_id: int | None = None,
             **model_context) -> list[int]:
  """Up to `max_tokens` new token ids after `prompt_ids` (stops after `stop_id` if given).

  model: a models.FunctionalModel; vocab: sample only ids below it (the tokenizer's, not the
  padded table); model_context: models.Context fields (e.g. moe_top_k)."""
  ids = list(prompt_ids)
  if not ids:
    raise ValueError("generate needs a non-empty prompt (e.g. the tokenizer's EOS id)")
  if context < 2:
    raise ValueError(f"context must be at least 2 tokens; got {context}")
  reason = decode_unsupported(model, params, buffers)
  if reason is not None:
    logging.warning("generate: no KV cache for this model (%s); one full forward per token",
                    reason)
    return _generate_full(model, params, buffers, ids, max_tokens=max_tokens, rng=rng,
                          temperature=temperature, top_k=top_k, top_p=top_p, context=context,
                          vocab=vocab, stop_id=stop_id, **model_context)
  prefill, step = _compiled(model, context, temperature, top_k, top_p, vocab,
                            tuple(sorted(model_context.items())))
  out: list[int] = []
  window = ids[-context:]
  rng, key = jax.random.split(rng)
  token, cache = prefill(params, buffers, jnp.asarray([window], jnp.int32), key)
  length = len(window)
  while True:
    out.append(int(token))
    if len(out) >= max_tokens or (stop_id is not None and out[-1] == stop_id):
      return out
    rng, key = jax.random.split(rng)
    if length == context:  # full: slide the window by half the context
      window = (ids + out)[-(context // 2):]
      token, cache = prefill(params, buffers, jnp.asarray([window], jnp.int32), key)
      length = len(window)
      continue
    token, cache = step(params, buffers, token, cache, jnp.int32(length), key)
    length += 1


@functools.lru_cache(maxsize=8)
def _compiled(model, context, temperature, top_k, top_p, vocab, model_context):
  """The jitted prefill and one-token step (kept for repeated calls on the same model)."""
  model_context = dict(model_context)
  pick = functools.partial(sample, temperature=temperature, top_k=top_k, top_p=top_p)

  def next_token(logits_1xSxV, key):
    logits_1xV = logits_1xSxV[:, -1, :vocab] if vocab else logits_1xSxV[:, -1]
    return pick(logits_1xV, key)[0]

  @jax.jit
  def prefill(params, buffers, ids_1xS, key):
    cache = model.module(params, buffers).init_cache(1, context)
    logits, cache = model.decode(params, buffers, ids_1xS, cache, start=0, **model_context)
    return next_token(logits, key), cache

  @jax.jit
  def step(params, buffers, token, cache, start, key):
    logits, cache = model.decode(params, buffers, token.reshape(1, 1), cache, start=start,
                                 **model_context)
    return next_token(logits, key), cache

  return prefill, step



def _generate_full(model, params, buffers, ids: list[int], *, max_tokens, rng, temperature,
                   top_k, top_p, context, vocab, stop_id, **model_context) -> list[int]:
  """`generate` without a cache: the last `context` tokens in a fixed [1, context] window
  (compiled once), the next token read at the last filled position."""
  pick = functools.partial(sample, temperature=temperature, top_k=top_k, top_p=top_p)

  @jax.jit
  def next_token(window_1xL, length, key):
    logits, _ = model.apply(params, buffers, window_1xL, **model_context)
    logits_1xV = jax.lax.dynamic_index_in_dim(logits, length - 1, axis=1, keepdims=False)
    return pick(logits_1xV[:, :vocab] if vocab else logits_1xV, key)[0]

  out: list[int] = []
  while len(out) < max_tokens:
    window = (ids + out)[-context:]
    padded = jnp.zeros((1, context), jnp.int32).at[0, :len(window)].set(
        jnp.asarray(window, jnp.int32))
    rng, key = jax.random.split(rng)
    out.append(int(next_token(padded, jnp.int32(len(window)), key)))
    if stop_id is not None and out[-1] == stop_id:
      break
  return out

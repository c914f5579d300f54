"""Pallas attention forward kernel in interpret mode versus the reference (issue 3).

Tolerances: fp32 throughout; the kernel sums keys block by block (online softmax
rescaling, two-pass sums) instead of in one reduction, so results differ by rounding:
1e-5 absolute for softmax/LSSA outputs of O(1). LSSAR raises ratios to the 15th power,
which amplifies the relative rounding of A by ~15x: 5e-5.
Gradients: the backward pass recomputes through the reference (stated in kernel.py), so
the gradient test checks the custom_vjp wiring, not a backward kernel.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.attention import attention, reference

TOL = {"softmax": 1e-5, "lssa": 1e-5, "lssar": 5e-5}


def _qkv(b, t, h, kv, d, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 3)
  return (jax.random.normal(ks[0], (b, t, h, d)), jax.random.normal(ks[1], (b, t, kv, d)),
          jax.random.normal(ks[2], (b, t, kv, d)))


@pytest.mark.parametrize("score", ["softmax", "lssa", "lssar"])
@pytest.mark.parametrize("t, h, kv, d, packed", [
    (37, 4, 4, 64, False),    # GQA ratio 1, length not a block multiple
    (100, 4, 2, 64, True),    # GQA ratio 2, packed segments
    (64, 4, 1, 128, False),   # GQA ratio 4 (MQA), head dim 128
])
def test_kernel_forward_matches_reference(score, t, h, kv, d, packed):
  q, k, v = _qkv(2, t, h, kv, d)
  seg = jnp.asarray([[1] * (t // 3) + [2] * (t - t // 3), [1] * t]) if packed else None
  out = attention(q, k, v, score=score, segment_ids=seg, implementation="interpret",
                  block_q=32, block_k=32)
  ref = reference.attention(q, k, v, score=score, segment_ids=seg)
  np.testing.assert_allclose(out, ref, atol=TOL[score], rtol=TOL[score])


def test_kernel_q_offset_and_gradients():
  q, k, v = _qkv(1, 48, 2, 2, 64, seed=1)
  out = attention(q[:, 16:], k, v, score="lssar", q_offset=16, implementation="interpret",
                  block_q=16, block_k=16)
  ref = reference.attention(q[:, 16:], k, v, score="lssar", q_offset=16)
  np.testing.assert_allclose(out, ref, atol=5e-5, rtol=5e-5)
  loss = lambda impl: lambda q, k, v: jnp.sum(
      attention(q, k, v, score="lssa", implementation=impl, block_q=16, block_k=16) ** 2)
  g_kernel = jax.grad(loss("interpret"), argnums=(0, 1, 2))(q, k, v)
  g_ref = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(g_kernel, g_ref):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)

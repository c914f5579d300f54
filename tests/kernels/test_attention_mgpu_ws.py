"""The warp-specialised Mosaic GPU forward (pallas_kernels/attention/mosaic_gpu_ws.py: two
consumer warpgroups and a producer) against the single-warpgroup forward of mosaic_gpu.py:
the same outputs and residuals (so the same gradients through the shared backward), for every
score, packed documents, causal and not, GQA, ragged lengths.

Where it runs:
  * -m gpu: on a Hopper (test_ws_matches_the_plain_forward_on_hopper), the real check;
  * -m slow: in GPU interpret mode on CPU, in a subprocess with PJRT_NPROC=32. GPU
    interpret mode runs each warpgroup as a host thread whose barrier waits block inside
    XLA:CPU host callbacks; XLA sizes its CPU thread pools by the core count, so on a
    2-core host two blocked waits held every worker the third warpgroup needed and the
    kernel hung. PJRT_NPROC (read by XLA's PJRT CPU client) sizes those pools; with 32
    every case here, the consumers' ping-pong schedule included, runs.
  * default suite: the choice and refusal rules below, and the CUDA lowering of all three
    scores exported from CPU (test_attention_mgpu.py,
    test_warp_specialized_forward_kernels_lower_to_mosaic_gpu, with the consumers'
    ping-pong schedule).
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.attention import mosaic_gpu

INNER = os.environ.get("EFFJAX_WS_INNER") == "1"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (score, packed, causal, T, q heads, kv heads, head_dim, gradients too)
CASES = [
    ("softmax", True, True, 200, 4, 2, 64, True),     # GQA, packed, causal, ragged
    ("lssa", True, False, 200, 2, 1, 64, False),
    ("lssar", True, True, 200, 2, 2, 64, True),      # two passes over the ring
    ("lssar", False, False, 330, 2, 1, 64, False),   # more steps than ring slots
]
SLOW_CASES = [
    ("softmax", False, True, 520, 2, 1, 128, False),  # head_dim 128 (a two-slot ring)
    ("lssa", False, True, 300, 2, 2, 64, True),
    ("softmax", False, False, 130, 2, 1, 64, True),  # the last consumer's block is padding
]


def _case_id(case):
  score, packed, causal, t, h, kv, d, grads = case
  return (f"{score}-{'packed' if packed else 'plain'}-{'causal' if causal else 'full'}"
          f"-T{t}-H{h}K{kv}-d{d}{'-grads' if grads else ''}")


def _run_case(case):
  score, packed, causal, t, h, kvh, d, grads = case
  ks = jax.random.split(jax.random.PRNGKey(t + d), 4)
  q = jax.random.normal(ks[0], (1, t, h, d), jnp.bfloat16)
  k = jax.random.normal(ks[1], (1, t, kvh, d), jnp.bfloat16)
  v = jax.random.normal(ks[2], (1, t, kvh, d), jnp.bfloat16)
  seg = jnp.asarray([[1] * (t // 3) + [2] * (t - t // 3 - 7) + [3] * 7]) if packed else None
  cot = jax.random.normal(ks[3], (1, t, h, d), jnp.float32)

  def attend(ws):
    def f(q, k, v):
      return mosaic_gpu.flash_attention(q, k, v, seg, score=score, causal=causal,
                                        interpret=True, warp_specialized=ws)
    if not grads:
      return (f(q, k, v),)
    out, vjp = jax.vjp(f, q, k, v)
    return (out, *vjp(cot.astype(out.dtype)))

  got, want = attend(True), attend(False)
  for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.all(np.isfinite(a)), name
    # The same maths in the same order per query row: equal up to the last bf16 rounding.
    np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-2 * max(1.0, np.abs(b).max()),
                               err_msg=name)
  return float(np.abs(np.asarray(got[0], np.float32) - np.asarray(want[0], np.float32)).max())


@pytest.mark.skipif(not INNER, reason="runs inside test_ws_matches_the_plain_forward's "
                    "subprocess (PJRT_NPROC=32)")
@pytest.mark.parametrize("case", CASES + SLOW_CASES, ids=_case_id)
def test_inner_ws_case(case):
  import faulthandler  # pylint: disable=g-import-not-at-top
  faulthandler.dump_traceback_later(240, exit=True)   # a hang fails this case, not CI
  try:
    print(f"\n{_case_id(case)}: max |ws - plain| on outputs {_run_case(case):.2e}")
  finally:
    faulthandler.cancel_dump_traceback_later()
    mosaic_gpu.reset_interpret_state()


def _run_inner(cases):
  env = dict(os.environ, EFFJAX_WS_INNER="1", JAX_PLATFORMS="cpu", PJRT_NPROC="32")
  ids = " or ".join(_case_id(c) for c in cases)
  r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
                      "-n", "0", "-m", "", os.path.abspath(__file__), "-k", ids],
                     cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
  assert r.returncode == 0 and f"{len(cases)} passed" in r.stdout, (
      r.stdout[-4000:] + r.stderr[-2000:])


@pytest.mark.slow
@pytest.mark.skipif(INNER, reason="the outer test")
def test_ws_matches_the_plain_forward_in_interpret_mode():
  _run_inner(CASES + SLOW_CASES)


def _on_hopper():
  try:
    return jax.default_backend() == "gpu" and str(
        jax.devices()[0].compute_capability).startswith("9.")
  except (AttributeError, RuntimeError):
    return False


@pytest.mark.gpu
@pytest.mark.skipif(not _on_hopper(), reason="needs a Hopper (sm_90) GPU")
@pytest.mark.parametrize("case", CASES + SLOW_CASES, ids=_case_id)
def test_ws_matches_the_plain_forward_on_hopper(case, monkeypatch):
  real = mosaic_gpu.flash_attention
  monkeypatch.setattr(mosaic_gpu, "flash_attention",
                      lambda *a, interpret=True, **kw: real(*a, interpret=False, **kw))
  _run_case(case)


def test_ws_is_chosen_only_where_it_runs(monkeypatch):
  """Refused where it cannot run; opt-in (not chosen by default); ring sizes from the
  shared-memory budget."""
  from pallas_kernels.attention import mosaic_gpu_ws  # pylint: disable=g-import-not-at-top
  q = jnp.zeros((1, 64, 2, 64), jnp.bfloat16)
  with pytest.raises(ValueError, match="more than one query block"):
    mosaic_gpu.flash_attention(q, q, q, interpret=True, warp_specialized=True)

  def fail(*args, **kwargs):
    raise AssertionError("the warp-specialised forward ran without being asked for")
  monkeypatch.setattr(mosaic_gpu_ws, "call", fail)
  q = jax.random.normal(jax.random.PRNGKey(0), (1, 130, 2, 64), jnp.bfloat16)
  assert mosaic_gpu.flash_attention(q, q, q, interpret=True).shape == q.shape
  # Two consumers' q and P tiles plus a ring of >= 2 K^T / V slots: 4 slots at d 64, 2 at
  # d 128; d 192 and 256 do not fit (the single-warpgroup forward takes those).
  assert [mosaic_gpu_ws.slots_for("lssar", 2, d, 64, 128, True) for d in (64, 128, 192, 256)
          ] == [4, 2, None, None]

"""The warp-specialised Mosaic GPU kernels (pallas_kernels/attention/mosaic_gpu_ws.py: a
producer warpgroup and one or two consumers) against the single-warpgroup kernels of
mosaic_gpu.py: the same outputs and the same gradients (forward: two ping-pong consumers;
dq and dk/dv: in interpret mode two consumers at head_dim 64, one at 128), for every score, packed
documents, causal and not, GQA, ragged lengths, a consumer whose block is all padding.

Where it runs:
  * -m gpu: on a Hopper (test_ws_matches_the_plain_kernels_on_hopper), the real check;
  * GPU interpret mode on CPU, in a subprocess with PJRT_NPROC=32: one case (LSSAR,
    packed, causal, with gradients) in the default suite, all of them with -m slow. GPU
    interpret mode runs each warpgroup as a host thread whose barrier waits block inside
    XLA:CPU host callbacks; XLA sizes its CPU thread pools by the core count, so on a
    2-core host two blocked waits held every worker the third warpgroup needed and the
    kernel hung. PJRT_NPROC (read by XLA's PJRT CPU client) sizes those pools; with 32
    every case here runs, the consumers' ping-pong schedule included.
  * default suite also: the choice and refusal rules below, and the CUDA lowering of all
    three scores exported from CPU (test_attention_mgpu.py,
    test_warp_specialized_kernels_lower_to_mosaic_gpu).
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.attention import attention, mosaic_gpu, mosaic_gpu_ws

INNER = os.environ.get("EFFJAX_WS_INNER") == "1"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (score, packed, causal, T, q heads, kv heads, head_dim, gradients too)
CASES = [   # one pair of query blocks; GQA: the dk/dv ring (3 slots) wraps
    ("lssar", True, True, 100, 2, 1, 64, True),
]
SLOW_CASES = [
    ("lssar", True, True, 200, 2, 2, 64, True),       # two passes over the ring
    ("softmax", True, True, 200, 4, 2, 64, True),     # GQA, packed, causal, ragged
    ("lssa", True, False, 200, 2, 1, 64, False),
    ("lssar", False, False, 330, 2, 1, 64, True),     # more steps than ring slots
    ("softmax", False, True, 520, 2, 1, 128, False),  # head_dim 128 (a two-slot ring)
    ("lssa", True, True, 200, 2, 1, 128, True),       # one-consumer backward (interpret)
    ("lssa", False, True, 300, 2, 2, 64, True),
    ("softmax", False, False, 130, 2, 1, 64, True),   # the last consumer's block is padding
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

  used = []
  real = mosaic_gpu_ws.call_backward

  def counted(cfg, kind, *args):
    used.append(kind)
    return real(cfg, kind, *args)
  mosaic_gpu_ws.call_backward = counted
  try:
    got = attend(True)
  finally:
    mosaic_gpu_ws.call_backward = real
  want = attend(False)
  assert sorted(set(used)) == (["dkv", "dq"] if grads else []), used
  for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.all(np.isfinite(a)), name
    # The same maths in the same order per query row: equal up to the last bf16 rounding.
    np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-2 * max(1.0, np.abs(b).max()),
                               err_msg=name)
  return max(float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())
             for a, b in zip(got, want))


@pytest.mark.skipif(not INNER, reason="runs inside test_ws_matches_the_plain_forward's "
                    "subprocess (PJRT_NPROC=32)")
@pytest.mark.parametrize("case", CASES + SLOW_CASES, ids=_case_id)
def test_inner_ws_case(case):
  import faulthandler  # pylint: disable=g-import-not-at-top
  faulthandler.dump_traceback_later(240, exit=True)   # a hang fails this case, not CI
  try:
    print(f"\n{_case_id(case)}: max |ws - plain| over outputs and gradients {_run_case(case):.2e}")
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


@pytest.mark.skipif(INNER, reason="the outer test")
def test_ws_matches_the_plain_kernels_in_interpret_mode():
  _run_inner(CASES)


@pytest.mark.slow
@pytest.mark.skipif(INNER, reason="the outer test")
def test_ws_matches_the_plain_kernels_in_interpret_mode_all_cases():
  _run_inner(SLOW_CASES)


def _on_hopper():
  try:
    return jax.default_backend() == "gpu" and str(
        jax.devices()[0].compute_capability).startswith("9.")
  except (AttributeError, RuntimeError):
    return False


@pytest.mark.gpu
@pytest.mark.skipif(not _on_hopper(), reason="needs a Hopper (sm_90) GPU")
@pytest.mark.parametrize("case", CASES + SLOW_CASES, ids=_case_id)
def test_ws_matches_the_plain_kernels_on_hopper(case, monkeypatch):
  real = mosaic_gpu.flash_attention
  monkeypatch.setattr(mosaic_gpu, "flash_attention",
                      lambda *a, interpret=True, **kw: real(*a, interpret=False, **kw))
  _run_case(case)


def test_ws_is_chosen_only_where_it_runs(monkeypatch):
  """Refused where it cannot run; opt-in (not chosen by default); ring sizes from the
  shared-memory budget."""
  q = jnp.zeros((1, 64, 2, 64), jnp.bfloat16)
  with pytest.raises(ValueError, match="more than one query block"):
    mosaic_gpu.flash_attention(q, q, q, interpret=True, warp_specialized=True)
  # The same through the dispatcher (implementation=interpret_mgpu_ws, a model's
  # model.attention.impl), naming the backend; head_dim 192 has no ring that fits.
  with pytest.raises(ValueError, match="interpret_mgpu_ws.*more than one query block"):
    attention(q, q, q, implementation="interpret_mgpu_ws")
  q192 = jnp.zeros((1, 256, 2, 192), jnp.bfloat16)
  assert "head_dim <= 128" in mosaic_gpu.supports(q192, q192, interpret=True,
                                                  warp_specialized=True)
  assert mosaic_gpu.supports(q192, q192, interpret=True) is None

  def fail(*args, **kwargs):
    raise AssertionError("a warp-specialised kernel ran without being asked for")
  monkeypatch.setattr(mosaic_gpu_ws, "call", fail)
  monkeypatch.setattr(mosaic_gpu_ws, "call_backward", fail)
  q = jax.random.normal(jax.random.PRNGKey(0), (1, 130, 2, 64), jnp.bfloat16)
  assert mosaic_gpu.flash_attention(q, q, q, interpret=True).shape == q.shape
  loss = lambda q: mosaic_gpu.flash_attention(q, q, q, interpret=True).astype(jnp.float32).sum()
  jax.jit(jax.grad(loss)).trace(q)   # tracing the gradient traces the backward kernels
  # Two consumers' q tiles (and, in interpret mode, P tiles) plus a ring of >= 2 K / V
  # slots: 4 slots at d 64, 2 at d 128; d 192 and 256 do not fit (the single-warpgroup
  # forward takes those).
  for copies in (True, False):
    assert [mosaic_gpu_ws.slots_for("lssar", 2, d, 64, 128, True, copies)
            for d in (64, 128, 192, 256)] == [4, 2, None, None]
  # The backward in interpret mode, with transposed copies and SMEM dS / P^T tiles: two
  # consumers (their q, dO, dS and fp32 dq tiles; k, v, P^T, dS^T and fp32 staging for
  # dk/dv) and a ring of >= 2 slots at d 64, one consumer at 128, none at 192. On a Hopper
  # (transpose_ref, A operands in registers) two consumers fit at 128, one at 192.
  assert [mosaic_gpu_ws.bwd_plan("dq", "lssar", 2, d, 64, 64, True, copies=True)
          for d in (64, 128, 192)] == [(2, 4), (1, 2), None]
  assert [mosaic_gpu_ws.bwd_plan("dkv", "softmax", 2, d, 64, 64, False, copies=True)
          for d in (64, 128, 192)] == [(2, 3), (1, 2), None]
  for kind in ("dq", "dkv"):
    assert [mosaic_gpu_ws.bwd_plan(kind, "lssar", 2, d, 64, 64, True)
            for d in (64, 128, 192)] == [(2, 4), (2, 2), (1, 2)], kind

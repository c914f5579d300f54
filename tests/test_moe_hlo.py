"""The ragged_dot lowering check (effjax/models/moe_hlo.py) and the MoE benchmark's
accelerator flags (effjax/models/moe_bench.py)."""

import jax
import jax.numpy as jnp

from effjax.models import moe_bench, moe_hlo


def test_checker_tells_dense_all_expert_work_from_a_grouped_matmul():
  """The defining property: a program doing every token x every expert reads 'dense', one
  doing only the grouped FLOPs reads 'grouped'; the verdict comes from the compiled HLO."""
  n, d, f, e = 256, 32, 64, 8
  x = jax.ShapeDtypeStruct((n, d), jnp.float32)
  w = jax.ShapeDtypeStruct((e, d, f), jnp.float32)
  grouped = 2.0 * n * d * f
  dense = moe_hlo.inspect_program("dense", lambda x, w: jnp.einsum("nd,edf->enf", x, w),
                                  (x, w), grouped, e)
  assert dense.verdict.startswith("dense") and dense.flops >= e / 2 * grouped
  assert dense.largest_dot == e * n * f
  one = moe_hlo.inspect_program("grouped", lambda x, w: x @ w[0], (x, w), grouped, e)
  assert one.verdict == "grouped" and one.ragged_ops == 0
  assert moe_hlo.classify(0.0, grouped, e, ("__cudnn$ragged_dot",)).startswith("library")


def test_ragged_dot_report_covers_forward_and_both_gradients():
  rows = moe_hlo.inspect_ragged_dot(256, 32, 64, 4, "bfloat16")
  assert [r.name for r in rows] == list(moe_hlo.PASSES)
  for r in rows:
    assert r.flops > 0 and r.grouped_flops == 2.0 * 256 * 32 * 64 and r.verdict
  if jax.default_backend() == "cpu":  # XLA CPU loops over all experts
    assert all(r.verdict.startswith("dense") for r in rows)
  assert "| wgrad (W) |" in moe_hlo.table(rows)


def test_moe_bench_accelerator_flags(tmp_path, capsys):
  out = tmp_path / "moe.md"
  moe_bench.main(["--tokens=256", "--d=16", "--d-ff=32", "--experts=4", "--top-k=2",
                  "--dispatch=ragged_dot", "--capacity-factor=0,1.25", "--dtype=bfloat16",
                  "--grad-x", "--repeats=1", "--hlo", f"--out={out}"])
  text = out.read_text()
  assert "bfloat16" in text and "gradients of params and input" in text
  assert "| capacity 1.25 | 4 | 2 |" in text and "| ragged_dot | 4 | 2 |" in text
  assert "ragged_dot lowering, E=4" in text and "| dgrad (x) |" in text

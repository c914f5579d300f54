"""Behaviour guard for refactors: the first 30 training losses of four configurations
(quick-start model, MoE with ALF-LB, QuEST W4A4, LSSA) stay bit-identical on CPU to the values
recorded in tests/golden/losses.json (see tests/golden/record.py for how and when to re-record).

Exact equality is intended: a pure refactor changes no floating-point operation. XLA's CPU
code can differ between processor families and JAX versions, so the check is for the machine
class CI runs on and the JAX version the losses were recorded with (others skip).
"""

import json
import os

import pytest

from tests.golden import record


@pytest.fixture(scope="module")
def golden():
  with open(os.path.join(record.HERE, "losses.json")) as f:
    return json.load(f)


@pytest.mark.parametrize("name", sorted(record.CASES))
def test_first_training_losses_are_bit_identical(name, golden, tmp_path):
  import jax
  if jax.__version__ != golden["jax"]:
    pytest.skip(f"recorded with jax {golden['jax']}; XLA's numerics differ across versions")
  want = golden["losses"][name]
  assert len(want) == golden["steps"] and len(set(want)) > 10  # a real curve, not a constant
  got = record.run_case(name, str(tmp_path))
  assert got == want, f"{name}: first differing step {next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)}"

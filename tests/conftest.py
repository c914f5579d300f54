"""Shared test fixtures. Tests run on CPU with tiny models (docs/architecture.md)."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.py")


def run_module(args, *, env_extra=None, timeout=600, cwd=None):
  """Runs `python -m ...` in a subprocess (used for CLI and multi-device tests)."""
  env = dict(os.environ)
  env.update(env_extra or {})
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                        env=env, cwd=cwd or REPO)


@pytest.fixture
def tiny_config_path():
  return TINY

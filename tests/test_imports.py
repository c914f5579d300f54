"""Every module of the package imports (a syntax or import error in a command that no other
test runs, e.g. a study script, fails here rather than in a user's hands)."""

import importlib
import pkgutil

import pytest

import effjax
import pallas_kernels

MODULES = sorted(m.name for pkg in (effjax, pallas_kernels)
                 for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")
                 if not m.name.endswith("__main__"))


def test_the_package_has_modules():
  assert len(MODULES) > 50 and "effjax.experiments.moe_balancing" in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_module_imports(name):
  importlib.import_module(name)

"""Benchmarks that span the package (effjax/bench/accelerator.py)."""

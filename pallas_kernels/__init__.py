"""Kernels behind a dispatch: one folder per op, each with a pure-jnp reference (the spec),
Pallas implementations where written, an `implementation=` argument, tests against the
reference and a benchmark."""

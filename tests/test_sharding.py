"""Sharding plumbing on 8 forced CPU devices (issue 4): activation constraints from logical
axes, the jitted sharded initial state, the hybrid (DCN) mesh checks, the batch slot a
process feeds. Runs in a subprocess because the device count is fixed at JAX start-up."""

import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import PartitionSpec as P
    from effjax import checks, config as C, models
    from effjax.optim import make_optimizer
    from effjax.parallel import sharding
    from effjax.train import plan as state_init

    assert jax.device_count() == 8
    cfg, _ = checks.load(["--config=configs/tiny.py", "--config.mesh.data=1",
                          "--config.mesh.fsdp=4", "--config.mesh.tensor=2"], num_devices=8)
    mesh, rules = sharding.make_mesh(cfg.mesh), sharding.rules_for(cfg.mesh)
    vocab = 257

    # 1. constrain(): the identity outside activation_sharding, a sharding constraint inside.
    model = models.build(cfg, vocab)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, vocab, (8, 16)), jnp.int32)
    fwd = lambda p, b, x: model.apply(p, b, x)[0]
    plain = jax.jit(fwd).lower(model.initial_params, model.initial_buffers, ids).as_text()
    assert "sharding_constraint" not in plain and "Sharding" not in plain
    # A fresh function: jit's trace cache is keyed on the function, not on the context.
    fwd_sharded = lambda p, b, x: model.apply(p, b, x)[0]
    with sharding.activation_sharding(mesh, rules):
      lowered = jax.jit(fwd_sharded).lower(model.initial_params, model.initial_buffers, ids)
      logits = jax.jit(fwd_sharded)(model.initial_params, model.initial_buffers, ids)
    text = lowered.as_text()
    # Shardy lowers a constraint to sdy.sharding_constraint, GSPMD to a @Sharding custom call.
    constraints = text.count("sdy.sharding_constraint") + text.count("@Sharding")
    assert constraints >= cfg.model.n_layers + 2, constraints  # embed, each block, logits
    want = jax.sharding.NamedSharding(mesh, P(("data", "fsdp"), None, "tensor"))
    assert logits.sharding.is_equivalent_to(want, 3), logits.sharding.spec  # size-1 'data' may drop
    ref = fwd(model.initial_params, model.initial_buffers, ids)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref), rtol=1e-5, atol=1e-5)

    # 2. init_state: every parameter is created in its mesh placement, with the values the
    #    same jitted init gives on one device (partitionable PRNG: values do not depend on
    #    the mesh), and within an ulp of the eager host build (XLA fuses the jitted init's
    #    truncated-normal arithmetic differently from op-by-op execution).
    groups = sharding.batch_shards(dict(mesh.shape), rules)
    abstract = state_init.abstract_model(cfg, vocab, groups)
    tx, _ = make_optimizer(cfg, abstract.specs)
    shard = state_init.state_shardings(abstract, tx, mesh, rules)
    state = state_init.init_state(cfg, vocab, groups, tx, shard)
    mesh1 = sharding.make_mesh(C.MeshConfig(data=1), jax.devices()[:1])
    state1 = state_init.init_state(cfg, vocab, groups, tx,
                                   state_init.state_shardings(abstract, tx, mesh1, rules))
    host = models.build(cfg, vocab, batch_groups=groups)
    flat_state = jax.tree_util.tree_leaves_with_path(state.params)
    flat_one = dict(jax.tree_util.tree_leaves_with_path(state1.params))
    flat_host = dict(jax.tree_util.tree_leaves_with_path(host.initial_params))
    sharded = 0
    for path, leaf in flat_state:
      np.testing.assert_array_equal(np.asarray(leaf), np.asarray(flat_one[path]), err_msg=str(path))
      np.testing.assert_allclose(np.asarray(leaf), np.asarray(flat_host[path]), rtol=1e-6,
                                 atol=1e-9, err_msg=str(path))
      sharded += len(leaf.sharding.device_set) == 8 and not leaf.sharding.is_fully_replicated
    assert sharded >= 4, sharded  # the matrices are split, not replicated
    assert int(state.step) == 0

    # 2b. Per-weight QAT buffers (oscillation EMAs, the CGA mask) are sharded like their
    #     kernel; scalar buffers stay replicated.
    qcfg, _ = checks.load(["--config=configs/tiny.py", "--config.mesh.data=1",
                           "--config.mesh.fsdp=4", "--config.mesh.tensor=2",
                           "--config.quant.method=statsq", "--config.quant.act_bits=8",
                           "--config.quant.cga_start=0.5"], num_devices=8)
    qplan = state_init.plan_state(qcfg, vocab, mesh, rules)
    up = qplan.shardings.buffers["blocks"]["layers"][0]["ffn"]["up"]["weight_quant"]
    kernel = qplan.shardings.params["blocks"]["layers"][0]["ffn"]["up"]["kernel"]
    for name in ("osc_ema", "osc_code", "cga_frozen"):
      assert up[name].spec == kernel.spec and not up[name].is_fully_replicated, (name, up[name])
    assert up["osc_started"].is_fully_replicated

    # 3. mesh.dcn.*: must divide the axis; asks for slices the devices do not have -> named error.
    for dcn, match in ((["--config.mesh.dcn.fsdp=3"], "mesh.dcn.fsdp (3) must be >= 1 and divide"),
                       (["--config.mesh.dcn.fsdp=2"], "asks for 2 slices")):
      try:
        bad, _ = checks.load(["--config=configs/tiny.py", "--config.mesh.data=1",
                              "--config.mesh.fsdp=4", "--config.mesh.tensor=2", *dcn],
                             num_devices=8)
        sharding.make_mesh(bad.mesh)
      except C.ConfigError as e:
        assert match in str(e), str(e)
      else:
        raise AssertionError(f"no ConfigError for {dcn}")

    # 4. One process feeds the whole batch.
    assert sharding.process_batch_slot(sharding.batch_sharding(mesh, rules), 16) == (0, 1)
    print("SHARDING-OK")
""")


def test_activation_constraints_sharded_init_and_dcn_checks():
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  r = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 0 and "SHARDING-OK" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]


class _FakeDevice:
  def __init__(self, process_index, id_):
    self.process_index, self.id = process_index, id_

  def __hash__(self):
    return hash(self.id)


class _FakeSharding:
  """devices_indices_map of a batch sharding: device i (of process owner[i]) holds row
  block i of len(owner) equal blocks."""

  def __init__(self, owner):
    self.owner = owner

  def devices_indices_map(self, shape):
    b = shape[0] // len(self.owner)
    return {_FakeDevice(p, i): (slice(i * b, (i + 1) * b),) for i, p in enumerate(self.owner)}


def test_process_batch_slot_on_interleaved_shared_and_bad_meshes():
  """Topology-aware meshes interleave hosts along the batch axis (host 0 holds row blocks
  0, 2, 4, 6 of a v5p 2x2x2 mesh): each process still gets one slot; processes holding the
  same rows share a slot; slots are numbered by their smallest row; unequal splits fail."""
  from effjax import config as C
  from effjax.parallel.sharding import process_batch_slot
  interleaved = _FakeSharding([0, 1, 0, 1, 0, 1, 0, 1])
  assert [process_batch_slot(interleaved, 16, p) for p in (0, 1)] == [(0, 2), (1, 2)]
  reordered = _FakeSharding([1, 1, 0, 0])  # process 1 holds the first rows
  assert [process_batch_slot(reordered, 8, p) for p in (0, 1)] == [(1, 2), (0, 2)]
  # Four processes, a batch-replicated axis across process pairs (0, 2) and (1, 3).
  shared = _FakeSharding([0, 1])
  shared.devices_indices_map = lambda shape: {
      _FakeDevice(p, p): (slice((p % 2) * 4, (p % 2) * 4 + 4),) for p in range(4)}
  assert [process_batch_slot(shared, 8, p) for p in range(4)] == [(0, 2), (1, 2), (0, 2), (1, 2)]
  with pytest.raises(C.ConfigError, match="equal disjoint parts"):
    process_batch_slot(_FakeSharding([0, 0, 0, 1]), 8, 0)

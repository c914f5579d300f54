"""Device mesh, logical-axis -> mesh-axis rules, sharded state initialisation.

Multi-host start-up is effjax/distributed.py; the sharded initial state and the step
assembly are effjax/train/plan.py.
"""
from effjax.parallel.sharding import (DEFAULT_RULES, activation_sharding, batch_sharding,
                                      batch_shards, constrain, logical_to_spec, make_mesh,
                                      param_shardings, process_batch_slot, replicated,
                                      resolve_mesh_shape, rules_for)

__all__ = ["DEFAULT_RULES", "activation_sharding", "batch_sharding", "batch_shards", "constrain",
           "logical_to_spec", "make_mesh", "param_shardings", "process_batch_slot", "replicated",
           "resolve_mesh_shape", "rules_for"]

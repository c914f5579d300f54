"""Device mesh and logical-axis sharding rules."""
from effjax.parallel.sharding import (DEFAULT_RULES, batch_sharding, logical_to_spec, make_mesh,
                                      param_shardings, replicated)

__all__ = ["DEFAULT_RULES", "batch_sharding", "logical_to_spec", "make_mesh", "param_shardings",
           "replicated"]

"""Device mesh from the config and logical-axis → mesh-axis rules (one table per strategy).

Weights carry logical axis names as metadata only: jaxllm places them itself (abstract-first
init with explicit `out_shardings`), so flax's eager sharding of each new variable — which
would need a mesh whose axes *are* the logical names — is turned off here, once.
"""

import flax

from jaxllm.sharding.mesh import make_mesh, validate_mesh
from jaxllm.sharding.rules import RULES, constrain, logical_spec, use_rules

flax.config.update("flax_always_shard_variable", False)

__all__ = ["RULES", "constrain", "logical_spec", "make_mesh", "use_rules", "validate_mesh"]

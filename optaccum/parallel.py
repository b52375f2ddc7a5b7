"""Data-parallel accumulation: one cross-replica reduction per window.

`accumulate` and `microbatch` take the replicas' axis themselves (`axis_name=`,
inside `jax.shard_map`/`pmap` or under plain `jax.jit` over a mesh); the
functions here prepare what they take.
"""

from optaccum._data_parallel import data_parallel as data_parallel
from optaccum._per_replica import per_replica as per_replica

__all__ = ["data_parallel", "per_replica"]

"""Data-parallel accumulation: one cross-replica reduction per window.

`accumulate` and `microbatch` take the replicas' axis themselves (`axis_name=`,
inside `jax.shard_map`/`pmap` or under plain `jax.jit` over a mesh); the
functions here prepare what they take, and `shard_optimizer` lays the inner
optimizer's state over the replicas (ZeRO-1).
"""

from optaccum._data_parallel import data_parallel as data_parallel
from optaccum._per_replica import per_replica as per_replica
from optaccum._shard_optimizer import shard_optimizer as shard_optimizer

__all__ = ["data_parallel", "per_replica", "shard_optimizer"]

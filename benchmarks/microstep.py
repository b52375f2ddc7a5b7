"""One optimizer micro-step, with no model: what accumulation itself costs.

~8M float32 parameters in four matrices, AdamW, k=8. The "batch" of each
micro-step is a gradient tree, so every method runs its optimizer-side work
only, with donated parameters and state; the floor is a bare `acc + g` tree
add in the same process.

Run: python -m benchmarks --workloads microstep [--quick]
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks._methods import Workload


def make_params(total: int) -> dict[str, jax.Array]:
  """Four equal float32 matrices holding about `total` parameters."""
  side = int(np.sqrt(total / 4))
  rng = np.random.default_rng(0)
  return {f"w{i}": jnp.asarray(rng.normal(size=(side, side)), jnp.float32) for i in range(4)}


def _gradients_are_the_batch(params: Any, batch: Any) -> tuple[jax.Array, Any]:
  del params
  return jnp.zeros((), jnp.float32), batch


def workload(total_params: int, every_k: int) -> Workload:
  """The optimizer-only micro-step over about `total_params` parameters."""
  params = make_params(total_params)
  rng = np.random.default_rng(1)
  micro_batches = [
    jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * 1e-3, p.dtype), params)
    for _ in range(every_k)
  ]
  num_params = sum(leaf.size for leaf in jax.tree.leaves(params))
  return Workload(
    key="microstep",
    title="(a) Optimizer-only micro-step",
    description=(
      f"{num_params / 1e6:.1f}M float32 params in 4 matrices, gradients given; adamw, k={every_k}"
    ),
    params=params,
    micro_batches=micro_batches,
    whole_batch=None,
    grad_fn=_gradients_are_the_batch,
    with_model=False,
  )

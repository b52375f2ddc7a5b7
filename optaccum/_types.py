"""Names for the trees optaccum takes and returns, so that signatures say what they hold.

A leaf module: it imports nothing from optaccum.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeAlias

import jax
import optax

#: The parameters: a pytree of arrays (optax's alias).
Params: TypeAlias = optax.Params
#: Gradients or updates shaped like the parameters, None where a parameter gets none.
Updates: TypeAlias = optax.Updates
#: An optimizer state: any pytree, optax's and optaccum's states nested in it.
OptState: TypeAlias = optax.OptState
#: A pytree of arrays: a batch, an aux output, a model's state.
PyTree: TypeAlias = Any
#: A scalar array or Python number, traced or concrete (a weight, a flag).
Scalar: TypeAlias = jax.Array | float | int | bool
#: The number of micro-batches per window: an int, or a schedule of the gradient step.
KSchedule: TypeAlias = int | Callable[[jax.Array], Any]
#: A dtype or something `jnp.dtype` accepts.
DTypeLike: TypeAlias = Any

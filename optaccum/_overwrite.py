"""Flax's fp8 "overwrite with gradient" variables: combined by their largest value, not summed.

Flax's fp8 ops (`flax.linen.Fp8DirectDotGeneralOp`) keep amax histories and scales in
the `_overwrite_with_gradient` collection; their "gradients" are the new values,
which replace the old (`TrainState.apply_gradients` does so). Within one step,
`microbatch` gives them the largest value its micro-batches produced: the amax
that one forward over all of the step's rows would record (amax histories and
scales are non-negative and grow with the amax). Across steps each micro-step's
forward records its own, as Flax's `TrainState` does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from optaccum._types import PyTree

#: `flax.linen.fp8_ops.OVERWRITE_WITH_GRADIENT`, spelt out so as not to import Flax.
KEY = "_overwrite_with_gradient"


def split(tree: PyTree) -> tuple[PyTree, PyTree]:
  """`tree` without its overwrite-with-gradient collection, and that collection (or None)."""
  if not (isinstance(tree, Mapping) and KEY in tree):
    return tree, None
  return {name: value for name, value in tree.items() if name != KEY}, tree[KEY]


def join(tree: PyTree, overwritten: PyTree) -> Any:
  """`tree` with the collection put back (as it was split off, last)."""
  return tree if overwritten is None else {**tree, KEY: overwritten}


def largest(stack: jax.Array) -> jax.Array:
  """The largest of a leaf's values, stacked along the first axis (the micro-batches)."""
  return jnp.max(stack, axis=0)

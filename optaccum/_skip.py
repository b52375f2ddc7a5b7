"""Skip policies: decide whether a micro-batch enters the accumulation window.

A policy has the form of `optax.MultiSteps`' `should_skip_update_fn`:
`policy(gradients, gradient_step, params) -> (should_skip, skip_state)`, where
`should_skip` is a scalar bool array and `skip_state` any pytree (kept in the
optimizer state for monitoring). A skipped micro-batch leaves the window as if it
had never been seen, and the state counts it in `num_skipped`.
"""

from __future__ import annotations

from typing import Protocol

import jax
import jax.numpy as jnp

from optaccum import _validation
from optaccum._branching import run_if
from optaccum._types import Params, PyTree, Updates


class SkipPolicy(Protocol):
  """The form of a skip policy (same as optax's `ShouldSkipUpdateFunction`)."""

  def __call__(
    self, updates: Updates, gradient_step: jax.Array, params: Params
  ) -> tuple[jax.Array, PyTree]:
    """Returns `(should_skip, skip_state)` for one micro-batch's gradients."""
    ...


def _leaves(where: str, tree: Updates) -> list[jax.Array]:
  """The array leaves of a policy's `updates`; a TypeError naming `where` for any other leaf."""
  _validation.check_arrays(where, "updates", tree)
  return jax.tree.leaves(tree)


def squared_norm(leaves: list[jax.Array]) -> jax.Array:
  """The float32 sum of squared magnitudes of `leaves`, whatever their dtypes (complex too)."""
  total = jnp.zeros((), jnp.float32)
  for leaf in leaves:
    magnitude = jnp.abs(leaf) if jnp.iscomplexobj(leaf) else leaf
    total += jnp.sum(jnp.square(magnitude.astype(jnp.float32)))
  return total


# Entries counted at once. XLA on CPU materializes the int32 mask of a large
# count (a temporary the size of the gradient, as large as the gradients of
# the biggest layer); counted a block of rows at a time, the mask stays small.
_COUNT_BLOCK = 1 << 16
_MAX_COUNT_BLOCKS = 4096


def _count_not_finite(leaf: jax.Array) -> jax.Array:
  """The int32 number of inf and NaN entries of `leaf`."""

  def count(x: jax.Array) -> jax.Array:
    return jnp.sum(~jnp.isfinite(x), dtype=jnp.int32)

  if leaf.ndim < 2 or leaf.size <= _COUNT_BLOCK:
    return count(leaf)
  rows = leaf.shape[0]
  # Rows per block: the largest divisor of `rows` that keeps a block within
  # _COUNT_BLOCK entries, so the blocks are a reshape, not a copy.
  most = max(1, _COUNT_BLOCK // (leaf.size // rows))
  per_block = max(d for d in range(1, min(rows, most) + 1) if rows % d == 0)
  if rows // per_block > _MAX_COUNT_BLOCKS:
    return count(leaf)
  blocks = jnp.reshape(leaf, (rows // per_block, -1))
  return jnp.sum(jax.lax.map(count, blocks))


def any_not_finite_in(leaves: list[jax.Array]) -> jax.Array:
  """Whether any entry of `leaves` is NaN or infinite: a scalar bool.

  A logical-or reduction of `~isfinite`, never a max: XLA's max reduction on
  CPU drops NaN from vectorized blocks, so `isfinite(max |g|)` missed a lone
  NaN in any leaf of 4096 or more entries. An or-reduction has no such case.
  (A sum of `0 * g` is as correct, but on CPU it left a temporary the size of
  the gradients where this leaves a quarter of it: tests/test_memory.py.)
  """
  found = jnp.zeros((), jnp.bool_)
  for leaf in leaves:
    if leaf.size:
      found = found | jnp.any(~jnp.isfinite(leaf))
  return found


def skip_not_finite(
  updates: Updates, gradient_step: jax.Array, params: Params | None = None
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Skips a micro-batch whose gradients hold any inf or NaN.

  Args:
    updates: the micro-batch's gradients.
    gradient_step: the current gradient step (unused).
    params: the current parameters (unused).

  Returns:
    `(should_skip, {"should_skip": ..., "num_not_finite": ...})`, where
    `num_not_finite` is the int32 count of non-finite gradient entries.

  Raises:
    TypeError: if a leaf of `updates` is not a JAX or NumPy array (a Python
      number, a list).

  Examples:
    >>> import jax.numpy as jnp
    >>> import optaccum
    >>> skip, info = optaccum.skip.not_finite({"w": jnp.array([1.0, jnp.nan])}, 0)
    >>> bool(skip), int(info["num_not_finite"])
    (True, 1)
  """
  del gradient_step, params
  leaves = _leaves("skip.not_finite", updates)
  any_not_finite = any_not_finite_in(leaves)

  def count(_: jax.Array) -> jax.Array:
    total = jnp.zeros((), jnp.int32)
    for leaf in leaves:
      total += _count_not_finite(leaf)
    return total

  # A conditional, not a 0/1-trip loop: it only reads the gradients. The zeros
  # come from the verdict, so that under `shard_map` they vary over the same
  # mesh axes as the count (both follow the gradients).
  none_found = jnp.zeros_like(any_not_finite, jnp.int32)
  num_not_finite = run_if("cond", any_not_finite, count, none_found)
  # The same decision, made to depend on the count: whatever reads the verdict
  # (the accumulator's add, the window's conditional) then runs after the
  # count, so XLA can prove the gradients are read by then and reuse their
  # memory in place (for the window's updates) instead of copying them.
  should_skip = any_not_finite | (num_not_finite > 0)
  return should_skip, {"should_skip": should_skip, "num_not_finite": num_not_finite}


def skip_large_updates(
  updates: Updates,
  gradient_step: jax.Array,
  params: Params | None = None,
  max_squared_norm: float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Skips a micro-batch whose squared global gradient norm is too large (or NaN).

  The norm is computed in float32 whatever the gradient dtype. The threshold
  is the fourth argument, as in `optax.skip_large_updates`: bind it with
  `functools.partial`, by position or by name.

  Args:
    updates: the micro-batch's gradients.
    gradient_step: the current gradient step (unused).
    params: the current parameters (unused).
    max_squared_norm: the largest accepted squared global norm; required: a
      finite positive number (a Python or NumPy number, or a 0-d array of a
      real dtype; a traced one is checked for its type and shape only).

  Returns:
    `(should_skip, {"should_skip": ..., "norm_squared": ...})`.

  Raises:
    TypeError: if `max_squared_norm` is missing, or a leaf of `updates` is not
      a JAX or NumPy array.
    ValueError: if `max_squared_norm` is not a finite positive number (NaN,
      inf, 0, a negative number, a bool, a string): such a threshold would
      skip every micro-batch, or read True as 1.0.

  Examples:
    >>> import functools
    >>> import jax.numpy as jnp
    >>> import optaccum
    >>> policy = functools.partial(optaccum.skip.large_updates, max_squared_norm=1.0)
    >>> bool(policy({"w": jnp.array([3.0, 4.0])}, 0)[0])
    True
    >>> bool(optaccum.skip.large_updates({"w": jnp.array([0.5])}, 0, None, 1.0)[0])
    False
  """
  del gradient_step, params
  threshold = _threshold(max_squared_norm)
  norm_squared = squared_norm(_leaves(_LARGE_UPDATES, updates))
  # `not (x < max)` is also True where the norm is NaN.
  should_skip = ~(norm_squared < threshold)
  return should_skip, {"should_skip": should_skip, "norm_squared": norm_squared}


_LARGE_UPDATES = "skip.large_updates"


def _threshold(max_squared_norm: object) -> jax.Array:
  """`max_squared_norm` as a float32 scalar, checked: a finite positive real number.

  A traced threshold (a jitted argument) has no value to check here: its
  dtype and shape are.
  """
  if max_squared_norm is None:
    raise TypeError(
      f"`{_LARGE_UPDATES}(max_squared_norm=...)` is required: the largest accepted "
      "squared global norm, e.g. "
      "functools.partial(optaccum.skip.large_updates, max_squared_norm=1e4)."
    )
  if isinstance(max_squared_norm, jax.core.Tracer):
    _validation.as_scalar(_LARGE_UPDATES, "max_squared_norm", max_squared_norm, jnp.float32)
    return jnp.asarray(max_squared_norm).astype(jnp.float32)
  number = _validation.as_number(
    _LARGE_UPDATES, "max_squared_norm", max_squared_norm, positive=True, finite=True
  )
  return jnp.float32(number)

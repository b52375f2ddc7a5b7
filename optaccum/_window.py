"""What a window is, written once: admitting a micro-batch, adding it, finishing the sum.

Every form of accumulation is a shell over these rules: the transformation
and its fast path (`accumulate`, `apply_gradients`, `compat.MultiSteps`), whose
window spans several calls, and `microbatch`, whose window is one call's scan.
So a weight means the same in every form:

* a weight that is NaN, infinite or negative skips its micro-batch: it adds
  nothing (not even a NaN of its own gradient), and its weight is 0;
* a weight of 0 adds nothing (not even a NaN), but the micro-batch still
  happened;
* the window's value is `sum(w_i x_i) / sum(w_i)` for a mean, `sum(w_i x_i)`
  for a sum, formed in at least float32 and cast to the leaf's dtype; a window
  of zero total weight has no mean (the forms give zeros and take no step).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from optaccum._accumulator import Accumulator, finish, inverse_weight
from optaccum._types import DTypeLike


def admit(
  weight: jax.Array | None, skip: jax.Array | None = None
) -> tuple[jax.Array | None, jax.Array]:
  """A micro-batch's skip decision and its weight in the window.

  Args:
    weight: its float32 weight (a scalar, or one per replica), or None for an
      unweighted micro-batch.
    skip: a skip policy's scalar bool decision, or None without a policy.

  Returns:
    `(skip, weight)`: the decision (None when nothing can skip, i.e. unweighted
    without a policy) and the float32 weight, 0 where skipped. Replicas skip
    together: one bad replica's weight skips the micro-step.
  """
  if weight is None:
    return skip, jnp.ones((), jnp.float32) if skip is None else jnp.where(
      skip, jnp.float32(0), jnp.float32(1)
    )
  # `not (w >= 0)` also holds for NaN; inf fails `isfinite`.
  bad = ~jnp.all((weight >= 0) & jnp.isfinite(weight))
  skip = bad if skip is None else skip | bad
  return skip, jnp.where(skip, jnp.float32(0), weight)


def add(
  accumulator: Accumulator,
  acc: jax.Array,
  x: jax.Array,
  weight: jax.Array | None,
  skip: jax.Array | None,
  seed: jax.Array | None = None,
) -> jax.Array:
  """`acc + weight * x` in the accumulator's dtype, or `acc` itself where `skip` holds.

  A select rather than a multiply by 0, so a skipped micro-batch's NaN does not
  enter the sum. `weight` None adds `x` unweighted (no multiply).
  """
  summed = accumulator.add(acc, x, weight, seed)
  if weight is not None:
    # A weight of 0 adds nothing, even a NaN: a micro-batch of no tokens has a
    # mean loss of 0/0, and 0 * NaN would still be NaN.
    summed = jnp.where(weight == 0, acc, summed)
  return summed if skip is None else jnp.where(skip, acc, summed)


def finisher(
  reduction: str, total_weight: jax.Array
) -> Callable[[jax.Array, DTypeLike], jax.Array]:
  """The window's value of each leaf, as every form takes it: `value(acc, dtype)`.

  `sum / total_weight` for `"mean"`, the sum itself for `"sum"`, formed in at
  least float32 and cast to `dtype`. The factor is computed once per window, a
  reciprocal, not a divide per leaf (see `_accumulator.inverse_weight`).
  """
  inverse = inverse_weight(reduction, total_weight)
  return lambda acc, dtype: finish(acc, inverse, dtype)

"""Learning-rate rules for an effective batch k times larger."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optaccum import _validation
from optaccum._types import KSchedule

_WHERE = "scale_learning_rate"
_RULES = ("linear", "sqrt")


def scale_learning_rate(
  learning_rate: float | optax.Schedule,
  k: KSchedule,
  *,
  rule: str = "linear",
) -> float | optax.Schedule:
  """Scales a learning rate (or schedule) for a batch `k` times larger.

  Accumulating k micro-batches multiplies the batch size by k. The linear rule
  multiplies the learning rate by k (Goyal et al., 2017; usual for SGD); the
  square-root rule by sqrt(k) (usual for Adam-type optimizers, Malladi et al.,
  2022). Both the learning rate and `k` may be schedules of the
  optimizer's step count (the gradient step, since the inner optimizer counts
  windows); the result is then a schedule too.

  A `k` schedule is read as `optaccum.accumulate` reads it, so the rate
  matches the window accumulate really runs: its value is floored to an int,
  and a value below 1 (or NaN, which cannot raise inside a compiled step)
  counts as a window of 1. At gradient step 0 it is probed once, as
  `accumulate` probes it: a NaN, inf or non-scalar there raises. A learning
  rate schedule is probed at step 0 too, where it may be 0 (a warmup).

  Args:
    learning_rate: a positive finite number (a Python or NumPy number, or a
      concrete 0-d JAX or NumPy array of a real dtype, which scales in its
      own dtype), or an optax schedule `step -> learning rate`.
    k: the window length: a positive int, or a schedule `step -> k`.
    rule: `"linear"` or `"sqrt"`.

  Returns:
    A float where both inputs are constant, else a schedule.

  Raises:
    ValueError: for a learning rate that is not a positive finite number (a
      bool, a non-scalar array; a schedule: not a finite non-negative real
      scalar at step 0), a bad `k` or `k` schedule (at step 0: no real
      scalar, NaN, inf, or above 2**31 - 1), a `rule` other than "linear" or
      "sqrt", or a scaled rate that overflows (at step 0, in float32, for a
      schedule).

  Examples:
    >>> import optaccum
    >>> optaccum.planning.scale_learning_rate(0.1, 4)
    0.4
    >>> optaccum.planning.scale_learning_rate(0.1, 4, rule="sqrt")
    0.2

  References:
    - Goyal et al., 2017, "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour".
    - Malladi et al., 2022, "On the SDEs and Scaling Rules for Adaptive Gradient
      Algorithms".
  """
  learning_rate = _check_learning_rate(learning_rate)
  _validation.check_k(_WHERE, k)
  _validation.check_choice(_WHERE, "rule", rule, _RULES)
  if not callable(learning_rate) and not callable(k):
    factor = k if rule == "linear" else math.sqrt(k)
    with np.errstate(over="ignore"):  # a NumPy float overflows to inf, checked below
      scaled_rate = learning_rate * factor
    _check_finite(scaled_rate, learning_rate, factor)
    return scaled_rate

  schedule_k = _validation.as_schedule(k, where=_WHERE)

  def scaled(step: jax.typing.ArrayLike) -> jax.Array:
    base = learning_rate(step) if callable(learning_rate) else learning_rate
    k = schedule_k(jnp.asarray(step)).astype(jnp.float32)
    factor = k if rule == "linear" else jnp.sqrt(k)
    return jnp.asarray(base, jnp.float32) * factor

  step = jnp.zeros((), jnp.int32)
  base = learning_rate(step) if callable(learning_rate) else learning_rate
  with np.errstate(over="ignore"):  # a rate beyond float32 casts to inf, checked here
    _check_finite(scaled(step), base, float(schedule_k(step)))
  return scaled


def _check_learning_rate(learning_rate: Any) -> Any:
  """A constant rate: a positive finite number; a schedule: finite and >= 0 at step 0.

  Returns the rate to scale: a concrete 0-d JAX array as the NumPy scalar of its
  dtype (so a float32 rate scales, and overflows, in float32 as a NumPy one does).
  """
  if not callable(learning_rate):
    number = _validation.as_number(_WHERE, "learning_rate", learning_rate, positive=True)
    if not math.isfinite(number):
      raise ValueError(
        f"`{_WHERE}(learning_rate=...)` must be finite, got learning_rate={learning_rate!r}."
      )
    return number
  value = learning_rate(jnp.zeros((), jnp.int32))
  if not _validation.is_real_scalar(value) or not 0 <= float(value) < math.inf:
    raise ValueError(
      f"`{_WHERE}(learning_rate=...)` must return a finite, non-negative real scalar, but "
      f"at step 0 it returned {value!r}."
    )
  return learning_rate


def _check_finite(scaled: object, learning_rate: object, factor: float) -> None:
  """Refuses a scaled rate that overflowed, naming the rate and the factor."""
  if not math.isfinite(float(scaled)):  # type: ignore[arg-type]  # a float or a scalar array
    raise ValueError(
      f"`{_WHERE}(learning_rate=...)` scaled by {factor:g} overflows: "
      f"{float(learning_rate):g} × {factor:g} is not a finite float"  # type: ignore[arg-type]
      f"{' (float32, at step 0)' if isinstance(scaled, jax.Array) else ''}."
    )

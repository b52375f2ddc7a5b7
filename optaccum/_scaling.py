"""Learning-rate rules for an effective batch k times larger."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from optaccum import _validation
from optaccum._types import KSchedule

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

  Args:
    learning_rate: a float, or an optax schedule `step -> learning rate`.
    k: the window length: a positive int, or a schedule `step -> k`.
    rule: `"linear"` or `"sqrt"`.

  Returns:
    A float where both inputs are constant, else a schedule.

  Examples:
    >>> import optaccum
    >>> optaccum.planning.scale_learning_rate(0.1, 4)
    0.4
    >>> optaccum.planning.scale_learning_rate(0.1, 4, rule="sqrt")
    0.2

  References:
    Goyal et al., 2017, "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour".
    Malladi et al., 2022, "On the SDEs and Scaling Rules for Adaptive Gradient
    Algorithms".
  """
  where = "scale_learning_rate"
  if not callable(learning_rate):
    _validation.check_number(where, "learning_rate", learning_rate, positive=True)
  _validation.check_k(where, k)
  _validation.check_choice(where, "rule", rule, _RULES)
  if not callable(learning_rate) and not callable(k):
    factor = k if rule == "linear" else math.sqrt(k)
    return learning_rate * factor

  schedule_k = _validation.as_schedule(k)

  def scaled(step: jax.typing.ArrayLike) -> jax.Array:
    base = learning_rate(step) if callable(learning_rate) else learning_rate
    k = schedule_k(jnp.asarray(step)).astype(jnp.float32)
    factor = k if rule == "linear" else jnp.sqrt(k)
    return jnp.asarray(base, jnp.float32) * factor

  return scaled

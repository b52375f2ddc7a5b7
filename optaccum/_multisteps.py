"""A drop-in replacement for `optax.MultiSteps`, on the one accumulation core."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from optaccum._accumulate import AccumulateState, make_core, transformation
from optaccum._inspect import has_updated
from optaccum._skip import SkipPolicy

MultiStepsState = AccumulateState


class MultiSteps:
  """`optax.MultiSteps`' interface over `optaccum.accumulate`.

  Change the import and code written for `optax.MultiSteps` runs unchanged:
  same constructor, `init`, `update`, `has_updated`, `gradient_transformation()`,
  `inner_opt`, and a state with the same field names (`mini_step`,
  `gradient_step`, `inner_opt_state`, `acc_grads`, `skip_state`). What changes is
  underneath: the inner optimizer runs only when a window closes (optax runs it
  on every micro-step and masks the result), `every_k_schedule=0` is rejected,
  and bfloat16 gradients pass strict dtype promotion.

  As in optax, no skip policy is set by default, so a non-finite micro-batch
  reaches the parameters when its window closes; pass
  `should_skip_update_fn=optaccum.skip_not_finite` to drop it (the default of
  `optaccum.accumulate`).

  Args:
    opt: the wrapped optimizer.
    every_k_schedule: a positive int, or a schedule `gradient_step -> k`.
    use_grad_mean: average the window's gradients (True) or sum them.
    should_skip_update_fn: a skip policy, see `optaccum.SkipPolicy`.
    accumulator_dtype: the accumulator's dtype.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optaccum
    >>> opt = optaccum.MultiSteps(optax.sgd(1.0), every_k_schedule=2)
    >>> params = {"w": jnp.zeros(2)}
    >>> state = opt.init(params)
    >>> _, state = opt.update({"w": jnp.ones(2)}, state, params)
    >>> updates, state = opt.update({"w": jnp.ones(2)}, state, params)
    >>> updates["w"], bool(opt.has_updated(state))
    (Array([-1., -1.], dtype=float32), True)
  """

  def __init__(
    self,
    opt: optax.GradientTransformation,
    every_k_schedule: int | Callable[[jax.Array], Any],
    use_grad_mean: bool = True,
    should_skip_update_fn: SkipPolicy | None = None,
    accumulator_dtype: Any = jnp.float32,
  ):
    if not isinstance(use_grad_mean, bool):
      raise TypeError(
        f"`MultiSteps(use_grad_mean=...)` must be a bool, got use_grad_mean={use_grad_mean!r}."
      )
    core = make_core(
      "MultiSteps",
      opt,
      every_k_schedule,
      every_k_name="every_k_schedule",
      skip_name="should_skip_update_fn",
      reduction="mean" if use_grad_mean else "sum",
      accumulator_dtype=accumulator_dtype,
      skip=should_skip_update_fn,
      axis_name=None,
    )
    self._opt = core.inner
    self._tx = transformation(core)

  @property
  def inner_opt(self) -> optax.GradientTransformationExtraArgs:
    """The wrapped optimizer."""
    return self._opt

  def init(self, params: Any) -> AccumulateState:
    """Builds the initial state."""
    return self._tx.init(params)

  def update(
    self, updates: Any, state: AccumulateState, params: Any = None, **extra_args: Any
  ) -> tuple[Any, AccumulateState]:
    """Accumulates `updates`; emits the inner optimizer's updates when a window closes."""
    return self._tx.update(updates, state, params, **extra_args)

  def has_updated(self, state: Any) -> jax.Array:
    """Whether the last `update` closed a window."""
    return has_updated(state)

  def gradient_transformation(self) -> optax.GradientTransformationExtraArgs:
    """The transformation itself, to pass to `optax.chain` or a train state."""
    return self._tx

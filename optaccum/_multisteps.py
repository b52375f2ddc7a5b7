"""A drop-in replacement for `optax.MultiSteps`, on the one accumulation core."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from optaccum._accumulate import build
from optaccum._inspect import status
from optaccum._skip import SkipPolicy
from optaccum._state import AccumulateState

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

  As in optax, no per-micro-batch skip policy is set by default; unlike optax,
  the window guard of `optaccum.accumulate` is on, so a window whose gradient
  holds a NaN or inf is dropped whole rather than reaching the parameters
  (`window_guard=False` turns it off). Pass
  `should_skip_update_fn=optaccum.skip.not_finite` to drop only the bad
  micro-batch.

  The state differs from optax's in one field: `acc_grads` holds the window's
  running *sum* (optax's holds the running mean), and `acc_weight` counts
  what it holds. `from_optax_state` converts a state (or a restored
  checkpoint) of `optax.MultiSteps` into this form.

  Args:
    opt: the wrapped optimizer.
    every_k_schedule: a positive int, or a schedule `gradient_step -> k`.
    use_grad_mean: average the window's gradients (True) or sum them.
    should_skip_update_fn: a skip policy, see `optaccum.skip.Policy`.
    accumulator: what the window is summed into, as in `optaccum.accumulate`;
      None (default) widens each parameter's dtype to at least 32 bits.
    window_guard: drop a window whose gradient is not finite (default True).

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optaccum
    >>> opt = optaccum.compat.MultiSteps(optax.sgd(1.0), every_k_schedule=2)
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
    *,
    accumulator: Any = None,
    window_guard: bool = True,
  ):
    if not isinstance(use_grad_mean, bool):
      raise TypeError(
        f"`MultiSteps(use_grad_mean=...)` must be a bool, got use_grad_mean={use_grad_mean!r}."
      )
    accumulation = build(
      "MultiSteps",
      opt,
      every_k_schedule,
      names=("opt", "every_k_schedule", "should_skip_update_fn"),
      reduction="mean" if use_grad_mean else "sum",
      accumulator=accumulator,
      skip=should_skip_update_fn,
      window_guard=window_guard,
    )
    self._use_grad_mean = use_grad_mean
    self._has_skip = should_skip_update_fn is not None
    self._opt = accumulation.inner
    self._tx = accumulation.transformation()

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
    return status(state).has_updated

  def gradient_transformation(self) -> optax.GradientTransformationExtraArgs:
    """The transformation itself, to pass to `optax.chain` or a train state."""
    return self._tx

  def from_optax_state(self, state: Any) -> AccumulateState:
    """Converts a state of `optax.MultiSteps` (same inner optimizer) into this one's.

    optax keeps the running mean of the window's gradients, this class the
    running sum: the sum is `mean * mini_step`, formed in the accumulator's
    dtype, and the window's weight is `mini_step`. The inner state, counters
    and skip state carry over as they are, so training resumed from the
    converted state continues the window where optax left it. To move a
    checkpoint, restore it into an `optax.MultiSteps` target, then convert.

    Args:
      state: an `optax.MultiStepsState`, e.g. restored from a checkpoint.

    Returns:
      The `AccumulateState` that this optimizer would hold at that point.

    Raises:
      TypeError: if `state` has not the fields of `optax.MultiStepsState`.

    Examples:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import optaccum
      >>> params = {"w": jnp.zeros(2)}
      >>> theirs = optax.MultiSteps(optax.sgd(1.0), every_k_schedule=2)
      >>> ours = optaccum.compat.MultiSteps(optax.sgd(1.0), every_k_schedule=2)
      >>> state = theirs.init(params)
      >>> with jax.numpy_dtype_promotion("standard"):  # optax's update needs it
      ...   _, state = theirs.update({"w": jnp.array([1.0, 3.0])}, state, params)
      >>> state = ours.from_optax_state(state)
      >>> updates, state = ours.update({"w": jnp.array([3.0, 5.0])}, state, params)
      >>> updates["w"]
      Array([-2., -4.], dtype=float32)
    """
    fields = ("mini_step", "gradient_step", "inner_opt_state", "acc_grads", "skip_state")
    if not all(hasattr(state, name) for name in fields):
      raise TypeError(
        "`MultiSteps.from_optax_state(state=...)` must be an optax.MultiStepsState, "
        f"got a {type(state).__name__}."
      )
    fresh = self._tx.init(state.acc_grads)
    mini_step = jnp.asarray(state.mini_step, jnp.int32)
    count = mini_step.astype(jnp.float32)
    # With use_grad_mean=False optax's acc_grads is already the running sum.
    scale = count if self._use_grad_mean else jnp.ones((), jnp.float32)
    acc_grads = jax.tree.map(
      lambda mean, acc: mean.astype(acc.dtype) * scale.astype(acc.dtype),
      state.acc_grads,
      fresh.acc_grads,
    )
    return fresh._replace(
      mini_step=mini_step,
      gradient_step=jnp.asarray(state.gradient_step, jnp.int32),
      inner_opt_state=state.inner_opt_state,
      acc_grads=acc_grads,
      skip_state=state.skip_state if self._has_skip else fresh.skip_state,
      acc_weight=count,
    )

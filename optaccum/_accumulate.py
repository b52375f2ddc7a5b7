"""The accumulation transformation: one window of k micro-batches, one update."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optaccum import _validation
from optaccum._skip import SkipPolicy, skip_not_finite

_IS_NONE = lambda x: x is None  # noqa: E731
_REDUCTIONS = ("mean", "sum")


class AccumulateState(NamedTuple):
  """State of `accumulate`; its first five fields are those of optax's `MultiStepsState`.

  Attributes:
    mini_step: micro-batches accepted into the current window; 0 right after an
      emitting step.
    gradient_step: inner-optimizer steps taken so far (windows emitted).
    inner_opt_state: the wrapped optimizer's state; it advances once per window.
    acc_grads: the window's running sum of (weighted) gradients, in the
      accumulator dtype.
    skip_state: what the skip policy returned for the last micro-batch.
    acc_weight: the window's sum of weights (the micro-batch count when
      unweighted).
    num_skipped: micro-batches dropped by the skip policy so far.
    emitted: whether the last update call ran the inner optimizer.
  """

  mini_step: jax.Array  # shape=(), dtype=int32
  gradient_step: jax.Array  # shape=(), dtype=int32
  inner_opt_state: Any
  acc_grads: Any
  skip_state: Any = ()
  acc_weight: jax.Array = jnp.zeros((), jnp.float32)  # shape=(), dtype=float32
  num_skipped: jax.Array = jnp.zeros((), jnp.int32)  # shape=(), dtype=int32
  emitted: jax.Array = jnp.zeros((), jnp.bool_)  # shape=(), dtype=bool


def _map(fn: Callable[..., Any], updates: Any, *rest: Any) -> Any:
  """Maps over an updates tree, passing its None leaves through."""
  return jax.tree.map(
    lambda u, *r: None if u is None else fn(u, *r), updates, *rest, is_leaf=_IS_NONE
  )


def accumulate(
  inner: optax.GradientTransformation,
  every_k: int | Callable[[jax.Array], Any],
  *,
  reduction: str = "mean",
  accumulator_dtype: Any = jnp.float32,
  skip: SkipPolicy | None = skip_not_finite,
) -> optax.GradientTransformationExtraArgs:
  """Accumulates gradients over a window of micro-steps, then runs `inner` once.

  For each micro-step but the last of a window the transformation adds the
  gradients into a float32 accumulator and emits exact zero updates; on the
  k-th it hands the window's mean (or sum) gradient to `inner` and emits its
  updates. `inner` runs only on that step, so its step count, learning-rate
  schedule, weight decay and clipping advance once per window, exactly as in
  large-batch training with a batch k times larger.

  `update` takes two keyword arguments of its own besides the inner
  optimizer's extra arguments:

  * `weight`: the micro-batch's weight, e.g. its number of valid tokens when
    `updates` is the gradient of the micro-batch's *mean* loss. The window then
    emits `sum(w_i g_i) / sum(w_i)`: the gradient of the mean over all valid
    tokens of the window, whatever the micro-batch lengths. A missing weight
    counts as 1. A window whose weights sum to zero emits zeros, leaves the
    inner state untouched and does not advance `gradient_step`.
  * `flush`: when true, this call closes the window whatever its length
    (see `optaccum.flush`).

  Args:
    inner: the optimizer to run once per window (any optax transformation,
      chains included).
    every_k: micro-steps per window: a positive int, or a schedule
      `gradient_step -> k` to grow the effective batch during training. A
      schedule value below 1 is clamped to 1 (every micro-step emits); float
      values are floored.
    reduction: `"mean"` (default) or `"sum"` of the window's gradients. With
      weights, `"sum"` emits `sum(w_i g_i)`.
    accumulator_dtype: dtype of the accumulator; float32 by default whatever
      the gradient dtype. None keeps each gradient's own dtype.
    skip: a skip policy `(grads, gradient_step, params) -> (skip, info)`;
      micro-batches it rejects never enter the window and are counted in
      `num_skipped`. Defaults to `optaccum.skip_not_finite`, so a NaN or inf in
      one micro-batch never reaches the parameters; pass None to accumulate
      every micro-batch as it is.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is an
    `AccumulateState`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optaccum
    >>> tx = optaccum.accumulate(optax.sgd(1.0), every_k=2)
    >>> params = {"w": jnp.zeros(2)}
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": jnp.array([1.0, 2.0])}, state, params)
    >>> updates["w"]  # first micro-step: nothing yet
    Array([0., 0.], dtype=float32)
    >>> updates, state = tx.update({"w": jnp.array([3.0, 4.0])}, state, params)
    >>> updates["w"]  # second: -lr * mean of the two
    Array([-2., -3.], dtype=float32)
  """
  where = "accumulate"
  if not isinstance(inner, optax.GradientTransformation):
    raise TypeError(
      f"`{where}(inner=...)` must be an optax.GradientTransformation, got inner={inner!r}."
    )
  _validation.check_every_k(where, every_k)
  _validation.check_choice(where, "reduction", reduction, _REDUCTIONS)
  acc_dtype = _validation.floating_dtype(
    where, "accumulator_dtype", accumulator_dtype, allow_none=True
  )
  _validation.check_callable_or_none(where, "skip", skip)
  inner = optax.with_extra_args_support(inner)
  schedule = _validation.as_schedule(every_k)

  def init_fn(params: Any) -> AccumulateState:
    acc_grads = jax.tree.map(
      lambda p: jnp.zeros(jnp.shape(p), acc_dtype or jnp.result_type(p)), params
    )
    gradient_step = jnp.zeros((), jnp.int32)
    skip_state = ()
    if skip is not None:
      _, skip_state = skip(optax.tree.zeros_like(params), gradient_step, params)
    return AccumulateState(
      mini_step=jnp.zeros((), jnp.int32),
      gradient_step=gradient_step,
      inner_opt_state=inner.init(params),
      acc_grads=acc_grads,
      skip_state=skip_state,
      acc_weight=jnp.zeros((), jnp.float32),
      num_skipped=jnp.zeros((), jnp.int32),
      emitted=jnp.zeros((), jnp.bool_),
    )

  def update_fn(
    updates: Any,
    state: AccumulateState,
    params: Any = None,
    *,
    weight: Any = None,
    flush: Any = False,
    **extra_args: Any,
  ) -> tuple[Any, AccumulateState]:
    _validation.check_tree_matches(
      f"{where}(...).update",
      "updates",
      updates,
      state.acc_grads,
      "the accumulator built by init(params)",
    )
    weighted = weight is not None
    if weighted:
      weight = _validation.as_scalar(f"{where}(...).update", "weight", weight, jnp.float32)
    flush = _validation.as_flag(f"{where}(...).update", "flush", flush)

    if skip is None:
      should_skip, skip_state = jnp.zeros((), jnp.bool_), state.skip_state
    else:
      should_skip, skip_state = skip(updates, state.gradient_step, params)
      should_skip = jnp.asarray(should_skip)
      if should_skip.shape != () or should_skip.dtype != jnp.bool_:
        raise ValueError(
          f"`{where}(skip=...)` must return a scalar bool as its first output, got "
          f"dtype {should_skip.dtype} and shape {should_skip.shape}."
        )

    def add(g: Any, acc: jax.Array) -> jax.Array:
      if g is None:  # None where the parameters hold None: pass it through.
        return None
      if weighted:
        # Weigh in at least float32, so token counts stay exact.
        wide = jnp.promote_types(acc.dtype, jnp.float32)
        g = g.astype(wide) * weight.astype(wide)
      summed = acc + g.astype(acc.dtype)
      return summed if skip is None else jnp.where(should_skip, acc, summed)

    acc_grads = jax.tree.map(add, updates, state.acc_grads, is_leaf=_IS_NONE)
    step_weight = weight if weighted else jnp.ones((), jnp.float32)
    accepted = ~should_skip
    acc_weight = state.acc_weight + jnp.where(accepted, step_weight, jnp.float32(0))
    mini_step = jnp.where(accepted, optax.safe_increment(state.mini_step), state.mini_step)
    k = schedule(state.gradient_step)
    close_window = flush | (accepted & (mini_step >= k))
    run_inner = close_window & (acc_weight > 0)

    def window_gradient(acc_grads: Any, acc_weight: jax.Array) -> Any:
      if reduction == "mean":
        acc_grads = jax.tree.map(lambda a: a / acc_weight.astype(a.dtype), acc_grads)
      return _map(lambda g, a: a.astype(g.dtype), updates, acc_grads)

    def run(acc_grads, acc_weight, inner_state):
      return inner.update(window_gradient(acc_grads, acc_weight), inner_state, params, **extra_args)

    def hold(acc_grads, acc_weight, inner_state):
      shapes = jax.eval_shape(run, acc_grads, acc_weight, inner_state)[0]
      return optax.tree.zeros_like(shapes), inner_state

    new_updates, inner_opt_state = jax.lax.cond(
      run_inner, run, hold, acc_grads, acc_weight, state.inner_opt_state
    )
    new_state = AccumulateState(
      mini_step=jnp.where(close_window, jnp.int32(0), mini_step),
      gradient_step=jnp.where(
        run_inner, optax.safe_increment(state.gradient_step), state.gradient_step
      ),
      inner_opt_state=inner_opt_state,
      acc_grads=jax.tree.map(lambda a: jnp.where(close_window, jnp.zeros_like(a), a), acc_grads),
      skip_state=skip_state,
      acc_weight=jnp.where(close_window, jnp.float32(0), acc_weight),
      num_skipped=jnp.where(
        should_skip, optax.safe_increment(state.num_skipped), state.num_skipped
      ),
      emitted=run_inner,
    )
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def flush(
  tx: optax.GradientTransformation,
  opt_state: Any,
  params: Any,
  **extra_args: Any,
) -> tuple[Any, Any]:
  """Applies a partial window now: emits the mean (or sum) of what it holds.

  Use it at the end of the data, or before an evaluation or a checkpoint, when
  the window holds fewer than k micro-batches. `tx` may be `accumulate(...)` or
  any chain that contains it: the call passes zero gradients of weight 0 through
  the whole of `tx` (so they add nothing to the window) with `flush=True`, and
  the accumulation closes its window. An empty window emits zeros and leaves the
  inner state untouched.

  Args:
    tx: the transformation whose state is `opt_state`.
    opt_state: the optimizer state, holding one `AccumulateState`.
    params: the current parameters; the zero gradients take their structure and
      dtypes.
    **extra_args: extra arguments for the inner optimizer.

  Returns:
    `(updates, opt_state)`, as from `tx.update`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optaccum
    >>> tx = optaccum.accumulate(optax.sgd(1.0), every_k=4)
    >>> params = {"w": jnp.zeros(2)}
    >>> state = tx.init(params)
    >>> _, state = tx.update({"w": jnp.array([1.0, 2.0])}, state, params)
    >>> _, state = tx.update({"w": jnp.array([3.0, 6.0])}, state, params)
    >>> updates, state = optaccum.flush(tx, state, params)
    >>> updates["w"]  # -lr * mean of the two micro-batches seen
    Array([-2., -4.], dtype=float32)
  """
  zeros = optax.tree.zeros_like(params)
  return tx.update(
    zeros,
    opt_state,
    params,
    weight=jnp.zeros((), jnp.float32),
    flush=True,
    **extra_args,
  )

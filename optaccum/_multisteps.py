"""A drop-in replacement for `optax.MultiSteps`, on the one accumulation core."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optaccum._accumulate import build
from optaccum._skip import SkipPolicy
from optaccum._state import AccumulateState
from optaccum._types import DTypeLike, KSchedule, OptState, Params, PyTree, Updates

_IS_NONE = lambda x: x is None  # noqa: E731
_OPTAX_FIELDS = ("mini_step", "gradient_step", "inner_opt_state", "acc_grads", "skip_state")


class MultiStepsState(NamedTuple):
  """State of `MultiSteps`: the fields of optax's `MultiStepsState`, then optaccum's counters.

  The first five fields hold what optax's hold, so code that reads them (logs
  the norm of `acc_grads`, or checks `mini_step`) gets optax's values.

  Attributes:
    mini_step: micro-batches accepted into the open window; 0 right after a
      window closes.
    gradient_step: inner-optimizer steps taken so far (windows emitted).
    inner_opt_state: the wrapped optimizer's state; it advances once per window.
    acc_grads: as in optax, the running mean of the window's gradients
      (with `use_grad_mean=False`, their running sum), in the accumulator
      dtype; zeros when no window is open. With `update(..., weight=w)` the
      mean is weighted: `sum(w_i g_i) / sum(w_i)`.
    skip_state: what the skip policy returned for the last micro-batch.
    acc_weight: the window's sum of weights (the micro-batch count when
      unweighted).
    num_skipped: micro-batches dropped so far, by the skip policy or for a
      NaN, infinite or negative weight.
    emitted: whether the last update call ran the inner optimizer.
    num_skipped_windows: windows whose gradient held a NaN or inf, dropped
      whole by the window guard.
    num_empty_windows: windows that closed with zero total weight and emitted
      zeros.
    num_clamped_windows: windows closed while `every_k_schedule` returned NaN,
      an infinity or a value below 1, each run as a window of one micro-step.
  """

  mini_step: jax.Array  # shape=(), dtype=int32
  gradient_step: jax.Array  # shape=(), dtype=int32
  inner_opt_state: OptState
  acc_grads: Updates
  skip_state: PyTree = ()
  # NumPy defaults, as in AccumulateState: no XLA backend at import.
  acc_weight: jax.Array = np.zeros((), np.float32)  # type: ignore[assignment]  # shape=(), dtype=float32
  num_skipped: jax.Array = np.zeros((), np.int32)  # type: ignore[assignment]  # shape=(), dtype=int32
  emitted: jax.Array = np.zeros((), np.bool_)  # type: ignore[assignment]  # shape=(), dtype=bool
  num_skipped_windows: jax.Array = np.zeros((), np.int32)  # type: ignore[assignment]  # shape=(), dtype=int32
  num_empty_windows: jax.Array = np.zeros((), np.int32)  # type: ignore[assignment]  # shape=(), dtype=int32
  num_clamped_windows: jax.Array = np.zeros((), np.int32)  # type: ignore[assignment]  # shape=(), dtype=int32


def _summary(tree: PyTree) -> PyTree:
  """`tree` with each leaf written as dtype[shape], for error messages."""
  return jax.tree.map(
    lambda x: "None" if x is None else f"{jnp.result_type(x).name}{list(jnp.shape(x))}",
    tree,
    is_leaf=_IS_NONE,
  )


def _same_shapes(tree: PyTree, reference: PyTree) -> bool:
  """Whether `tree` has the structure and leaf shapes of `reference` (None is a leaf)."""
  treedef = jax.tree.structure(tree, is_leaf=_IS_NONE)
  if treedef != jax.tree.structure(reference, is_leaf=_IS_NONE):  # type: ignore[operator]
    return False
  return all(
    ref is None or (leaf is not None and jnp.shape(leaf) == jnp.shape(ref))
    for leaf, ref in zip(
      jax.tree.leaves(tree, is_leaf=_IS_NONE), jax.tree.leaves(reference, is_leaf=_IS_NONE)
    )
  )


def _all_concrete_arrays(tree: PyTree) -> bool:
  """Whether every leaf of `tree` is a concrete JAX or NumPy array (no tracer, no Python value)."""
  return all(
    isinstance(leaf, (jax.Array, np.ndarray, np.generic)) and not isinstance(leaf, jax.core.Tracer)
    for leaf in jax.tree.leaves(tree)
  )


def _check_accumulator_dtype(accumulator_dtype: DTypeLike) -> DTypeLike:
  """`accumulator_dtype` canonicalized (float64 is float32 without x64), or None."""
  if accumulator_dtype is None:
    return None
  try:
    dtype = jnp.dtype(accumulator_dtype)
  except (TypeError, ValueError):
    dtype = None
  if dtype is None or not jnp.issubdtype(dtype, jnp.inexact):
    raise TypeError(
      "`MultiSteps(accumulator_dtype=...)` must be None or a floating or complex dtype "
      f"such as jnp.float32, got accumulator_dtype={accumulator_dtype!r}."
    )
  return jax.dtypes.canonicalize_dtype(dtype)


def _check_counter(where: str, name: str, counter: object) -> None:
  """Checks an optax state's counter: a non-negative int scalar (any value under a trace)."""
  is_int_scalar = (
    isinstance(counter, (int, np.integer, jax.Array, np.ndarray))
    and not isinstance(counter, bool)
    and jnp.shape(counter) == ()
    and jnp.issubdtype(jnp.result_type(counter), jnp.integer)
  )
  if not is_int_scalar or (
    not isinstance(counter, jax.core.Tracer) and int(np.asarray(counter)) < 0
  ):
    raise ValueError(
      f"`{where}` must hold a non-negative int scalar in {name}, got {name}={counter!r}."
    )


class MultiSteps:
  """`optax.MultiSteps`' interface and state, with the inner optimizer run once per window.

  Change the import and code written for `optax.MultiSteps` runs unchanged:
  the same constructor, `init`, `update`, `has_updated`,
  `gradient_transformation()`, `inner_opt`, and a `MultiStepsState` whose
  first five fields mean what optax's mean (`acc_grads` is the window's
  running mean, zeros between windows). The inner optimizer runs only on the
  micro-step that closes a window; a window whose gradient holds a NaN or inf
  is dropped whole; `update` also takes optaccum's `weight=` and `flush=`. The
  state is optax's form, not an `AccumulateState`, which `optaccum.status`,
  `flush`, `apply_gradients` and `checkpoint` read. Guide, with all that
  differs from optax: [migrating][migrating-from-optaxmultisteps].

  Args:
    opt: the wrapped optimizer.
    every_k_schedule: a positive int, or a schedule `gradient_step -> k`.
    use_grad_mean: average the window's gradients (True) or sum them.
    should_skip_update_fn: a skip policy `(updates, gradient_step, params) ->
      (skip, skip_state)`, e.g. `optaccum.skip.not_finite` or optax's
      `skip_not_finite`; None (default) accumulates every micro-batch.
    accumulator_dtype: the dtype of `acc_grads`, as in optax (a complex
      parameter keeps a complex accumulator of that precision). None
      (default) widens each parameter's dtype to at least 32 bits.
    window_guard: drop a window whose gradient is not finite (default True).

  Raises:
    TypeError: if `opt` is no optax transformation, `use_grad_mean` or
      `window_guard` no bool, `should_skip_update_fn` not callable, or
      `accumulator_dtype` no floating dtype.
    ValueError: if `every_k_schedule` is not a positive int or a schedule.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optaccum
    >>> opt = optaccum.compat.MultiSteps(optax.sgd(1.0), every_k_schedule=2)
    >>> params = {"w": jnp.zeros(2)}
    >>> state = opt.init(params)
    >>> _, state = opt.update({"w": jnp.array([1.0, 3.0])}, state, params)
    >>> state.acc_grads["w"]  # the running mean, as optax keeps it
    Array([1., 3.], dtype=float32)
    >>> updates, state = opt.update({"w": jnp.array([3.0, 5.0])}, state, params)
    >>> updates["w"], bool(opt.has_updated(state))
    (Array([-2., -4.], dtype=float32), True)
    >>> state.acc_grads["w"]  # cleared when the window closes
    Array([0., 0.], dtype=float32)
  """

  def __init__(
    self,
    opt: optax.GradientTransformation,
    every_k_schedule: KSchedule,
    use_grad_mean: bool = True,
    should_skip_update_fn: SkipPolicy | None = None,
    accumulator_dtype: DTypeLike = None,
    *,
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
      accumulator=_check_accumulator_dtype(accumulator_dtype),
      skip=should_skip_update_fn,
      window_guard=window_guard,
    )
    self._use_grad_mean = use_grad_mean
    self._opt = accumulation.inner
    self._tx = accumulation.transformation()
    # Called eagerly, each `lax.cond` would compile anew on every call (about
    # 1 s for Adam on CPU, as for `optax.MultiSteps`); compiled once per
    # argument shapes, a micro-step costs what it does under `jax.jit`.
    self._compiled_update = jax.jit(self._update)

  @property
  def inner_opt(self) -> optax.GradientTransformationExtraArgs:
    """The wrapped optimizer."""
    return self._opt

  def init(self, params: Params) -> MultiStepsState:
    """Builds the state before the first micro-step: an empty window, zero `acc_grads`."""
    return self._from_core(self._tx.init(params))

  def update(
    self,
    updates: Updates,
    state: MultiStepsState,
    params: Params | None = None,
    **extra_args: Any,
  ) -> tuple[Updates, MultiStepsState]:
    """Adds `updates` to the window; emits the inner optimizer's updates when it closes.

    Called outside a trace with array arguments only, the micro-step runs as
    one compiled program: the skip policy and the inner optimizer must then be
    traceable, as under `jax.jit`.

    Args:
      updates: the micro-batch's gradients.
      state: the `MultiStepsState` that `init` built (or `from_optax_state`).
      params: the current parameters, for the inner optimizer and the skip policy.
      **extra_args: the inner optimizer's extra arguments, and optaccum's
        `weight=` and `flush=` (see `optaccum.accumulate`).

    Returns:
      `(updates, state)`: exact zeros on a micro-step that closes no window,
      else the inner optimizer's updates.

    Raises:
      TypeError: if `state` is not a `MultiStepsState` of this module (an
        optax state must go through `from_optax_state` first).
    """
    if not isinstance(state, MultiStepsState):
      raise TypeError(
        "`MultiSteps.update(state=...)` must be the optaccum.compat.MultiStepsState that "
        f"`MultiSteps.init` built, got a {type(state).__name__} (an optax.MultiStepsState "
        "goes through `MultiSteps.from_optax_state` first)."
      )
    if _all_concrete_arrays((updates, state, params, extra_args)):
      return self._compiled_update(updates, state, params, extra_args)
    return self._update(updates, state, params, extra_args)

  def _update(
    self, updates: Updates, state: MultiStepsState, params: Params | None, extra_args: dict
  ) -> tuple[Updates, MultiStepsState]:
    """`update`'s work: the core's micro-step, on the core's form of the state."""
    new_updates, core = self._tx.update(updates, self._to_core(state), params, **extra_args)
    return new_updates, self._from_core(core)

  def has_updated(self, state: OptState) -> jax.Array:
    """Whether the last `update` ran the inner optimizer (closed a window).

    Args:
      state: a `MultiStepsState`, or an optimizer state (a chain's) that holds one.

    Returns:
      A scalar bool array.

    Raises:
      ValueError: if `state` holds no `MultiStepsState`, or several.
    """
    is_state = lambda x: isinstance(x, MultiStepsState)  # noqa: E731
    found = [leaf for leaf in jax.tree.leaves(state, is_leaf=is_state) if is_state(leaf)]
    if len(found) != 1:
      raise ValueError(
        "`MultiSteps.has_updated(state=...)` must hold exactly one "
        f"optaccum.compat.MultiStepsState, found {len(found)} in a {type(state).__name__}."
      )
    return found[0].emitted

  def gradient_transformation(self) -> optax.GradientTransformationExtraArgs:
    """The transformation itself, to pass to `optax.chain` or a train state."""
    return optax.GradientTransformationExtraArgs(self.init, self.update)

  def from_optax_state(self, state: OptState, *, params: Params | None = None) -> MultiStepsState:
    """Takes over a state of `optax.MultiSteps` with the same inner optimizer.

    The five fields of optax's state mean what this class's mean, so they
    carry over as they are (`acc_grads` cast to the accumulator dtype);
    optaccum's counters start at zero, with the window's weight set to its
    micro-batch count. Training resumed from the result continues the window
    where optax left it. To move a checkpoint, restore it into an
    `optax.MultiSteps` target, then take it over.

    Args:
      state: an `optax.MultiStepsState`, e.g. restored from a checkpoint.
      params: the parameters, optionally. With them, `acc_grads` and the
        inner state are checked against the parameters' structure and shapes;
        without, the inner state is checked against `acc_grads`' shapes.

    Returns:
      The `MultiStepsState` that this optimizer would hold at that point.

    Raises:
      TypeError: if `state` is optaccum's own (an `AccumulateState`, or this
        class's `MultiStepsState`: use it as it is), or has not the fields of
        `optax.MultiStepsState`.
      ValueError: if `state.acc_grads` does not match `params`, or
        `state.inner_opt_state` is not the state of this optimizer's inner one.

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
      >>> state = ours.from_optax_state(state, params=params)
      >>> updates, state = ours.update({"w": jnp.array([3.0, 5.0])}, state, params)
      >>> updates["w"]
      Array([-2., -4.], dtype=float32)
    """
    where = "MultiSteps.from_optax_state(state=...)"
    if isinstance(state, (AccumulateState, MultiStepsState)):
      raise TypeError(
        f"`{where}` must be an optax.MultiStepsState, got optaccum's own "
        f"{type(state).__name__}, whose acc_grads already mean what optaccum's mean: "
        "pass an optaccum.compat.MultiStepsState to `update` as it is."
      )
    if not all(hasattr(state, name) for name in _OPTAX_FIELDS):
      raise TypeError(
        f"`{where}` must be an optax.MultiStepsState, with fields {_OPTAX_FIELDS}, "
        f"got a {type(state).__name__}."
      )
    for name in ("mini_step", "gradient_step"):
      _check_counter(where, name, getattr(state, name))
    if params is not None and not all(
      isinstance(leaf, (jax.Array, np.ndarray, np.generic)) for leaf in jax.tree.leaves(params)
    ):
      raise TypeError(
        "`MultiSteps.from_optax_state(params=...)` must be None or a tree of arrays, "
        f"got params={params!r}."
      )
    like = state.acc_grads if params is None else params
    expected = jax.eval_shape(self.init, like)
    if params is not None and not _same_shapes(state.acc_grads, expected.acc_grads):
      raise ValueError(
        f"`{where}` holds acc_grads that do not match the parameters.\n"
        f"  state.acc_grads: {_summary(state.acc_grads)}\n"
        f"  expected (from params): {_summary(expected.acc_grads)}"
      )
    if not _same_shapes(state.inner_opt_state, expected.inner_opt_state):
      source = "params" if params is not None else "the shapes of state.acc_grads"
      raise ValueError(
        f"`{where}` holds an inner_opt_state that is not the state of this "
        f"MultiSteps' inner optimizer (another optimizer's?).\n"
        f"  state.inner_opt_state: {_summary(state.inner_opt_state)}\n"
        f"  expected (inner optimizer's init on {source}): "
        f"{_summary(expected.inner_opt_state)}"
      )
    mini_step = jnp.asarray(state.mini_step, jnp.int32)
    gradient_step = jnp.asarray(state.gradient_step, jnp.int32)
    acc_grads = jax.tree.map(
      lambda target, given: None if target is None else jnp.asarray(given, target.dtype),
      expected.acc_grads,
      state.acc_grads,
      is_leaf=_IS_NONE,
    )
    skip_state = state.skip_state
    if not _same_shapes(skip_state, expected.skip_state):
      # Monitoring only (optax's had no or another policy): start it afresh,
      # in the form this policy's next call returns.
      skip_state = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), expected.skip_state)
    return MultiStepsState(
      mini_step=mini_step,
      gradient_step=gradient_step,
      inner_opt_state=state.inner_opt_state,
      acc_grads=acc_grads,
      skip_state=skip_state,
      # optax counts unweighted micro-batches.
      acc_weight=mini_step.astype(jnp.float32),
      num_skipped=jnp.zeros((), jnp.int32),
      # What optax's `has_updated` says of this state.
      emitted=(mini_step == 0) & (gradient_step > 0),
      num_skipped_windows=jnp.zeros((), jnp.int32),
      num_empty_windows=jnp.zeros((), jnp.int32),
      num_clamped_windows=jnp.zeros((), jnp.int32),
    )

  def _to_core(self, state: MultiStepsState) -> AccumulateState:
    """The core's state: the window's running sum, `mean * acc_weight` in the accumulator dtype."""
    acc_grads = state.acc_grads
    if self._use_grad_mean:
      weight = state.acc_weight
      acc_grads = jax.tree.map(
        lambda mean: None if mean is None else mean * jnp.asarray(weight, mean.dtype),
        acc_grads,
        is_leaf=_IS_NONE,
      )
    return AccumulateState(**state._replace(acc_grads=acc_grads)._asdict())

  def _from_core(self, core: AccumulateState) -> MultiStepsState:
    """This class's state: the open window's running mean (or sum); zeros where none is open.

    Between windows the core's accumulator still holds what the last window
    emitted (the next micro-step clears it); optax's holds zeros.
    """
    is_open = core.mini_step > 0
    weight = core.acc_weight
    if self._use_grad_mean:
      is_open = is_open & (weight > 0)
      weight = jnp.where(is_open, weight, jnp.ones((), weight.dtype))  # no 0 / 0

    def running(acc: jax.Array | None) -> jax.Array | None:
      if acc is None:
        return None
      value = acc / weight.astype(acc.dtype) if self._use_grad_mean else acc
      return jnp.where(is_open, value, jnp.zeros((), acc.dtype))

    acc_grads = jax.tree.map(running, core.acc_grads, is_leaf=_IS_NONE)
    fields = {name: getattr(core, name) for name in MultiStepsState._fields}
    return MultiStepsState(**{**fields, "acc_grads": acc_grads})

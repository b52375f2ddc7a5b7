"""The accumulation transformation: one window of k micro-batches, one update."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Hashable, Iterator
from typing import Any, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optaccum import (
  _branching,
  _checks,
  _replicas,
  _spans,
  _statistics,
  _targets,
  _validation,
  _window,
)
from optaccum._accumulator import (
  REDUCTIONS,
  Accumulator,
  as_accumulator,
  inverse_weight,
)
from optaccum._skip import SkipPolicy
from optaccum._state import AccumulateState, check_state
from optaccum._types import DTypeLike, KSchedule, OptState, Params, PyTree, Scalar, Updates

_IS_NONE = lambda x: x is None  # noqa: E731
T = TypeVar("T")


def _increment_where(condition: jax.Array, counter: jax.Array) -> jax.Array:
  """`counter + 1` (saturating) where `condition` holds, else `counter`."""
  return jnp.where(condition, optax.safe_increment(counter), counter)


class _Verdict(NamedTuple):
  """What one micro-step does: whether it enters the window, and its weight there."""

  skip: jax.Array | None  # scalar bool; None when nothing can be skipped
  weight: jax.Array  # float32, scalar (under mesh axes one per replica, [R]): 0 when skipped
  skip_state: Any


class _Window(NamedTuple):
  """What the closing of a window found; on a micro-step that closes none, `runs` is False."""

  acc_grads: Updates  # the window's sums, across replicas if any
  total_weight: jax.Array  # scalar float32
  runs: jax.Array  # scalar bool: whether the inner optimizer steps
  statistics: _statistics.StatisticsState | tuple[()]  # the StatisticsState after the window, or ()


@dataclasses.dataclass(frozen=True)
class Accumulation:
  """One accumulation's validated settings, and its steps: init, update, apply.

  `accumulate(...)` returns `transformation()`, whose `update` is this
  object's bound method, so the fast path (`apply_gradients`) finds the
  accumulation behind a transformation with `accumulation_of`. Both forms
  share `_add` and `_close`: each behaviour has one implementation.
  """

  inner: optax.GradientTransformationExtraArgs
  window_length: Callable[[jax.Array], tuple[jax.Array, jax.Array]]
  reduction: str
  accumulator: Accumulator
  skip: SkipPolicy | None
  window_guard: bool
  strategy: str
  statistics: bool
  replicas: _replicas.Replicas = _replicas.Replicas()
  # The call that errors in `update` name: `MultiSteps.update` for the drop-in.
  update_name: str = "accumulate(...).update"
  # The constructor and its name for the skip policy, for the policy's errors.
  where: str = "accumulate"
  skip_name: str = "skip"

  @property
  def init_name(self) -> str:
    """The call that errors in `init` name: `accumulate(...).init` or `MultiSteps.init`."""
    return self.update_name.removesuffix(".update") + ".init"

  def transformation(self) -> optax.GradientTransformationExtraArgs:
    """The optax transformation: `init` and `update`."""
    return optax.GradientTransformationExtraArgs(self.init, self.update)

  def init(self, params: Params) -> AccumulateState:
    """The state before the first micro-step: an empty window.

    Raises a TypeError naming `init(params=...)` where a leaf of `params` is no
    JAX or NumPy array (a string, a Python number: its dtype would be a guess).
    """
    _validation.check_arrays(self.init_name, "params", params)
    gradient_step = jnp.zeros((), jnp.int32)
    acc_grads = jax.tree.map(self._zeros_for, params)
    skip_state = ()
    if self.skip is not None:
      zeros = _targets.gradient_zeros(params, acc_grads)  # as `update` gets them
      _, skip_state = self._decide(zeros, gradient_step, params)
    return AccumulateState(
      mini_step=jnp.zeros((), jnp.int32),
      gradient_step=gradient_step,
      inner_opt_state=self.inner.init(params),
      acc_grads=acc_grads,
      skip_state=skip_state,
      acc_weight=jnp.zeros((), jnp.float32),
      num_skipped=jnp.zeros((), jnp.int32),
      emitted=jnp.zeros((), jnp.bool_),
      rounding_key=self.accumulator.init_key(),
      statistics=_statistics.init() if self.statistics else (),
      num_skipped_windows=jnp.zeros((), jnp.int32),
      num_empty_windows=jnp.zeros((), jnp.int32),
      num_clamped_windows=jnp.zeros((), jnp.int32),
    )

  def _zeros_for(self, param: jax.Array) -> jax.Array | None:
    """A parameter's empty accumulator; None for an integer or bool one.

    Such a leaf has no gradient (`eqx.filter_grad` and optax give None there,
    and `update` refuses non-floating updates), so it gets no accumulator.
    """
    if not jnp.issubdtype(jnp.result_type(param), jnp.inexact):
      return None
    return self.accumulator.zeros_like("accumulate", param, self.replicas)

  def update(
    self,
    updates: Updates,
    state: AccumulateState,
    params: Params = None,
    *,
    weight: Scalar | None = None,
    flush: Scalar = False,
    **extra_args: object,
  ) -> tuple[Any, AccumulateState]:
    """One micro-step: adds `updates`; emits the inner optimizer's updates if the window closes."""
    with jax.named_scope(_spans.WINDOW_ADD):
      state, close_window = self._add(self.update_name, updates, state, params, weight, flush)
    target: _targets.IntoAccumulator | _targets.IntoBuffer = _targets.IntoBuffer()
    if self.replicas.alone:
      target, carried = _targets.IntoAccumulator(), state.acc_grads
    else:
      carried = self.replicas.zeros_of_updates(updates, params)
    with (
      self._naming_inner_state(self.update_name, state, params),
      jax.named_scope(_spans.WINDOW_CLOSE),
    ):
      try:
        return self._emit(target, carried, updates, state, close_window, params, extra_args)
      except _targets.OtherShapes as other:
        # The inner optimizer emits other dtypes than the gradients' (float32
        # updates for bfloat16 gradients, or more precise than the accumulator):
        # trace again with a carry of its shapes.
        carried = _targets.map_updates(_replicas.typed_zeros, other.shapes)
        return self._emit(
          _targets.IntoBuffer(), carried, updates, state, close_window, params, extra_args
        )

  @contextlib.contextmanager
  def _naming_inner_state(
    self, where: str, state: AccumulateState, params: Params
  ) -> Iterator[None]:
    """Where the micro-step fails, first raises naming `where` if the inner state is foreign.

    Checked only once the step has failed: the state of another optimizer
    (SGD's where Adam's is expected) fails deep in the inner optimizer's trace
    with an AttributeError that names neither the call nor the state. Both
    forms, `update` and the fast path, go through here.
    """
    try:
      yield
    except Exception:
      _checks.check_inner_state(where, self.inner, state, params)
      raise

  def _emit(
    self,
    target: _targets.IntoAccumulator | _targets.IntoBuffer,
    carried: Updates,
    like: Updates,
    state: AccumulateState,
    close_window: jax.Array,
    params: Params,
    extra_args: dict,
  ) -> tuple[Updates, AccumulateState]:
    """`update`'s conditionals: the updates written into `carried`, emitted where they ran.

    Raises `_targets.OtherShapes` where the updates do not fit `target`'s carry.
    """
    operand = (carried, state.inner_opt_state)
    written, inner_state, window = self._close(
      like, state, close_window, operand, params, extra_args, target
    )
    state = self._closed(state, close_window, window, inner_state)
    dtypes, state = target.emitted(state, written, like)
    emitted = state.emitted
    emit = lambda d, u: jnp.where(emitted, u.astype(d.dtype), jnp.zeros((), d.dtype))  # noqa: E731
    return _targets.map_updates(emit, dtypes, written), state

  def apply(
    self,
    grads: Updates,
    state: AccumulateState,
    params: Params,
    weight: Scalar | None,
    flush: Scalar,
    extra_args: dict,
  ) -> tuple[Any, AccumulateState]:
    """The fast path's micro-step: `update`, then `optax.apply_updates`, in one conditional.

    The optimizer and the parameter write share the conditional, which carries
    the parameters: no tree of updates outlives it, and a micro-step that does
    not close the window leaves the parameters in place.
    """
    if params is None:
      raise TypeError(
        "`apply_gradients(params=...)` is required: the fast path writes the window's updates "
        "into the parameters, got params=None. Pass the parameters opt_state was built for."
      )
    with jax.named_scope(_spans.WINDOW_ADD):
      state, close_window = self._add("apply_gradients", grads, state, params, weight, flush)
    operand = (params, state.inner_opt_state)
    with (
      self._naming_inner_state("apply_gradients", state, params),
      jax.named_scope(_spans.WINDOW_CLOSE),
    ):
      params, inner_state, window = self._close(
        grads, state, close_window, operand, params, extra_args, _targets.IntoParams()
      )
    return params, self._closed(state, close_window, window, inner_state)

  def _add(
    self,
    where: str,
    updates: Updates,
    state: AccumulateState,
    params: Params,
    weight: Scalar | None,
    flush: Scalar,
  ) -> tuple[AccumulateState, jax.Array]:
    """Adds one micro-batch into the window; returns the state and whether to close it."""
    state = check_state(where, state)
    self.replicas.check_updates(where, updates)
    _validation.check_tree_matches(
      where, "updates", updates, state.acc_grads, "the accumulator built by init(params)"
    )
    if params is not None:
      self.check_params(where, params, state.acc_grads)
    weighted = weight is not None
    checked = None if weight is None else self.replicas.weight(where, weight)
    flush = _validation.as_flag(where, "flush", flush)
    verdict = self._verdict(where, updates, state, params, checked)
    acc_grads, rounding_key = self._sum_into(updates, state, verdict, weighted)
    accepted = jnp.ones((), jnp.bool_) if verdict.skip is None else ~verdict.skip
    # `flush()`'s own call (weight exactly 0) is no micro-step: a flush of an
    # empty window closes no window.
    counts = self.replicas.counts(accepted)
    if checked is not None:
      counts = counts & ~(flush & jnp.all(checked == 0))
    mini_step = _increment_where(counts, state.mini_step)
    length, clamped = self.window_length(state.gradient_step)
    close_window = flush | (counts & (mini_step >= length))
    statistics = state.statistics
    if self.statistics:
      statistics = _statistics.add(statistics, updates, verdict.weight, self.replicas.leading_axis)
    state = state._replace(
      mini_step=mini_step,
      acc_grads=acc_grads,
      skip_state=verdict.skip_state,
      # Summed over replicas under mesh axes; a plain scalar add otherwise.
      acc_weight=state.acc_weight
      + (jnp.sum(verdict.weight) if verdict.weight.ndim else verdict.weight),
      num_skipped=_increment_where(~accepted, state.num_skipped),
      num_clamped_windows=_increment_where(close_window & clamped, state.num_clamped_windows),
      emitted=jnp.zeros((), jnp.bool_),
      rounding_key=rounding_key,
      statistics=statistics,
    )
    return state, close_window

  def check_params(
    self, where: str, params: Params, acc_grads: Updates, name: str = "params"
  ) -> None:
    """Checks `params` against the accumulator: tree, leaf kinds and shapes, nothing traced.

    Run before the step is traced, so that parameters unlike those the state
    was built for are named as `params`, not found deep in the inner
    optimizer (or blamed on its state). Under mesh axes each accumulator has
    a leading replica axis before the parameter's shape.
    """
    checked = _checks.check_params(where, params, acc_grads, name)
    wanted = [
      None if acc is None else self.replicas.accumulator_shape(acc, jnp.shape(param))
      for _, param, acc in checked
    ]
    _checks.check_param_shapes(where, checked, wanted, name)

  def _verdict(
    self,
    where: str,
    updates: Updates,
    state: AccumulateState,
    params: Params,
    weight: jax.Array | None,
  ) -> _Verdict:
    """Runs the skip policy and checks the weight: a NaN, inf or negative one skips."""
    should_skip, skip_state = None, state.skip_state
    if self.skip is not None:
      should_skip, skip_state = self._decide(updates, state.gradient_step, params)
    should_skip, weight = _window.admit(weight, should_skip)
    # Each replica's micro-batch weighs in (1 each unweighted).
    return _Verdict(should_skip, self.replicas.spread(where, weight), skip_state)

  def _decide(
    self, updates: Updates, gradient_step: jax.Array, params: Params
  ) -> tuple[jax.Array, PyTree]:
    """Runs the skip policy; raises naming it where it breaks its contract.

    The contract, optax's `ShouldSkipUpdateFunction`: a pair `(should_skip,
    skip_state)`, `should_skip` a scalar bool.
    """
    assert self.skip is not None
    out = self.skip(updates, gradient_step, params)
    policy = f"`{self.where}({self.skip_name}=...)`"
    if not (isinstance(out, tuple | list) and len(out) == 2):
      raise TypeError(
        f"{policy}: the skip policy must return a pair (should_skip, skip_state), should_skip a "
        f"scalar bool and skip_state any pytree, but it returned {_validation.shown(out)}."
      )
    should_skip, skip_state = out
    is_array = isinstance(should_skip, (bool, np.bool_, jax.Array, np.ndarray))
    if not is_array or jnp.shape(should_skip) != () or jnp.result_type(should_skip) != jnp.bool_:
      got = (
        f"dtype {jnp.result_type(should_skip).name} and shape {jnp.shape(should_skip)}"
        if is_array
        else _validation.shown(should_skip)
      )
      raise ValueError(
        f"{policy}: the skip policy must return a scalar bool as its first output "
        f"(should_skip, skip_state), got {got}."
      )
    return jnp.asarray(should_skip), skip_state

  def _sum_into(
    self, updates: Updates, state: AccumulateState, verdict: _Verdict, weighted: bool
  ) -> tuple[Any, Any]:
    """The accumulator after adding `updates` (unless skipped), and the next rounding key."""
    rounding_key, seeds = self.accumulator.split_key(
      state.rounding_key, state.acc_grads, self.replicas
    )
    if self.accumulator.stochastic:
      rounding_key = self.replicas.next_key(verdict.skip, state.rounding_key, rounding_key)
    # A closed window's accumulator is cleared here rather than when it closes:
    # the select fuses into the add, where a reset in `close` made XLA copy the
    # accumulator out before overwriting it (see benchmarks/RESULTS.md).
    window_open = state.mini_step > 0
    weight = verdict.weight if weighted else None

    def add_leaf(g: jax.Array | None, acc: jax.Array, seed: jax.Array | None) -> jax.Array | None:
      if g is None:  # None where the parameters hold None or no floats: pass it through.
        return None
      # Selects, not multiplies: a stale NaN (no skip policy) must not survive,
      # and 0 * NaN would still be NaN.
      acc = jnp.where(window_open, acc, jnp.zeros((), acc.dtype))
      w = weight
      if w is not None and w.ndim:  # one weight per replica, along the leading axis
        w = jnp.reshape(w, w.shape + (1,) * (g.ndim - 1))
      return _window.add(self.accumulator, acc, g, w, verdict.skip, seed)

    acc_grads = jax.tree.map(add_leaf, updates, state.acc_grads, seeds, is_leaf=_IS_NONE)
    return acc_grads, rounding_key

  def _close(
    self,
    like: Updates,
    state: AccumulateState,
    close_window: jax.Array,
    operand: tuple[Any, Any],
    params: Params,
    extra_args: dict,
    target: _targets.Target,
  ) -> tuple[Any, Any, _Window]:
    """Where `close_window` holds, closes the window: `_step`'s outputs, and the window.

    Alone, two conditionals in a row, the window's check and then the
    optimizer's step: nested, they made XLA's compile time grow by half on a
    model of 600 leaves (benchmarks/RESULTS.md, "Compile time"). Across
    replicas, one conditional holds both: the window's sums come out of the
    all-reduce replica-invariant, and a loop's carry that went in per replica
    would come out per replica, and so would the optimizer's state.
    """
    if self.replicas.alone:
      window = self._window(like, state, close_window)
      return *self._step(window, like, operand, params, extra_args, target), window

    def close(carry: tuple) -> tuple:
      window = self._reduce(like, state)
      out = self._step(window, like, carry[0], params, extra_args, target)
      return out, (window.total_weight, window.statistics, window.runs)

    scalars = (state.acc_weight, state.statistics, jnp.zeros((), jnp.bool_))
    (out, inner_state), (total_weight, statistics, runs) = _branching.run_if(
      self.strategy, close_window, close, (operand, scalars)
    )
    return out, inner_state, _Window(None, total_weight, runs, statistics)

  def _window(self, like: Updates, state: AccumulateState, close_window: jax.Array) -> _Window:
    """`_reduce` where `close_window` holds; else a window that does not run."""

    def close(_: tuple) -> tuple:
      window = self._reduce(like, state)
      return window.total_weight, window.statistics, window.runs

    scalars = (state.acc_weight, state.statistics, jnp.zeros((), jnp.bool_))
    total_weight, statistics, runs = _branching.run_if(self.strategy, close_window, close, scalars)
    return _Window(state.acc_grads, total_weight, runs, statistics)

  def _reduce(self, like: Updates, state: AccumulateState) -> _Window:
    """The window's sums, across replicas if any, the window guard and the statistics."""
    running: tuple = ()
    if self.statistics:
      # The micro-batch count travels as float32 (exact: it is at most k times
      # the replicas), so that one all-reduce of one dtype carries everything.
      count = state.statistics.num_micro_batches.astype(jnp.float32)
      running = (state.statistics.squared_norm_sum, count)
    # The one cross-replica reduction of the window (the weights and statistics
    # are per replica under a named axis, summed as they came under mesh axes).
    acc_grads, (total_weight, running) = self.replicas.reduce(
      state.acc_grads, (state.acc_weight, running)
    )
    runs = total_weight > 0
    if self.window_guard:
      runs = runs & _window_is_finite(self.reduction, like, acc_grads, total_weight)
    statistics = state.statistics
    if self.statistics:
      # A window that does not run keeps the last window's statistics.
      weight = jnp.where(runs, total_weight, jnp.float32(0))
      statistics = _statistics.close(
        statistics, acc_grads, weight, running[0], running[1].astype(jnp.int32)
      )
    return _Window(acc_grads, total_weight, runs, statistics)

  def _step(
    self,
    window: _Window,
    like: Updates,
    operand: tuple[Any, Any],
    params: Params,
    extra_args: dict,
    target: _targets.Target,
  ) -> tuple[Any, Any]:
    """Where the window runs: its updates, written into `target`'s carry, and the inner state.

    `operand` is `(carry, inner_state)`; the carry is what is returned where
    the window does not run.
    """

    def step(operand: tuple[Any, Any]) -> tuple[Any, Any]:
      carry, inner_state = operand
      # Read the parameters and the accumulator from the carry where it holds
      # them, not from the closure: the same value in both makes XLA copy what
      # the loop updates in place.
      current, sums = target.read(carry, params, window.acc_grads)
      value = _window.finisher(self.reduction, window.total_weight)
      gradient = _targets.map_updates(lambda g, acc: value(acc, g.dtype), like, sums)
      updates, new_inner_state = self.inner.update(gradient, inner_state, current, **extra_args)
      new_inner_state = _targets.keep_dtypes(new_inner_state, inner_state)
      return target.write(carry, updates, like, sums), new_inner_state

    return _branching.run_if(self.strategy, window.runs, step, operand)

  def _closed(
    self, state: AccumulateState, close_window: jax.Array, window: _Window, inner_state: OptState
  ) -> AccumulateState:
    """The state after the micro-step: where a window closed, counters advanced and reset.

    The accumulator is left for the next `_add` to clear.
    """
    has_weight = window.total_weight > 0
    skipped_window = close_window & has_weight & ~window.runs
    empty_window = close_window & ~has_weight & (state.mini_step > 0)
    return state._replace(
      mini_step=jnp.where(close_window, jnp.zeros((), jnp.int32), state.mini_step),
      gradient_step=_increment_where(window.runs, state.gradient_step),
      inner_opt_state=inner_state,
      # zeros_like: under `shard_map` it keeps the per-replica type.
      acc_weight=jnp.where(close_window, jnp.zeros_like(state.acc_weight), state.acc_weight),
      emitted=window.runs,
      statistics=window.statistics,
      num_skipped_windows=_increment_where(skipped_window, state.num_skipped_windows),
      num_empty_windows=_increment_where(empty_window, state.num_empty_windows),
    )


def _window_is_finite(
  reduction: str, like: Updates, acc_grads: Updates, total_weight: jax.Array
) -> jax.Array:
  """The window guard: whether the gradient the inner optimizer would get is finite.

  Checked on the window's reduced sums, averaged and cast as the inner optimizer
  receives them, by one sum per leaf of that gradient times 0 (NaN where an entry
  is not finite; why a sum and not a max: docs/performance.md).
  """
  inverse = inverse_weight(reduction, total_weight)
  value = _window.finisher(reduction, total_weight)
  finite = jnp.isfinite(total_weight) & jnp.isfinite(inverse)
  sums = []
  for target, acc in zip(
    jax.tree.leaves(like, is_leaf=_IS_NONE), jax.tree.leaves(acc_grads, is_leaf=_IS_NONE)
  ):
    if target is None or acc is None or not acc.size:
      continue
    gradient = value(acc, target.dtype)
    zero = jnp.zeros((), gradient.dtype)
    sums.append(jnp.real(jnp.sum(gradient * zero)).astype(jnp.float32))  # 0, or NaN
  if sums:
    finite = finite & jnp.all(jnp.isfinite(jnp.stack(sums)))
  return finite


def build(
  where: str,
  inner: optax.GradientTransformation,
  k: KSchedule,
  *,
  names: tuple[str, str, str] = ("inner", "k", "skip"),
  reduction: str = "mean",
  accumulator: Accumulator | DTypeLike | None = None,
  skip: SkipPolicy | None = None,
  window_guard: bool = True,
  axis_name: Hashable | None = None,
  strategy: str = "cond",
  statistics: bool = False,
) -> Accumulation:
  """Validates an accumulation's arguments, with errors naming `where` and `names`.

  `names` are the names the caller gives `inner`, `k` and `skip`
  (`MultiSteps` calls them `opt`, `every_k_schedule`, `should_skip_update_fn`).
  """
  inner_name, every_k_name, skip_name = names
  if not isinstance(inner, optax.GradientTransformation):
    raise TypeError(
      f"`{where}({inner_name}=...)` must be an optax.GradientTransformation, "
      f"got {inner_name}={inner!r}."
    )
  _validation.check_k(where, k, every_k_name)
  for name, flag in (("window_guard", window_guard), ("statistics", statistics)):
    if not isinstance(flag, bool):
      raise TypeError(f"`{where}({name}=...)` must be a bool, got {name}={flag!r}.")
  _validation.check_choice(where, "reduction", reduction, REDUCTIONS)
  _validation.check_callable_or_none(where, skip_name, skip)
  _validation.check_choice(where, "strategy", strategy, _branching.STRATEGIES)
  replicas = _replicas.Replicas.of(where, axis_name)
  return Accumulation(
    inner=optax.with_extra_args_support(inner),
    window_length=_validation.window_length(k),
    reduction=reduction,
    accumulator=as_accumulator(where, accumulator),
    skip=skip,
    window_guard=window_guard,
    strategy=strategy,
    statistics=statistics,
    replicas=replicas,
    update_name="accumulate(...).update" if where == "accumulate" else f"{where}.update",
    where=where,
    skip_name=skip_name,
  )


def accumulation_of(tx: object) -> Accumulation | None:
  """The accumulation behind a transformation made by `accumulate`, else None."""
  owner = getattr(getattr(tx, "update", None), "__self__", None)
  return owner if isinstance(owner, Accumulation) else None


def accumulate(
  inner: optax.GradientTransformation,
  k: int | Callable[[jax.Array], Any],
  *,
  reduction: str = "mean",
  accumulator: Accumulator | DTypeLike | None = None,
  skip: SkipPolicy | None = None,
  window_guard: bool = True,
  axis_name: Hashable | None = None,
  strategy: str = "cond",
  statistics: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Accumulates gradients over a window of micro-steps, then runs `inner` once.

  On each micro-step but the last of a window, `update` adds the gradients into
  an accumulator and emits exact zero updates; on the k-th it hands the window's
  mean (or sum) gradient to `inner` and emits its updates, so `inner` steps once
  per window, as on a batch k times larger. A window whose gradient holds a NaN or
  inf is dropped whole. `update(updates, state, params, *, weight=None,
  flush=False, **extra)` also takes the micro-batch's `weight` (the window emits
  `sum(w_i g_i) / sum(w_i)`; a NaN, infinite or negative weight skips it),
  `flush=True` (close the window now) and `inner`'s extra arguments, which reach
  it on the closing micro-step. Guide: [what a window does][what-a-window-does].

  Args:
    inner: the optimizer to run once per window (any optax transformation).
    k: micro-steps per window: a positive int, or a schedule `gradient_step -> k`
      (floored; a value that turns NaN, infinite or below 1 gives a window of 1).
    reduction: `"mean"` (default) or `"sum"` of the window's gradients.
    accumulator: what the window is summed into: None (default: each parameter's
      dtype widened to at least 32 bits), a dtype, or
      `optaccum.stochastic_bfloat16(key)`.
    skip: a per-micro-batch policy `(grads, gradient_step, params) -> (skip,
      info)`, e.g. `optaccum.skip.not_finite`; None (default) admits every one.
    window_guard: drop a window whose gradient is not finite (default True).
    axis_name: the replicas' axis (a name or a tuple), for one cross-replica
      reduction per window: inside `jax.shard_map`/`pmap` over it, or under plain
      `jax.jit` with a mesh in context, where `update` takes gradients with a
      leading replica axis (`optaccum.parallel.per_replica`).
    strategy: how the closing step is conditional: `"cond"` (default,
      reverse-differentiable), `"loop"` or `"select"`.
    statistics: keep each window's gradient statistics in the state
      (`optaccum.status(...).statistics`).

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is an `AccumulateState`.

  Raises:
    ValueError: for a bad `k` (a schedule's value at gradient step 0 too),
      `reduction` or `strategy`; at `update`, for `updates` or `params` whose tree
      or shapes differ from the accumulator, before anything is traced.
    TypeError: for a bad `inner`, `skip` or flag; at `init` or `update`, for leaves
      that are no floating-point arrays, or a skip policy that returns no pair.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optaccum
    >>> tx = optaccum.accumulate(optax.sgd(1.0), k=2)
    >>> params = {"w": jnp.zeros(2)}
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": jnp.array([1.0, 2.0])}, state, params)
    >>> updates["w"]  # first micro-step: nothing yet
    Array([0., 0.], dtype=float32)
    >>> updates, state = tx.update({"w": jnp.array([3.0, 4.0])}, state, params)
    >>> updates["w"]  # second: -lr * mean of the two
    Array([-2., -3.], dtype=float32)
  """
  return build(
    "accumulate",
    inner,
    k,
    reduction=reduction,
    accumulator=accumulator,
    skip=skip,
    window_guard=window_guard,
    axis_name=axis_name,
    strategy=strategy,
    statistics=statistics,
  ).transformation()

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

from optaccum import _branching, _replicas, _spans, _statistics, _validation, _window
from optaccum._accumulator import (
  REDUCTIONS,
  Accumulator,
  as_accumulator,
  inverse_weight,
)
from optaccum._skip import SkipPolicy
from optaccum._state import AccumulateState, check_state, is_state, locate_state
from optaccum._types import DTypeLike, KSchedule, OptState, Params, PyTree, Scalar, Updates

_IS_NONE = lambda x: x is None  # noqa: E731
T = TypeVar("T")


def _map(fn: Callable[..., Any], updates: Updates, *rest: PyTree) -> Any:
  """Maps over an updates tree, passing its None leaves through."""
  return jax.tree.map(
    lambda u, *r: None if u is None else fn(u, *r), updates, *rest, is_leaf=_IS_NONE
  )


def _same_shapes(tree: PyTree, shapes: PyTree) -> bool:
  """Whether `tree` has the structure, shapes and dtypes of `shapes`."""
  structure = jax.tree.structure(tree, is_leaf=_IS_NONE)
  if structure != jax.tree.structure(shapes, is_leaf=_IS_NONE):  # type: ignore[operator]
    return False
  return all(
    leaf is None or (leaf.shape, leaf.dtype) == (shape.shape, shape.dtype)
    for leaf, shape in zip(
      jax.tree.leaves(tree, is_leaf=_IS_NONE), jax.tree.leaves(shapes, is_leaf=_IS_NONE)
    )
  )


def _keep_dtypes(new: T, old: T) -> T:
  """`new` with each array leaf cast back to the dtype of `old`'s.

  Optax creates moments in the parameters' dtype and returns them promoted
  after an update with wider gradients (bfloat16 parameters, float32
  gradients). A loop or conditional must keep its carry's types, and a state
  whose dtypes drift from window to window would retrace every step, so the
  inner state keeps the dtypes `init` gave it, as `optax.MultiSteps` does.
  For the same reason a leaf that Optax's update turns into None (a moment of
  an integer parameter, which gets no gradient) keeps its value from `init`.
  """

  def cast(n: PyTree, o: PyTree) -> PyTree:
    if n is None:
      return o
    if hasattr(n, "dtype") and hasattr(o, "dtype") and n.dtype != o.dtype:
      return n.astype(o.dtype)
    return n

  return jax.tree.map(cast, new, old, is_leaf=_IS_NONE)


def _holds_exactly(acc_grads: Updates, updates: Updates) -> bool:
  """Whether each accumulator leaf's dtype holds the update leaf's values exactly."""

  def holds(acc: jax.Array, update: jax.Array) -> bool:
    a, u = jnp.dtype(acc.dtype), jnp.dtype(update.dtype)
    if a == u:
      return True
    complex_kind = jnp.issubdtype(a, jnp.complexfloating)
    if complex_kind != jnp.issubdtype(u, jnp.complexfloating):
      return False
    if not (jnp.issubdtype(a, jnp.inexact) and jnp.issubdtype(u, jnp.inexact)):
      return False
    wide, narrow = jnp.finfo(a), jnp.finfo(u)
    return (
      wide.nmant >= narrow.nmant and wide.maxexp >= narrow.maxexp and wide.minexp <= narrow.minexp
    )

  return all(
    u is None or holds(a, u)
    for u, a in zip(
      jax.tree.leaves(updates, is_leaf=_IS_NONE), jax.tree.leaves(acc_grads, is_leaf=_IS_NONE)
    )
  )


class _OtherShapes(Exception):
  """Raised while tracing: the inner optimizer's updates are not shaped like the carry."""

  def __init__(self, shapes: PyTree):
    super().__init__("the inner optimizer's updates differ from the gradients' shapes")
    self.shapes = shapes


def _gradient_zeros(params: Params, acc_grads: Updates) -> Any:
  """Zero gradients: the parameters' dtypes, the accumulator's shapes and placement.

  Under mesh axes that is one zero gradient per replica.
  """
  return _map(lambda acc, p: jnp.zeros_like(acc, jnp.result_type(p)), acc_grads, params)


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


def _apply_update(param: jax.Array, update: jax.Array | None) -> jax.Array:
  """`optax.apply_updates` for one leaf, with its promotion spelled out (strict mode passes).

  The sum is formed in the wider of the two dtypes (float32 for a bfloat16
  parameter and a float32 update) and cast back to the parameter's, as optax
  does under standard promotion. As `eqx.apply_updates`, a None update (an
  integer parameter) leaves its parameter.
  """
  if update is None:
    return param
  wide = update.dtype if jnp.finfo(update.dtype).bits > jnp.finfo(param.dtype).bits else param.dtype
  return (param.astype(wide) + update.astype(wide)).astype(param.dtype)


class _IntoParams:
  """The fast path's carry: the parameters. The closing step applies its updates to them."""

  def read(self, carry: Params, params: Params, sums: Updates) -> tuple[Params, Updates]:
    """The parameters and the window's sums the step reads (from the carry where it holds them)."""
    return carry, sums

  def write(self, carry: Params, updates: Updates, like: Updates, sums: Updates) -> Params:
    return jax.tree.map(_apply_update, carry, updates, is_leaf=_IS_NONE)


class _IntoAccumulator:
  """`update`'s carry where the updates fit the accumulator: the accumulator itself.

  Once the window's gradient is formed the accumulator is free (the next
  micro-step clears it), so the closing step writes the updates there and
  every micro-step emits `where(emitted, acc, 0)`, which XLA fuses into the
  caller's `apply_updates`: a micro-step that does not close its window reads
  the gradient once for the add and the accumulator once for the caller's
  write, and allocates nothing (tests/test_memory.py).
  """

  def read(self, carry: Updates, params: Params, sums: Updates) -> tuple[Params, Updates]:
    return params, carry

  def write(self, carry: Updates, updates: Updates, like: Updates, sums: Updates) -> Updates:
    if not (_same_shapes(updates, like) and _holds_exactly(sums, updates)):
      raise _OtherShapes(_map(_replicas.abstract, updates))
    return _map(lambda u, acc: u.astype(acc.dtype), updates, sums)

  def emitted(
    self, state: AccumulateState, written: Updates, like: Updates
  ) -> tuple[Updates, AccumulateState]:
    """The dtypes to emit in, and the state holding what was written."""
    return like, state._replace(acc_grads=written)


class _IntoBuffer:
  """`update`'s carry elsewhere: a buffer of zeros shaped like the updates.

  Across replicas (the gradients and the accumulator are per replica, the
  updates must be the same on every replica, and under `shard_map` typed so),
  or where the updates do not fit the accumulator.
  """

  def read(self, carry: Updates, params: Params, sums: Updates) -> tuple[Params, Updates]:
    return params, sums

  def write(self, carry: Updates, updates: Updates, like: Updates, sums: Updates) -> Updates:
    if not _same_shapes(updates, carry):
      raise _OtherShapes(_map(_replicas.abstract, updates))
    return updates

  def emitted(
    self, state: AccumulateState, written: Updates, like: Updates
  ) -> tuple[Updates, AccumulateState]:
    return written, state


_Target = _IntoParams | _IntoAccumulator | _IntoBuffer


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
      zeros = _gradient_zeros(params, acc_grads)  # as `update` gets them
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
    target: _IntoAccumulator | _IntoBuffer = _IntoBuffer()
    if self.replicas.alone:
      target, carried = _IntoAccumulator(), state.acc_grads
    else:
      carried = self.replicas.zeros_of_updates(updates)
    with (
      self._naming_inner_state(self.update_name, state, params),
      jax.named_scope(_spans.WINDOW_CLOSE),
    ):
      try:
        return self._emit(target, carried, updates, state, close_window, params, extra_args)
      except _OtherShapes as other:
        # The inner optimizer emits other dtypes than the gradients' (float32
        # updates for bfloat16 gradients, or more precise than the accumulator):
        # trace again with a carry of its shapes.
        carried = _map(_replicas.typed_zeros, other.shapes)
        return self._emit(_IntoBuffer(), carried, updates, state, close_window, params, extra_args)

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
      self._check_inner_state(where, state, params)
      raise

  def _check_inner_state(self, where: str, state: AccumulateState, params: Params) -> None:
    """Raises naming `where` if `state.inner_opt_state` is not the inner optimizer's.

    `params` reach here only once `_add` has found them of the accumulator's
    tree and shapes, so a difference found here is the state's, not theirs.
    """
    like = state.acc_grads if params is None else params
    try:
      expected = jax.tree.structure(jax.eval_shape(self.inner.init, like))
    except Exception:
      return  # the parameters do not say what the inner state should be
    given = jax.tree.structure(state.inner_opt_state)
    if given != expected:  # type: ignore[operator]  # PyTreeDef: no stubs
      raise ValueError(
        f"`{where}(state=...)` holds an inner_opt_state that is not the state "
        f"of this accumulation's inner optimizer (another optimizer's?).\n"
        f"  state.inner_opt_state: {given}\n"
        f"  expected (the inner optimizer's init on params): {expected}"
      ) from None

  def _emit(
    self,
    target: _IntoAccumulator | _IntoBuffer,
    carried: Updates,
    like: Updates,
    state: AccumulateState,
    close_window: jax.Array,
    params: Params,
    extra_args: dict,
  ) -> tuple[Updates, AccumulateState]:
    """`update`'s conditionals: the updates written into `carried`, emitted where they ran.

    Raises `_OtherShapes` where the updates do not fit `target`'s carry.
    """
    operand = (carried, state.inner_opt_state)
    written, inner_state, window = self._close(
      like, state, close_window, operand, params, extra_args, target
    )
    state = self._closed(state, close_window, window, inner_state)
    dtypes, state = target.emitted(state, written, like)
    emitted = state.emitted
    emit = lambda d, u: jnp.where(emitted, u.astype(d.dtype), jnp.zeros((), d.dtype))  # noqa: E731
    return _map(emit, dtypes, written), state

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
        grads, state, close_window, operand, params, extra_args, _IntoParams()
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
      self._check_params_match(where, params, state.acc_grads)
    weighted = weight is not None
    checked = None if weight is None else self.replicas.weight(where, weight)
    flush = _validation.as_flag(where, "flush", flush)
    verdict = self._verdict(where, updates, state, params, checked)
    acc_grads, rounding_key = self._sum_into(updates, state, verdict, weighted)
    accepted = jnp.ones((), jnp.bool_) if verdict.skip is None else ~verdict.skip
    # Across replicas every micro-step counts, skipped or not, so that all
    # replicas close their windows together; alone, a skipped micro-batch is
    # as if it never happened. `flush()`'s own call (weight exactly 0) is no
    # micro-step: a flush of an empty window closes no window.
    counts = jnp.ones((), jnp.bool_) if self.replicas.decide_apart else accepted
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

  def _check_params_match(self, where: str, params: Params, acc_grads: Updates) -> None:
    """Checks `params` against the accumulator: tree, leaf kinds and shapes, nothing traced.

    Run before the step is traced, so that parameters unlike those the state
    was built for are named as `params`, not found deep in the inner
    optimizer (or blamed on its state). Under mesh axes each accumulator has
    a leading replica axis before the parameter's shape.
    """
    checked = _check_params(where, params, acc_grads)
    lead = self.replicas.leading_axis
    wanted = [
      None if acc is None else (jnp.shape(acc)[:1] if lead else ()) + tuple(jnp.shape(param))
      for _, param, acc in checked
    ]
    note = " (a leading axis of replicas, then the parameter's shape)" if lead else ""
    _check_param_shapes(where, checked, wanted, note)

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
    if verdict.skip is not None and not self.replicas.decide_apart and self.accumulator.stochastic:
      # A skipped micro-batch draws no bits: the run is as if it never happened.
      # (Across replicas the key is shared and must advance on all of them.)
      rounding_key = jnp.where(verdict.skip, state.rounding_key, rounding_key)
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
    target: _Target,
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
    target: _Target,
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
      gradient = _map(lambda g, acc: value(acc, g.dtype), like, sums)
      updates, new_inner_state = self.inner.update(gradient, inner_state, current, **extra_args)
      new_inner_state = _keep_dtypes(new_inner_state, inner_state)
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

  Checked on the window's reduced sums (after weighting and the cross-replica
  sum), as the inner optimizer would receive them: averaged and cast to the
  gradients' dtype. No NaN or inf gets past it, whatever its source: a NaN
  micro-batch, an overflowing float32 sum, a huge weight, a mean too large for
  float16. One sum per leaf, in the window-closing step only, of that
  gradient times 0: 0 unless an entry is NaN or infinite, and then NaN. A sum
  propagates NaN where XLA:CPU's vectorized max drops it; it fuses the mean,
  the cast and the product into one read of the leaf, with no temporary; and
  it compiles to fewer operations than a max (benchmarks/RESULTS.md, "Compile
  time"). The per-leaf sums are checked together, as one vector.
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

  For each micro-step but the last of a window the transformation adds the
  gradients into an accumulator (at least float32) and emits exact zero updates; on the
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

  A weight that is NaN, infinite or negative skips its micro-batch (it adds
  nothing, and is counted in `num_skipped`). The inner optimizer's own extra
  arguments (`value=` for `optax.polyak_sgd`, `optax.contrib.reduce_on_plateau`
  or `optax.lbfgs`'s line search) reach it only on the micro-step that closes
  the window: pass that micro-step's values (e.g. the window's mean loss).
  Micro-batches are separate forward passes, so a model with dropout draws
  its own masks for each, as with separate batches: the window's gradient
  then equals a large batch's only in distribution, not bit for bit (the
  large batch draws one mask for all its rows). Keep the dropout key in the
  training state (an `nnx.Rngs`, a key field) so a resumed run draws the same
  masks.

  By default no NaN or inf reaches the parameters, whatever its source: the
  *window guard* checks the window's gradient, as the inner optimizer would
  receive it, once per window. A window that is not finite runs no inner
  step, leaves the parameters and the inner state as they were, does not
  advance `gradient_step`, is cleared and is counted (see
  `optaccum.status(...).num_skipped_windows`), as PyTorch's GradScaler skips the
  optimizer step. To keep the rest of a window when one micro-batch is bad,
  add a per-micro-batch policy with `skip=optaccum.skip.not_finite`
  (docs/performance.md measures its cost).

  Args:
    inner: the optimizer to run once per window (any optax transformation,
      chains included).
    k: micro-steps per window: a positive int, or a schedule
      `gradient_step -> k` to grow the effective batch during training.
      Float values are floored. The schedule must give a finite value at
      gradient step 0; a value that later turns NaN, infinite or below 1
      gives a window of one micro-step (every micro-step emits), counted in
      `optaccum.status(...).num_clamped_windows`.
    reduction: `"mean"` (default) or `"sum"` of the window's gradients. With
      weights, `"sum"` emits `sum(w_i g_i)`.
    accumulator: what the window is summed into. None (default) takes each
      parameter's dtype widened to at least 32 bits: float32 for bfloat16 and
      float16 parameters, float64 stays float64, complex stays complex. A
      dtype sets the precision, and each leaf keeps its kind: complex
      parameters accumulate in the complex dtype of that precision (complex64
      for float32, bfloat16 or float16; complex128 for float64), real ones in
      the real dtype of a complex one. `optaccum.stochastic_bfloat16(key)`
      sums in bfloat16 (half the memory of float32) with unbiased stochastic
      rounding; see docs/precision_and_statistics.md.
    skip: a per-micro-batch skip policy `(grads, gradient_step, params) ->
      (skip, info)`, `skip` a scalar bool, e.g. `optaccum.skip.not_finite`; micro-batches it rejects
      never enter the window and are counted in `num_skipped`. None (default)
      accumulates every micro-batch, and leaves non-finite values to the
      window guard.
    window_guard: check the window's gradient once per window and drop the
      window whole if it holds a NaN or inf (default True). False lets such a
      gradient reach the inner optimizer.
    axis_name: for data-parallel training: the axis (a name, or a tuple of
      names) over which replicas hold different micro-batches. Micro-steps
      accumulate each replica's gradient with no communication; the step that
      closes the window reduces the replicas once, then runs `inner`: one
      all-reduce of the gradients per window. Where `init` and `update` run
      decides how. Inside `jax.shard_map` or `pmap` over the axis, each
      replica holds its own accumulator and a `psum` reduces them; a skipped
      micro-batch adds nothing but still counts towards the window length, so
      that replicas stay in step. Under plain `jax.jit` with a mesh in context
      (`with jax.set_mesh(mesh):`, for `init` too) whose axes of that name are
      Auto or Explicit, `update` takes per-replica gradients, every leaf with a
      leading axis of R replicas (R the product of the axes' sizes), as
      `optaccum.parallel.per_replica(grad_fn, axis_name)` returns them; the
      accumulator holds one sum per replica, sharded over the axes and
      otherwise like the parameters; the emitted updates have the parameters'
      shapes; `weight` may be one weight per replica, `[R]`, or a scalar
      (each replica's); and a skip policy decides for all replicas at once.
      See docs/distributed.md.
    strategy: how the window-closing step is made conditional: `"cond"`
      (default: `lax.cond`, reverse-differentiable), `"loop"` (a while loop
      of zero or one trips, which keeps the state in place; not
      differentiable), or `"select"` (compute every step and keep it with
      `jnp.where`, like `optax.MultiSteps`; it needs no predicate on the
      host). On CPU `"cond"` and `"loop"` run within run-to-run noise of each
      other and `"cond"` compiles about 15% faster (benchmarks/RESULTS.md).
    statistics: keep gradient statistics of each window in the state: the
      norm of the window's mean gradient, the mean squared norm of its
      micro-batch gradients, and from their spread unbiased estimates of
      |G|^2, tr(Sigma) and the gradient noise scale B_simple (McCandlish et
      al., 2018). Read them with `optaccum.status(...).statistics`. It adds a few
      scalars to the state and one squared norm to each micro-step.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is an
    `AccumulateState`.

  Raises:
    ValueError: at the call, for a bad `k` (a schedule whose value at
      gradient step 0 is no real scalar, NaN, inf or above 2**31 - 1 included),
      `reduction` or `strategy`.
    TypeError: at the call, for an `inner` that is no transformation, a
      `skip` that is not callable or non-bool flags; at `init`, for `params`
      that are not a pytree of arrays; at `init` or `update`, for a skip
      policy that returns no pair `(should_skip, skip_state)` (a ValueError
      where `should_skip` is no scalar bool).
    ValueError: at `update`, for `updates` or `params` (where given) whose
      tree or shapes differ from the accumulator `init` built (`params` are
      named, not the inner state), checked before the step is traced; a
      TypeError for one whose leaves are not floating-point arrays.

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


def _check_params(where: str, params: Params, acc_grads: Updates) -> list[tuple[Any, Any, Any]]:
  """Checks `params` against the accumulator in opt_state, before anything is traced.

  `params` must be the tree of the accumulator (None, where a parameter has no
  gradient, counts as a leaf on both sides), and each leaf with an
  accumulator a floating-point array (complex where the accumulator is).
  Structure and dtypes only: no optimizer is traced. Returns `(path, param,
  accumulator)` for every leaf, for `_check_param_shapes`.

  Raises:
    ValueError: naming `where(params=...)` and both trees where they differ.
    TypeError: where a leaf with an accumulator is not a floating-point array.
  """
  entries, given = jax.tree_util.tree_flatten_with_path(params, is_leaf=_IS_NONE)
  accumulators, expected = jax.tree.flatten(acc_grads, is_leaf=_IS_NONE)
  if given != expected:  # type: ignore[operator]  # PyTreeDef: no stubs
    raise ValueError(
      f"`{where}(params=...)` has a tree structure that does not match the accumulator "
      f"in opt_state.\n  params: {given}\n  the accumulator: {expected}"
    )
  hint = "Pass the parameters that opt_state was built for."
  for (path, param), acc in zip(entries, accumulators):
    if acc is None:
      continue
    if not isinstance(param, (jax.Array, np.ndarray)):
      raise _validation.array_error(where, "params", path, param, hint)
    if not jnp.issubdtype(param.dtype, jnp.inexact) or (
      jnp.iscomplexobj(param) and not jnp.iscomplexobj(acc)
    ):
      raise TypeError(
        f"`{where}(params=...)` has dtype {param.dtype.name} at "
        f"{_validation.place(path)}, where the accumulator in opt_state is "
        f"{acc.dtype.name}. {hint}"
      )
  return [(path, param, acc) for (path, param), acc in zip(entries, accumulators)]


def _check_param_shapes(
  where: str, checked: list[tuple[Any, Any, Any]], wanted: list[Any], note: str = ""
) -> None:
  """Raises naming `where(params=...)` where an accumulator is not of the shape `wanted`.

  `wanted` holds, for each entry of `_check_params`, the accumulator's shape
  (a tuple) as the parameter makes it (under mesh axes with a leading replica
  axis); None where there is no accumulator.
  """
  for (path, param, acc), want in zip(checked, wanted):
    if acc is not None and tuple(want) != tuple(jnp.shape(acc)):
      raise ValueError(
        f"`{where}(params=...)` does not match the accumulator in opt_state at "
        f"{_validation.place(path)}: params has shape {jnp.shape(param)}, "
        f"the accumulator {jnp.shape(acc)}{note}."
      )


def _check_flush(tx: object, opt_state: OptState, params: Params, acc_grads: Updates) -> None:
  """Checks `flush`'s arguments before anything is traced: `tx`, then `params`.

  `params` must be the tree of the accumulator (None, where a parameter has no
  gradient, counts as a leaf on both sides), of floating-point arrays, and
  `tx.init(params)` must build a state of the structure and accumulator shapes
  of `opt_state`: that both finds a `tx` that did not build `opt_state` and
  gives each accumulator's shape as `params` would make it (under mesh axes
  with a leading replica axis), so no shape is guessed.
  """
  if not (callable(getattr(tx, "init", None)) and callable(getattr(tx, "update", None))):
    raise TypeError(
      "`flush(tx=...)` must be the optax GradientTransformation whose state is "
      f"opt_state (`optaccum.accumulate(...)` or a chain holding it), got tx={tx!r}."
    )
  checked = _check_params("flush", params, acc_grads)
  built = jax.eval_shape(tx.init, params)  # type: ignore[attr-defined]  # checked callable above
  built_def, state_def = jax.tree.structure(built), jax.tree.structure(opt_state)
  if built_def != state_def:  # type: ignore[operator]  # PyTreeDef: no stubs
    raise ValueError(
      "`flush(tx=...)` is not the transformation whose state is opt_state: tx.init(params) "
      f"builds\n  {built_def}\nbut opt_state is\n  {state_def}"
    )
  leaves = jax.tree.leaves(built, is_leaf=is_state)
  (wanted,) = [leaf.acc_grads for leaf in leaves if isinstance(leaf, AccumulateState)]
  shapes = [None if w is None else w.shape for w in jax.tree.leaves(wanted, is_leaf=_IS_NONE)]
  _check_param_shapes("flush", checked, shapes)


def flush(
  tx: optax.GradientTransformation,
  opt_state: OptState,
  params: Params,
  **extra_args: object,
) -> tuple[Any, Any]:
  """Applies a partial window now: emits the mean (or sum) of what it holds.

  Use it at the end of the data, or before an evaluation or a checkpoint, when
  the window holds fewer than k micro-batches. `tx` may be `accumulate(...)` or
  any chain that contains it: the call passes zero gradients of weight 0 through
  the whole of `tx` with `flush=True`, and the accumulation closes its window.
  The zeros are no micro-batch: transforms that run before the accumulation
  in the chain (those whose states come first in `opt_state`, such as a
  `scale_by_rms` that feeds it) keep their states as they were, and the
  transforms after it see the window's updates, as when a window closes. An
  empty window emits zeros and leaves the inner state untouched.

  Args:
    tx: the transformation whose state is `opt_state`.
    opt_state: the optimizer state, holding one `AccumulateState`.
    params: the current parameters; the zero gradients take their structure and
      dtypes.
    **extra_args: extra arguments for the inner optimizer.

  Returns:
    `(updates, opt_state)`, as from `tx.update`.

  Raises:
    ValueError: if `opt_state` holds no `AccumulateState` (or several): there is
      no window to close, and a plain optimizer would take a step.
    ValueError: if `params` does not match the accumulator's structure or shapes,
      or `tx.init(params)` builds a state of another structure than `opt_state`
      (`tx` is not the transformation that built it).
    TypeError: if `tx` is not a transformation, a leaf of `params` with an
      accumulator is not a floating-point array, or `extra_args` holds
      `weight` or `flush`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optaccum
    >>> tx = optaccum.accumulate(optax.sgd(1.0), k=4)
    >>> params = {"w": jnp.zeros(2)}
    >>> state = tx.init(params)
    >>> _, state = tx.update({"w": jnp.array([1.0, 2.0])}, state, params)
    >>> _, state = tx.update({"w": jnp.array([3.0, 6.0])}, state, params)
    >>> updates, state = optaccum.flush(tx, state, params)
    >>> updates["w"]  # -lr * mean of the two micro-batches seen
    Array([-2., -4.], dtype=float32)
  """
  taken = sorted({"weight", "flush"} & set(extra_args))
  if taken:
    raise TypeError(
      f"`flush(**extra_args)` may not hold {' or '.join(taken)}: flush passes "
      "weight=0 and flush=True to tx.update itself."
    )
  hint = " With no window to close, `tx.update` would take a plain optimizer step."
  leaves, treedef, position = locate_state("flush(opt_state=...)", opt_state, hint)
  _check_flush(tx, opt_state, params, leaves[position].acc_grads)
  zeros = _gradient_zeros(params, leaves[position].acc_grads)
  updates, new_state = tx.update(
    zeros,
    opt_state,
    params,
    weight=jnp.zeros((), jnp.float32),
    flush=True,
    **extra_args,
  )
  new_leaves = jax.tree.leaves(new_state, is_leaf=is_state)
  # What precedes the accumulation saw only the zeros: keep it as it was.
  kept = leaves[:position] + new_leaves[position:]
  return updates, jax.tree.unflatten(treedef, kept)

"""The accumulation transformation: one window of k micro-batches, one update."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optaccum import _branching, _rounding, _statistics, _validation
from optaccum._skip import SkipPolicy, any_not_finite_in

_IS_NONE = lambda x: x is None  # noqa: E731
_IS_STATE = lambda x: isinstance(x, AccumulateState)  # noqa: E731
_REDUCTIONS = ("mean", "sum")
T = TypeVar("T")


class AccumulateState(NamedTuple):
  """State of `accumulate`; its first five fields are those of optax's `MultiStepsState`.

  Attributes:
    mini_step: micro-batches accepted into the current window; 0 right after a
      window closes.
    gradient_step: inner-optimizer steps taken so far (windows emitted).
    inner_opt_state: the wrapped optimizer's state; it advances once per window.
    acc_grads: the window's running sum of (weighted) gradients, in the
      accumulator dtype.
    skip_state: what the skip policy returned for the last micro-batch.
    acc_weight: the window's sum of weights (the micro-batch count when
      unweighted).
    num_skipped: micro-batches dropped so far, by the skip policy or for a
      NaN, infinite or negative weight.
    emitted: whether the last update call ran the inner optimizer.
    rounding_key: with `rounding="stochastic"`, the raw uint32 data of the key
      that the next micro-step splits; else ().
    statistics: with `statistics=True`, a `StatisticsState` of scalars (read it
      with `optaccum.window_statistics`); else ().
    num_skipped_windows: windows whose gradient held a NaN or inf, dropped
      whole by the window guard (read with `optaccum.num_skipped_windows`).
    num_empty_windows: windows that closed with zero total weight and emitted
      zeros (read with `optaccum.num_empty_windows`).
  """

  mini_step: jax.Array  # shape=(), dtype=int32
  gradient_step: jax.Array  # shape=(), dtype=int32
  inner_opt_state: Any
  acc_grads: Any
  skip_state: Any = ()
  # NumPy defaults: a JAX array here would start the XLA backend at import,
  # before a multi-host program can call `jax.distributed.initialize`.
  acc_weight: jax.Array = np.zeros((), np.float32)  # type: ignore[assignment]  # shape=(), dtype=float32
  num_skipped: jax.Array = np.zeros((), np.int32)  # type: ignore[assignment]  # shape=(), dtype=int32
  emitted: jax.Array = np.zeros((), np.bool_)  # type: ignore[assignment]  # shape=(), dtype=bool
  rounding_key: Any = ()  # shape=(2,), dtype=uint32 for threefry keys
  statistics: Any = ()
  num_skipped_windows: jax.Array = np.zeros((), np.int32)  # type: ignore[assignment]  # shape=(), dtype=int32
  num_empty_windows: jax.Array = np.zeros((), np.int32)  # type: ignore[assignment]  # shape=(), dtype=int32


def _map(fn: Callable[..., Any], updates: Any, *rest: Any) -> Any:
  """Maps over an updates tree, passing its None leaves through."""
  return jax.tree.map(
    lambda u, *r: None if u is None else fn(u, *r), updates, *rest, is_leaf=_IS_NONE
  )


def _same_shapes(tree: Any, shapes: Any) -> bool:
  """Whether `tree` has the structure, shapes and dtypes of `shapes`."""
  structure, shapes_structure = (
    jax.tree.structure(tree, is_leaf=_IS_NONE),
    jax.tree.structure(shapes, is_leaf=_IS_NONE),
  )
  if structure != shapes_structure:  # type: ignore[operator]  # PyTreeDef: no stubs
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
  """

  def cast(n: Any, o: Any) -> Any:
    if hasattr(n, "dtype") and hasattr(o, "dtype") and n.dtype != o.dtype:
      return n.astype(o.dtype)
    return n

  return jax.tree.map(cast, new, old)


def locate_state(where: str, opt_state: Any, hint: str = "") -> tuple[list, Any, int]:
  """The leaves of `opt_state` (an AccumulateState counting as one), their treedef, and its index.

  Raises a ValueError naming `where` unless `opt_state` holds exactly one.
  """
  leaves, treedef = jax.tree.flatten(opt_state, is_leaf=_IS_STATE)
  found = [i for i, leaf in enumerate(leaves) if isinstance(leaf, AccumulateState)]
  if len(found) != 1:
    raise ValueError(
      f"`{where}` must hold exactly one optaccum AccumulateState (from "
      f"`optaccum.accumulate` or `optaccum.MultiSteps`), found {len(found)} in a "
      f"state of type {type(opt_state).__name__}.{hint}"
    )
  return leaves, treedef, found[0]


def check_state(where: str, state: Any) -> AccumulateState:
  """Returns `state` if it is an `AccumulateState`, else raises naming the call."""
  if not isinstance(state, AccumulateState):
    raise TypeError(
      f"`{where}(opt_state=...)` must be the AccumulateState that this accumulation's "
      f"init built, got a {type(state).__name__} (a state of another optimizer?)."
    )
  return state


class _Verdict(NamedTuple):
  """What one micro-step does: whether it enters the window, and its weight there."""

  skip: jax.Array | None  # scalar bool; None when nothing can be skipped
  weight: jax.Array  # scalar float32: 0 when skipped
  skip_state: Any


@dataclasses.dataclass(frozen=True)
class _Core:
  """The pieces of one accumulation: init, add a micro-batch, close a window.

  `accumulate`'s update and the fast path `apply_gradients` are both built from
  these, so each behaviour has one implementation.
  """

  inner: optax.GradientTransformationExtraArgs
  schedule: Callable[[jax.Array], jax.Array]
  reduction: str
  accumulator_dtype: Any
  skip: SkipPolicy | None
  axis_name: Hashable | None
  strategy: str
  rounding: _rounding.Rounding = _rounding.Rounding()
  statistics: _statistics.Statistics | None = None
  window_guard: bool = True

  def init(self, params: Any) -> AccumulateState:
    acc_grads = jax.tree.map(self._accumulator, params)
    gradient_step = jnp.zeros((), jnp.int32)
    skip_state = ()
    if self.skip is not None:
      _, skip_state = self.skip(optax.tree.zeros_like(params), gradient_step, params)
    return AccumulateState(
      mini_step=jnp.zeros((), jnp.int32),
      gradient_step=gradient_step,
      inner_opt_state=self.inner.init(params),
      acc_grads=acc_grads,
      skip_state=skip_state,
      acc_weight=jnp.zeros((), jnp.float32),
      num_skipped=jnp.zeros((), jnp.int32),
      emitted=jnp.zeros((), jnp.bool_),
      rounding_key=self.rounding.init_key(),
      statistics=() if self.statistics is None else self.statistics.init(),
      num_skipped_windows=jnp.zeros((), jnp.int32),
      num_empty_windows=jnp.zeros((), jnp.int32),
    )

  def _accumulator(self, param: Any) -> jax.Array:
    dtype = _validation.accumulator_dtype_for(jnp.result_type(param), self.accumulator_dtype)
    if self.rounding.mode != "nearest" and dtype != jnp.bfloat16:
      raise ValueError(
        "`accumulate(rounding='stochastic')` rounds into bfloat16 only, but a parameter "
        f"of dtype {jnp.result_type(param).name} needs a {dtype.name} accumulator."
      )
    # zeros_like, not zeros(shape): it keeps the parameters' sharding, so an
    # FSDP-sharded model gets an accumulator sharded the same way.
    return jnp.zeros_like(param, dtype)

  def _verdict(self, updates: Any, state: AccumulateState, params: Any, weight: Any) -> _Verdict:
    """Runs the skip policy and checks the weight: a NaN, inf or negative one skips."""
    should_skip, skip_state = None, state.skip_state
    if self.skip is not None:
      should_skip, skip_state = self.skip(updates, state.gradient_step, params)
      should_skip = jnp.asarray(should_skip)
      if should_skip.shape != () or should_skip.dtype != jnp.bool_:
        raise ValueError(
          "The skip policy must return a scalar bool as its first output, got "
          f"dtype {should_skip.dtype} and shape {should_skip.shape}."
        )
    if weight is None:
      weight = jnp.ones((), jnp.float32)
    else:
      # `not (w >= 0)` also holds for NaN; inf fails `isfinite`.
      bad_weight = ~((weight >= 0) & jnp.isfinite(weight))
      should_skip = bad_weight if should_skip is None else should_skip | bad_weight
    if should_skip is not None:
      weight = jnp.where(should_skip, jnp.float32(0), weight)
    return _Verdict(should_skip, weight, skip_state)

  def add(
    self, updates: Any, state: AccumulateState, params: Any, weight: Any, flush: Any
  ) -> tuple[AccumulateState, jax.Array]:
    """Adds one micro-batch into the window; returns the state and whether to close."""
    where = "accumulate(...).update"
    _validation.check_tree_matches(
      where, "updates", updates, state.acc_grads, "the accumulator built by init(params)"
    )
    weighted = weight is not None
    if weighted:
      weight = _validation.as_scalar(where, "weight", weight, jnp.float32)
    flush = _validation.as_flag(where, "flush", flush)
    verdict = self._verdict(updates, state, params, weight)
    acc_grads, rounding_key = self._sum_into(updates, state, verdict, weighted)
    accepted = jnp.ones((), jnp.bool_) if verdict.skip is None else ~verdict.skip
    num_skipped = jnp.where(accepted, state.num_skipped, optax.safe_increment(state.num_skipped))
    # Across replicas every micro-step counts, skipped or not, so that all
    # replicas close their windows together; alone, a skipped micro-batch is
    # as if it never happened. `flush()`'s own call (weight exactly 0) is no
    # micro-step: a flush of an empty window closes no window.
    counts = accepted if self.axis_name is None else jnp.ones((), jnp.bool_)
    if weighted:
      counts = counts & ~(flush & (weight == 0))
    mini_step = jnp.where(counts, optax.safe_increment(state.mini_step), state.mini_step)
    close_window = flush | (counts & (mini_step >= self.schedule(state.gradient_step)))
    statistics = state.statistics
    if self.statistics is not None:
      statistics = self.statistics.add(statistics, updates, verdict.weight)
    state = state._replace(
      mini_step=mini_step,
      acc_grads=acc_grads,
      skip_state=verdict.skip_state,
      acc_weight=state.acc_weight + verdict.weight,
      num_skipped=num_skipped,
      emitted=jnp.zeros((), jnp.bool_),
      rounding_key=rounding_key,
      statistics=statistics,
    )
    return state, close_window

  def _sum_into(
    self, updates: Any, state: AccumulateState, verdict: _Verdict, weighted: bool
  ) -> tuple[Any, Any]:
    """The accumulator after adding `updates` (unless skipped), and the next rounding key."""
    rounding_key, seeds = self.rounding.split_key(
      state.rounding_key, state.acc_grads, self.axis_name
    )
    if verdict.skip is not None and self.axis_name is None and self.rounding.mode != "nearest":
      # A skipped micro-batch draws no bits: the run is as if it never happened.
      # (Across replicas the key is shared and must advance on all of them.)
      rounding_key = jnp.where(verdict.skip, state.rounding_key, rounding_key)
    # A closed window's accumulator is cleared here rather than when it closes:
    # the select fuses into the add, where a reset in `close` made XLA copy the
    # accumulator out before overwriting it (see benchmarks/RESULTS.md).
    window_open = state.mini_step > 0

    def add_leaf(g: Any, acc: jax.Array, seed: Any) -> jax.Array | None:
      if g is None:  # None where the parameters hold None: pass it through.
        return None
      # A select, not a multiply: a stale NaN (no skip policy) must not survive.
      acc = jnp.where(window_open, acc, jnp.zeros((), acc.dtype))
      if weighted:
        # Weigh in at least float32, so token counts stay exact.
        wide = _validation.at_least_float32(acc.dtype)
        g = g.astype(wide) * verdict.weight.astype(wide)
      summed = self.rounding.add(acc, g, seed)
      # A select, not a multiply: 0 * NaN would still be NaN.
      return summed if verdict.skip is None else jnp.where(verdict.skip, acc, summed)

    acc_grads = jax.tree.map(add_leaf, updates, state.acc_grads, seeds, is_leaf=_IS_NONE)
    return acc_grads, rounding_key

  def _window_gradient(self, updates_like: Any, acc_grads: Any, weight: jax.Array) -> Any:
    if self.reduction == "mean":
      # In at least float32: a bfloat16 quotient would round once more, and to
      # nearest, after a stochastically rounded (unbiased) sum. A multiply by the
      # reciprocal, not a divide: XLA recomputes a multiply in each consumer
      # (Adam's two moments) but materializes a divide, a parameter-sized
      # temporary.
      inverse = jnp.ones((), jnp.float32) / weight

      def scale(a: jax.Array) -> jax.Array:
        wide = _validation.at_least_float32(a.dtype)
        return a.astype(wide) * inverse.astype(wide)

      acc_grads = jax.tree.map(scale, acc_grads)
    return jax.tree.map(
      lambda g, a: None if g is None else a.astype(g.dtype),
      updates_like,
      acc_grads,
      is_leaf=_IS_NONE,
    )

  def _reduced(self, state: AccumulateState) -> tuple[Any, jax.Array, tuple]:
    """The window's gradient sum, weight and statistics sums, summed across replicas if any."""
    running: tuple = ()
    if self.statistics is not None:
      # The micro-batch count travels as float32 (exact: it is at most k times
      # the replicas), so that one all-reduce of one dtype carries everything.
      count = state.statistics.num_micro_batches.astype(jnp.float32)
      running = (state.statistics.squared_norm_sum, count)
    sums = (state.acc_grads, state.acc_weight, running)
    if self.axis_name is not None:
      # The one cross-replica reduction of the window.
      sums = jax.lax.psum(sums, self.axis_name)
    acc_grads, total_weight, running = sums
    if running:
      running = (running[0], running[1].astype(jnp.int32))
    return acc_grads, total_weight, running

  def update_shapes(
    self, updates_like: Any, state: AccumulateState, params: Any, extra_args: dict
  ) -> Any:
    """Shapes and dtypes of what the inner optimizer would emit."""
    # Shaped through the cross-replica sum too (eval_shape runs nothing), so that
    # under `shard_map` they are as replica-invariant as the real updates.
    shapes, _ = jax.eval_shape(
      lambda s: self.inner.update(
        self._window_gradient(updates_like, *self._reduced(s)[:2]),
        s.inner_opt_state,
        params,
        **extra_args,
      ),
      state,
    )
    return shapes

  def _window_is_finite(
    self, updates_like: Any, acc_grads: Any, total_weight: jax.Array
  ) -> jax.Array:
    """The window guard: whether the gradient `inner` would get is finite.

    Checked on the window's reduced sums (after weighting and the
    cross-replica sum), and for the mean and the cast to the gradients' dtype
    that follow: those are monotone in |acc|, so the largest entry alone tells
    whether one of them overflows. No NaN or inf gets past it, whatever its
    source: a NaN micro-batch, an overflowing float32 sum, a huge weight, a
    mean too large for float16. Two reductions of the accumulator per window,
    in the window-closing step only: an or of `~isfinite(acc)`, which cannot
    miss a NaN (see `any_not_finite_in`), and a max for the overflow. The guard does
    not form the gradient itself; benchmarks/RESULTS.md measures its cost.
    """
    inverse = jnp.ones((), jnp.float32)
    if self.reduction == "mean":
      inverse = inverse / total_weight
    finite = jnp.isfinite(total_weight) & jnp.isfinite(inverse)
    for like, acc in zip(
      jax.tree.leaves(updates_like, is_leaf=_IS_NONE), jax.tree.leaves(acc_grads, is_leaf=_IS_NONE)
    ):
      if like is None or acc is None or not acc.size:
        continue
      wide = _validation.at_least_float32(acc.dtype)
      largest = jnp.max(jnp.abs(acc)).astype(wide) * inverse.astype(wide)
      finite = finite & jnp.isfinite(largest.astype(like.dtype))
    return finite & ~any_not_finite_in(jax.tree.leaves(acc_grads))

  def _close(
    self,
    updates_like: Any,
    state: AccumulateState,
    carried: T,
    step: Callable[[Any, T, Any], tuple[T, Any]],
  ) -> tuple[T, AccumulateState]:
    """Closes the window: `step(gradient, carried, inner_state)` on its gradient.

    A window of zero total weight, or one that fails the window guard, returns
    `carried`, leaves the inner state as it is and is counted. The accumulator
    is left for the next `add` to clear.
    """
    acc_grads, total_weight, running = self._reduced(state)
    has_weight = total_weight > 0
    finite = jnp.ones((), jnp.bool_)
    if self.window_guard:
      finite = self._window_is_finite(updates_like, acc_grads, total_weight)
    runs = has_weight & finite

    def run(operand: tuple[T, Any]) -> tuple[T, Any]:
      carried, inner_state = operand
      gradient = self._window_gradient(updates_like, acc_grads, total_weight)
      carried, new_inner_state = step(gradient, carried, inner_state)
      return carried, _keep_dtypes(new_inner_state, inner_state)

    carried, inner_opt_state = _branching.run_if(
      self.strategy, runs, run, (carried, state.inner_opt_state)
    )
    statistics = state.statistics
    if self.statistics is not None:
      # A window that does not run keeps the last window's statistics.
      weight = jnp.where(runs, total_weight, jnp.float32(0))
      statistics = self.statistics.close(statistics, acc_grads, weight, *running)
    skipped_window = has_weight & ~finite
    empty_window = ~has_weight & (state.mini_step > 0)
    return carried, state._replace(
      mini_step=jnp.zeros((), jnp.int32),
      gradient_step=jnp.where(runs, optax.safe_increment(state.gradient_step), state.gradient_step),
      inner_opt_state=inner_opt_state,
      # zeros_like: under `shard_map` it keeps the per-replica type.
      acc_weight=jnp.zeros_like(state.acc_weight),
      emitted=runs,
      statistics=statistics,
      num_skipped_windows=_increment_where(skipped_window, state.num_skipped_windows),
      num_empty_windows=_increment_where(empty_window, state.num_empty_windows),
    )

  def close(
    self,
    updates_like: Any,
    state: AccumulateState,
    params: Any,
    extra_args: dict,
    carried: Any,
  ) -> tuple[Any, AccumulateState]:
    """Closes the window: the inner optimizer's updates, or `carried` if it does not run."""
    return self._close(
      updates_like,
      state,
      carried,
      lambda gradient, _, inner_state: self.inner.update(
        gradient, inner_state, params, **extra_args
      ),
    )

  def close_and_apply(
    self, updates_like: Any, state: AccumulateState, params: Any, extra_args: dict
  ) -> tuple[Any, AccumulateState]:
    """Closes the window and applies its updates: the new parameters.

    The optimizer and the parameter write share one conditional, which carries
    the parameters: no tree of updates outlives it, and the parameters are
    updated in place.
    """

    def step(gradient: Any, params: Any, inner_state: Any) -> tuple[Any, Any]:
      updates, inner_state = self.inner.update(gradient, inner_state, params, **extra_args)
      return optax.apply_updates(params, updates), inner_state

    return self._close(updates_like, state, params, step)


def _increment_where(condition: jax.Array, counter: jax.Array) -> jax.Array:
  """`counter + 1` (saturating) where `condition` holds, else `counter`."""
  return jnp.where(condition, optax.safe_increment(counter), counter)


def make_core(
  where: str,
  inner: Any,
  every_k: Any,
  *,
  inner_name: str = "inner",
  every_k_name: str = "every_k",
  skip_name: str = "skip",
  reduction: str,
  accumulator_dtype: Any,
  skip: Any,
  axis_name: Any,
  strategy: str = "auto",
  rounding: Any = "nearest",
  rounding_key: Any = None,
  statistics: Any = False,
  micro_batch_size: Any = None,
  window_guard: Any = True,
) -> _Core:
  """Validates the arguments of an accumulation and builds its core."""
  if not isinstance(inner, optax.GradientTransformation):
    raise TypeError(
      f"`{where}({inner_name}=...)` must be an optax.GradientTransformation, "
      f"got {inner_name}={inner!r}."
    )
  _validation.check_every_k(where, every_k, every_k_name)
  schedule = _validation.as_schedule(every_k)
  if callable(every_k):
    _validation.check_schedule_value(where, every_k_name, every_k)
  if not isinstance(window_guard, bool):
    raise TypeError(
      f"`{where}(window_guard=...)` must be a bool, got window_guard={window_guard!r}."
    )
  _validation.check_choice(where, "reduction", reduction, _REDUCTIONS)
  _validation.check_callable_or_none(where, skip_name, skip)
  if axis_name is not None and not isinstance(axis_name, Hashable):
    raise TypeError(f"`{where}(axis_name=...)` must be hashable, got axis_name={axis_name!r}.")
  _validation.check_choice(where, "strategy", strategy, _branching.STRATEGIES)
  accumulator_dtype = _validation.floating_dtype(
    where, "accumulator_dtype", accumulator_dtype, allow_none=True
  )
  return _Core(
    inner=optax.with_extra_args_support(inner),
    schedule=schedule,
    reduction=reduction,
    accumulator_dtype=accumulator_dtype,
    skip=skip,
    axis_name=axis_name,
    strategy=strategy,
    rounding=_rounding.make_rounding(where, rounding, rounding_key, accumulator_dtype),
    statistics=_statistics.make_statistics(where, statistics, micro_batch_size),
    window_guard=window_guard,
  )


def core_of(tx: Any) -> _Core | None:
  """The core behind a transformation made by `accumulate`, else None."""
  return getattr(getattr(tx, "update", None), "optaccum_core", None)


def accumulate(
  inner: optax.GradientTransformation,
  every_k: int | Callable[[jax.Array], Any],
  *,
  reduction: str = "mean",
  accumulator_dtype: Any = None,
  skip: SkipPolicy | None = None,
  window_guard: bool = True,
  axis_name: Hashable | None = None,
  strategy: str = "auto",
  rounding: str = "nearest",
  rounding_key: Any = None,
  statistics: bool = False,
  micro_batch_size: int | None = None,
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
  its own masks for each, as with separate batches.

  By default no NaN or inf reaches the parameters, whatever its source: the
  *window guard* checks the window's gradient, as the inner optimizer would
  receive it, once per window. A window that is not finite runs no inner
  step, leaves the parameters and the inner state as they were, does not
  advance `gradient_step`, is cleared and is counted (see
  `optaccum.num_skipped_windows`), as PyTorch's GradScaler skips the
  optimizer step. To keep the rest of a window when one micro-batch is bad,
  add a per-micro-batch policy with `skip=optaccum.skip_not_finite`
  (docs/performance.md measures its cost).

  Args:
    inner: the optimizer to run once per window (any optax transformation,
      chains included).
    every_k: micro-steps per window: a positive int, or a schedule
      `gradient_step -> k` to grow the effective batch during training. A
      schedule value below 1 is clamped to 1 (every micro-step emits); float
      values are floored.
    reduction: `"mean"` (default) or `"sum"` of the window's gradients. With
      weights, `"sum"` emits `sum(w_i g_i)`.
    accumulator_dtype: dtype of the accumulator. None (default) takes each
      parameter's dtype widened to at least 32 bits: float32 for bfloat16 and
      float16 parameters, float64 stays float64, complex stays complex. A
      dtype sets the precision, and each leaf keeps its kind: complex
      parameters accumulate in the complex dtype of that precision (complex64
      for float32, bfloat16 or float16; complex128 for float64), real ones in
      the real dtype of a complex one.
    skip: a per-micro-batch skip policy `(grads, gradient_step, params) ->
      (skip, info)`, e.g. `optaccum.skip_not_finite`; micro-batches it rejects
      never enter the window and are counted in `num_skipped`. None (default)
      accumulates every micro-batch, and leaves non-finite values to the
      window guard.
    window_guard: check the window's gradient once per window and drop the
      window whole if it holds a NaN or inf (default True). False lets such a
      gradient reach the inner optimizer.
    axis_name: for data-parallel training under `shard_map` or `pmap`: the
      mapped axis over which replicas hold different micro-batches. Micro-steps
      accumulate the local gradient with no communication; the step that closes
      the window reduces the accumulators (and weights) across the axis once,
      then runs `inner`. Across replicas a skipped micro-batch adds nothing but
      still counts towards the window length, so that replicas stay in step.
    strategy: how the window-closing step is made conditional: `"loop"` (a
      while loop of zero or one trips, which keeps the state in place: a
      micro-step costs little more than `acc + g`), `"cond"` (`lax.cond`,
      reverse-differentiable but it copies the state), `"select"` (compute
      every step, keep with `jnp.where`, like `optax.MultiSteps`; it needs
      no predicate on the host, for tiny models on GPU), or `"auto"`
      (default: the default backend's choice, `"loop"` on CPU, GPU and TPU;
      see benchmarks/RESULTS.md). Use `"cond"` to differentiate through the
      optimizer.
    rounding: how each micro-step's sum is rounded into the accumulator:
      `"nearest"` (default) or `"stochastic"`, which rounds up with
      probability equal to the distance to the lower neighbour. Stochastic
      rounding is unbiased, so a bfloat16 accumulator (half the memory of
      float32) keeps the small gradients that rounding to nearest drops once
      the sum is large (swamping). It needs `accumulator_dtype=jnp.bfloat16`
      and a `rounding_key`; see docs/precision_and_statistics.md.
    rounding_key: with `rounding="stochastic"`: a `jax.random.key` or an int
      seed. The state keeps it and splits it on every micro-step, so a run
      is reproducible from it; under `axis_name` each replica folds in its
      index and rounds with its own bits.
    statistics: keep gradient statistics of each window in the state: the
      norm of the window's mean gradient, the mean squared norm of its
      micro-batch gradients, and from their spread unbiased estimates of
      |G|^2, tr(Sigma) and the gradient noise scale B_simple (McCandlish et
      al., 2018). Read them with `optaccum.window_statistics`. It adds a few
      scalars to the state and one squared norm to each micro-step.
    micro_batch_size: with `statistics=True`: examples per micro-batch when
      no weights are passed (per unit of weight when they are), so that
      tr(Sigma) and B_simple count examples. None (default) counts one unit
      of weight as one example: a micro-batch, or a token when the weights
      are token counts.

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
  return transformation(
    make_core(
      "accumulate",
      inner,
      every_k,
      reduction=reduction,
      accumulator_dtype=accumulator_dtype,
      skip=skip,
      window_guard=window_guard,
      axis_name=axis_name,
      strategy=strategy,
      rounding=rounding,
      rounding_key=rounding_key,
      statistics=statistics,
      micro_batch_size=micro_batch_size,
    )
  )


def transformation(core: _Core) -> optax.GradientTransformationExtraArgs:
  """The optax transformation of an accumulation core."""

  def update_fn(
    updates: Any,
    state: AccumulateState,
    params: Any = None,
    *,
    weight: Any = None,
    flush: Any = False,
    **extra_args: Any,
  ) -> tuple[Any, AccumulateState]:
    state = check_state("accumulate(...).update", state)
    state, close_window = core.add(updates, state, params, weight, flush)
    shapes = core.update_shapes(updates, state, params, extra_args)
    # The window's updates are written into the gradients' buffers, dead once
    # added into the accumulator, rather than into a fresh tree of zeros; a
    # select then emits zeros unless the inner optimizer ran. XLA fuses that
    # select into the caller's `apply_updates`: a micro-step that does not emit
    # writes no tree of updates and allocates none (measured in
    # benchmarks/RESULTS.md).
    # Not across replicas: there the gradients are per replica, the updates
    # must be the same on every replica (and under `shard_map` typed so).
    reuse = core.axis_name is None and _same_shapes(updates, shapes)
    carried = updates if reuse else optax.tree.zeros_like(shapes)
    new_updates, state = _branching.run_if(
      core.strategy,
      close_window,
      lambda operand: core.close(updates, operand[1], params, extra_args, carried=operand[0]),
      (carried, state),
    )
    emitted = state.emitted
    return _map(lambda u: jnp.where(emitted, u, jnp.zeros((), u.dtype)), new_updates), state

  update_fn.optaccum_core = core  # type: ignore[attr-defined]
  return optax.GradientTransformationExtraArgs(core.init, update_fn)


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
  hint = " With no window to close, `tx.update` would take a plain optimizer step."
  leaves, treedef, position = locate_state("flush(opt_state=...)", opt_state, hint)
  zeros = optax.tree.zeros_like(params)
  updates, new_state = tx.update(
    zeros,
    opt_state,
    params,
    weight=jnp.zeros((), jnp.float32),
    flush=True,
    **extra_args,
  )
  new_leaves = jax.tree.leaves(new_state, is_leaf=_IS_STATE)
  # What precedes the accumulation saw only the zeros: keep it as it was.
  kept = leaves[:position] + new_leaves[position:]
  return updates, jax.tree.unflatten(treedef, kept)

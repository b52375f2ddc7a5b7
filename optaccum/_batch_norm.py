"""BatchNorm running statistics that advance once per window, as the large batch's do.

`flax.linen.BatchNorm` keeps, per layer, `{"mean": ra_mean, "var": ra_var}` in
the `batch_stats` collection and in training mode updates them from the batch's
mean `mu` and biased variance `v` (the mean of `x**2` minus `mu**2`):
`ra = m * ra + (1 - m) * stat`. Run on k micro-batches one after another, the
running statistics advance k times per optimizer step, each from a micro-batch.
Started from the same window-start statistics instead, the k results combine
into the large batch's, exactly in exact arithmetic. With weights `p_i`
(summing to 1, the micro-batches' shares of the batch) and `M_i`, `V_i` micro-
batch i's new running mean and variance:

  new mean = sum_i p_i M_i
  new var  = sum_i p_i V_i + sum_i p_i (M_i - new mean)**2 / (1 - m)

The last term is the spread of the micro-batch means, `(1 - m) Var_i(mu_i)`,
which the large batch's variance holds and the micro-batch variances do not;
since `M_i - new mean = (1 - m) (mu_i - mu)`, it needs neither the old
statistics nor `mu_i` recovered by dividing a small difference.

What cannot be equal: in training mode each micro-batch is normalized by its own
statistics ("ghost batch norm"), so the activations, the loss and the gradients
differ from the large batch's, and so do the parameters after training.

Both forms admit a micro-batch as `accumulate` does (`optaccum/_window.py`): a
NaN, infinite or negative weight skips it, and so do statistics that hold a NaN
or inf (a micro-batch with a NaN input), so no NaN reaches `batch_stats` from
one bad micro-batch; where nothing counts, the statistics stay as they were.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple, TypeAlias

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike

from optaccum import _validation, _window
from optaccum._accumulator import at_least_float32
from optaccum._skip import any_not_finite_in
from optaccum._types import PyTree, Scalar

#: A `batch_stats` collection: flax.linen.BatchNorm layers' `{"mean": ..., "var": ...}`,
#: nested as the model nests the layers (a stack of them carries a leading axis).
BatchStats: TypeAlias = PyTree
#: One BatchNorm layer's statistics, `{"mean": ..., "var": ...}` (a dict or FrozenDict).
Layer: TypeAlias = Mapping[str, jax.Array]

_MERGE = "merge_batch_stats"
_CREATE = "BatchStatsWindow.create"
_ADD = "BatchStatsWindow.add"
_CLOSE = "BatchStatsWindow.close"


def _is_layer(x: object) -> bool:
  """Whether `x` is one BatchNorm layer's statistics, `{"mean": ..., "var": ...}`."""
  return isinstance(x, Mapping) and sorted(x) == ["mean", "var"]


def _check_momentum(where: str, momentum: object) -> None:
  if (
    not isinstance(momentum, (int, float, np.integer, np.floating))
    or isinstance(momentum, (bool, np.bool_))
    or not 0.0 <= float(momentum) < 1.0
  ):
    raise ValueError(
      f"`{where}(momentum=...)` must be a number with 0 <= momentum < 1, the "
      f"BatchNorm layers' `momentum`, got momentum={momentum!r}."
    )


def _check_layers(where: str, name: str, batch_stats: BatchStats, *, stacked: bool) -> None:
  """Checks that every leaf sits in a `{"mean", "var"}` pair of floating arrays of one shape."""
  layers = jax.tree_util.tree_flatten_with_path(batch_stats, is_leaf=_is_layer)[0]
  if not layers:
    raise ValueError(f"`{where}({name}=...)` holds no BatchNorm statistics, got {batch_stats!r}.")
  for path, layer in layers:
    place = _validation.place(path)
    if not _is_layer(layer):
      raise ValueError(
        f"`{where}({name}=...)` must hold only BatchNorm statistics, dicts "
        f"{{'mean': ..., 'var': ...}} as flax.linen.BatchNorm stores them in "
        f"`batch_stats`, but the leaf at {place} is outside one: pass the "
        "`batch_stats` collection only."
      )
    mean, var = layer["mean"], layer["var"]
    for key, stat in (("mean", mean), ("var", var)):
      if not isinstance(stat, (jax.Array, np.ndarray)):
        # Checked first: a list or a str would fail in JAX without naming the call.
        raise TypeError(
          f"`{where}({name}=...)` must hold arrays, as flax.linen.BatchNorm stores "
          f"them, but the {key!r} of the layer at {place} is a {type(stat).__name__}: "
          f"{stat!r}. Pass jnp.asarray(...) of the dtype you mean."
        )
      if not jnp.issubdtype(stat.dtype, jnp.floating):
        raise TypeError(
          f"`{where}({name}=...)` must hold floating-point statistics, but the layer at "
          f"{place} has dtype {stat.dtype.name}."
        )
    if jnp.shape(mean) != jnp.shape(var) or (stacked and not jnp.shape(mean)):
      raise ValueError(
        f"`{where}({name}=...)` has a layer at {place} whose mean has shape "
        f"{jnp.shape(mean)} and var has shape {jnp.shape(var)}; they must be equal"
        + (" and carry a leading micro-batch axis." if stacked else ".")
      )


def _with_stats(layer: Layer, mean: jax.Array, var: jax.Array) -> Layer:
  """`layer` (a dict, FrozenDict, ...) with its mean and var replaced, its type kept."""
  values = {"mean": mean, "var": var}
  return jax.tree_util.tree_map_with_path(lambda path, _: values[path[-1].key], layer)


def _wide(x: ArrayLike) -> jax.Array:
  """`x` in at least float32, where the sums are taken (bfloat16 statistics included)."""
  return jnp.asarray(x).astype(at_least_float32(jnp.result_type(x)))


def _variance(mean_of_vars: jax.Array, spread: jax.Array, momentum: float) -> jax.Array:
  """The large batch's new running variance; `spread` is the weighted mean of (M_i - M)**2."""
  return mean_of_vars + spread / (1.0 - float(momentum))


# --- In-step: the k micro-batches' statistics at once ------------------------------------


def _micro_batch_count(stacked: BatchStats) -> int:
  """The length of the leading micro-batch axis, the same on every leaf."""
  leaves = jax.tree_util.tree_flatten_with_path(stacked)[0]
  (first_path, first), *rest = leaves
  if not jnp.shape(first)[0]:
    raise ValueError(
      f"`{_MERGE}(stacked=...)` must stack at least one micro-batch's statistics, but "
      f"the leaf at {jax.tree_util.keystr(first_path)} has a leading axis of length 0."
    )
  for path, leaf in rest:
    if jnp.shape(leaf)[0] != jnp.shape(first)[0]:
      raise ValueError(
        f"`{_MERGE}(stacked=...)` must stack every leaf along a leading micro-batch axis "
        f"of one length, but the leaf at {jax.tree_util.keystr(first_path)} has "
        f"{jnp.shape(first)[0]} and the leaf at {jax.tree_util.keystr(path)} has "
        f"{jnp.shape(leaf)[0]}."
      )
  return int(jnp.shape(first)[0])


def _not_finite_micro_batches(stacked: BatchStats, count: int) -> jax.Array:
  """Per micro-batch, shape `(k,)`: whether any of its statistics is NaN or infinite."""
  found = jnp.zeros((count,), jnp.bool_)
  for leaf in jax.tree.leaves(stacked):
    found = found | jnp.any(~jnp.isfinite(jnp.reshape(leaf, (count, -1))), axis=1)
  return found


def _merge_weights(
  weights: ArrayLike | None, stacked: BatchStats, count: int
) -> tuple[jax.Array, jax.Array]:
  """Each micro-batch's skip decision and float32 weight in the merge (0 where skipped), `(k,)`."""
  if weights is None:
    weights = jnp.ones((count,), jnp.float32)
  # A list or a Python number as a NumPy array first: JAX reads no shape from a list.
  values = weights if isinstance(weights, (jax.Array, np.ndarray)) else _as_numpy(weights)
  if not (jnp.issubdtype(values.dtype, jnp.integer) or jnp.issubdtype(values.dtype, jnp.floating)):
    # A bool mask would pass as weights 0 and 1, a complex weight would lose its
    # imaginary part: `accumulate` refuses both too.
    raise TypeError(
      f"`{_MERGE}(weights=...)` must hold numbers, got weights={weights!r}: one real "
      "weight per micro-batch, not a bool or a complex number."
    )
  if values.shape != (count,):
    raise ValueError(
      f"`{_MERGE}(weights=...)` must hold one weight per micro-batch, shape ({count},), "
      f"got shape {values.shape}."
    )
  not_finite = _not_finite_micro_batches(stacked, count)
  skip, counted = jax.vmap(_window.admit)(jnp.asarray(values).astype(jnp.float32), not_finite)
  assert skip is not None  # given a decision, `admit` returns one
  return skip, counted


def _as_numpy(value: object) -> np.ndarray:
  """`value` as a NumPy array; a ragged list as an object array, which holds no numbers."""
  try:
    return np.asarray(value)
  except ValueError:
    return np.asarray(None)


def _average(x: jax.Array, weights: jax.Array, total: jax.Array) -> jax.Array:
  """The weighted mean of `x` over its leading axis; a micro-batch of weight 0 adds nothing.

  A select, not a multiply by 0, so that a skipped micro-batch's NaN stays out.
  """
  weights = jnp.reshape(weights, (-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)
  terms = jnp.where(weights > 0, weights * x, jnp.zeros((), x.dtype))
  return jnp.sum(terms, axis=0) / jnp.where(total > 0, total, 1.0).astype(x.dtype)


def merge_batch_stats(
  stacked: BatchStats,
  *,
  momentum: float,
  weights: ArrayLike | None = None,
  batch_stats: BatchStats | None = None,
  count_skipped: bool = False,
) -> BatchStats | tuple[BatchStats, jax.Array]:
  """The large batch's new BatchNorm running statistics, from its micro-batches' results.

  Each of k micro-batches, run in training mode from the same running
  statistics, returns the `batch_stats` it would write: `m * old + (1 - m) *
  its own statistic`. Stacked along a new leading axis (what
  `optaccum.microbatch(..., aux_reduction="stack")` gives for an aux output),
  they merge into what one `apply` on the whole batch writes: the running mean
  is the micro-batch results' mean, the running variance their mean plus the
  spread of the micro-batch means. The running statistics then advance once per
  optimizer step, as the large batch's do, not k times. Equal in exact
  arithmetic; in float32 within a few units of rounding. Only the running
  statistics can equal the large batch's: guide, [BatchNorm][batchnorm].

  A micro-batch is admitted as `optaccum.accumulate` admits one: a weight
  that is NaN, infinite or negative skips it, and so do statistics holding a
  NaN or inf (a NaN in its input); the others merge as if it had not been
  run. A weight of 0 adds nothing. Where no micro-batch counts (the weights
  sum to zero, or every one is skipped) the result is `batch_stats`,
  unchanged, as an empty window leaves them. With `count_skipped=True` the
  skipped micro-batches are also counted, as `BatchStatsWindow.num_skipped`
  and `accumulate`'s `num_skipped` count them.

  Args:
    stacked: the `batch_stats` collection (any nesting of flax.linen.BatchNorm
      layers' `{"mean": ..., "var": ...}`) with each leaf stacked along a
      leading axis of k micro-batches.
    momentum: the layers' `BatchNorm(momentum=...)` (flax's default is 0.99),
      0 <= momentum < 1. Layers of different momenta: merge their subtrees
      separately.
    weights: None (default) for micro-batches of equal size, else the k
      micro-batches' sizes (the number of values each layer reduced over per
      feature, or any multiple of it), shape `(k,)`. Requires `batch_stats`.
    batch_stats: the statistics the micro-batches ran from (the model's
      `batch_stats` before the step), returned where no micro-batch counts.
      Required with `weights`; without it, a merge in which every micro-batch
      is skipped gives NaN.
    count_skipped: also return how many micro-batches were skipped (for a
      NaN, infinite or negative weight, or statistics that are not finite; a
      weight of 0 is no skip). False (default) returns the statistics alone.

  Returns:
    The merged `batch_stats`, with the structure and dtypes of one micro-batch's;
    with `count_skipped=True`, `(batch_stats, num_skipped)`, `num_skipped` an
    int32 scalar.

  Raises:
    ValueError: if `momentum` is out of range (or not a number), a leaf lies
      outside a `{"mean", "var"}` layer, the leading axes differ or are of
      length 0, `weights` has another shape than `(k,)` or comes without
      `batch_stats`, or `batch_stats` does not match one micro-batch's
      statistics.
    TypeError: if a statistic is not a floating-point array (a Python float
      or list included), `weights` holds bools or complex numbers, or
      `count_skipped` is not a bool.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> from flax import linen
    >>> import optaccum
    >>> layer = linen.BatchNorm(use_running_average=False, momentum=0.9)
    >>> x = jax.random.normal(jax.random.key(0), (8, 3)) + 2.0
    >>> variables = layer.init(jax.random.key(1), x)
    >>> def new_stats(x):  # one training-mode apply, from the same start
    ...   _, updates = layer.apply(variables, x, mutable=["batch_stats"])
    ...   return updates["batch_stats"]
    >>> stacked = jax.vmap(new_stats)(x.reshape(4, 2, 3))  # 4 micro-batches of 2
    >>> merged = optaccum.flax.merge_batch_stats(stacked, momentum=0.9)
    >>> large = new_stats(x)
    >>> bool(jnp.allclose(merged["var"], large["var"], rtol=1e-6))
    True
    >>> bool(jnp.allclose(merged["mean"], large["mean"], rtol=1e-6))
    True
    >>> # Weights of 0 everywhere: nothing to merge, the statistics stay.
    >>> kept = optaccum.flax.merge_batch_stats(
    ...   stacked, momentum=0.9, weights=jnp.zeros(4), batch_stats=variables["batch_stats"]
    ... )
    >>> bool(jnp.array_equal(kept["var"], variables["batch_stats"]["var"]))
    True
    >>> # A NaN weight skips its micro-batch, and count_skipped=True counts it.
    >>> merged, num_skipped = optaccum.flax.merge_batch_stats(
    ...   stacked, momentum=0.9, weights=jnp.array([2.0, jnp.nan, 2.0, 2.0]),
    ...   batch_stats=variables["batch_stats"], count_skipped=True,
    ... )
    >>> int(num_skipped)
    1
  """
  if not isinstance(count_skipped, bool):
    raise TypeError(
      f"`{_MERGE}(count_skipped=...)` must be a bool, got count_skipped={count_skipped!r}."
    )
  _check_momentum(_MERGE, momentum)
  _check_layers(_MERGE, "stacked", stacked, stacked=True)
  count = _micro_batch_count(stacked)
  one = jax.tree.map(lambda leaf: leaf[0], stacked)
  if batch_stats is None:
    if weights is not None:
      raise ValueError(
        f"`{_MERGE}(batch_stats=...)` is required with weights=...: the statistics the "
        "micro-batches ran from, which the merge returns where the weights sum to zero."
      )
    batch_stats = jax.tree.map(lambda leaf: jnp.full_like(leaf, jnp.nan), one)
  else:
    _validation.check_tree_matches(
      _MERGE, "batch_stats", batch_stats, one, "one micro-batch's statistics in `stacked`"
    )
  skip, weights = _merge_weights(weights, stacked, count)
  total = jnp.sum(weights)

  def merge(layer: Layer, start: Layer) -> Layer:
    means, variances = _wide(layer["mean"]), _wide(layer["var"])
    mean = _average(means, weights, total)
    spread = _average(jnp.square(means - mean), weights, total)
    var = _variance(_average(variances, weights, total), spread, momentum)
    merged = {"mean": mean, "var": var}
    # Nothing counted: the statistics stay as they were.
    keep = lambda name: jnp.where(  # noqa: E731
      total > 0, merged[name].astype(layer[name].dtype), jnp.asarray(start[name], layer[name].dtype)
    )
    return _with_stats(start, keep("mean"), keep("var"))

  merged = jax.tree.map(merge, stacked, batch_stats, is_leaf=_is_layer)
  if not count_skipped:
    return merged
  return merged, jnp.sum(skip, dtype=jnp.int32)


# --- Across steps: a window's statistics, one micro-step at a time -----------------------


class BatchStatsWindow(NamedTuple):
  """The running sums of one window's BatchNorm statistics, carried between micro-steps.

  With `optaccum.accumulate`, a window's micro-batches arrive in separate
  steps. Each micro-step runs the model in training mode from the window-start
  `batch_stats` (left unchanged until the window closes) and adds the
  `batch_stats` it would write with `add`; when the optimizer step is taken,
  `close` replaces the window-start statistics once, with the large batch's,
  and starts the next window. Keep it in the train state next to
  `batch_stats` (a field of a `TrainState` subclass), so it is jitted, and
  checkpointed, with the rest.

  A micro-batch is admitted as `optaccum.accumulate` admits one: a NaN,
  infinite or negative weight skips it, and so do statistics that hold a NaN
  or inf; a skipped micro-batch adds nothing and is counted in `num_skipped`.
  A window that `accumulate`'s window guard drops is discarded by `close(...,
  reset=...)`, so its statistics never reach `batch_stats`. Guide:
  [BatchNorm][batchnorm].

  Attributes:
    weight: the window's total weight so far (micro-batches added, when
      unweighted).
    mean: the weighted mean of the added `batch_stats`, leaf by leaf.
    spread: per layer, the weighted sum of squared deviations of the added
      running means from their mean.
    num_skipped: micro-batches skipped so far, over all windows: for a NaN,
      infinite or negative weight, or statistics that are not finite.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> from flax import linen
    >>> import optaccum
    >>> layer = linen.BatchNorm(use_running_average=False, momentum=0.9)
    >>> x = jax.random.normal(jax.random.key(0), (8, 3)) + 2.0
    >>> variables = layer.init(jax.random.key(1), x)
    >>> def new_stats(x):  # the micro-step's training-mode apply
    ...   _, updates = layer.apply(variables, x, mutable=["batch_stats"])
    ...   return updates["batch_stats"]
    >>> window = optaccum.flax.BatchStatsWindow.create(variables["batch_stats"])
    >>> for micro_batch in x.reshape(4, 2, 3):
    ...   window = window.add(new_stats(micro_batch))
    >>> window = window.add(new_stats(x[:2].at[0, 0].set(jnp.nan)))  # skipped
    >>> batch_stats, window = window.close(variables["batch_stats"], momentum=0.9)
    >>> bool(jnp.allclose(batch_stats["var"], new_stats(x)["var"], rtol=1e-6))
    True
    >>> float(window.weight), int(window.num_skipped)  # the next window starts empty
    (0.0, 1)
  """

  weight: jax.Array  # shape=(), dtype=float32
  mean: BatchStats
  spread: PyTree
  # A NumPy default: a JAX array here would start the XLA backend at import.
  num_skipped: jax.Array = np.zeros((), np.int32)  # type: ignore[assignment]  # shape=(), dtype=int32

  @classmethod
  def create(cls, batch_stats: BatchStats) -> BatchStatsWindow:
    """An empty window for `batch_stats` (a `batch_stats` collection of BatchNorm layers).

    Args:
      batch_stats: the model's `batch_stats` collection; only its structure,
        shapes and dtypes are read.

    Returns:
      A window with weight 0, zero sums and no micro-batch skipped.

    Raises:
      ValueError: if a leaf lies outside a `{"mean", "var"}` layer, or a
        layer's mean and var differ in shape.
      TypeError: if a statistic is not a floating-point array (a Python
        float or list included).
    """
    _check_layers(_CREATE, "batch_stats", batch_stats, stacked=False)
    return cls(
      weight=jnp.zeros((), jnp.float32),
      mean=jax.tree.map(lambda x: jnp.zeros_like(_wide(x)), batch_stats),
      spread=jax.tree.map(
        lambda layer: jnp.zeros_like(_wide(layer["mean"])), batch_stats, is_leaf=_is_layer
      ),
      num_skipped=jnp.zeros((), jnp.int32),
    )

  def add(self, batch_stats: BatchStats, weight: Scalar | None = None) -> BatchStatsWindow:
    """The window with one micro-step's new `batch_stats` added.

    Args:
      batch_stats: the `batch_stats` the micro-step's training-mode `apply`
        returned (`mutable=["batch_stats"]`), run from the window-start
        statistics. Statistics that hold a NaN or inf skip the micro-batch.
      weight: the micro-batch's size (the number of values each layer reduced
        over per feature, or any multiple of it); None (default) counts 1, for
        micro-batches of equal size. A weight of 0 adds nothing; a NaN,
        infinite or negative one skips the micro-batch.

    Returns:
      The new window; where the micro-batch is skipped, the window as it was
      with `num_skipped` one higher.

    Raises:
      ValueError: if `batch_stats` does not match the window's structure and
        shapes, or `weight` is not a scalar.
      TypeError: if a leaf of `batch_stats` is not a floating-point array (a
        Python float, an int or a complex array), or `weight` is a bool, a
        complex number or not a number.
    """
    _validation.check_tree_matches(_ADD, "batch_stats", batch_stats, self.mean, "the window")
    if weight is not None:
      weight = _validation.as_scalar(_ADD, "weight", weight, jnp.float32)
    not_finite = any_not_finite_in(jax.tree.leaves(batch_stats))
    skip, weight = _window.admit(weight, not_finite)
    assert skip is not None  # given a decision, `admit` returns one
    total = self.weight + weight
    share = jnp.where(total > 0, weight / jnp.where(total > 0, total, 1.0), 0.0)

    def add_layer(layer: Layer, mean: Layer, spread: jax.Array) -> tuple[Layer, jax.Array]:
      deltas = {name: _wide(layer[name]) - mean[name] for name in ("mean", "var")}
      new = {name: mean[name] + share.astype(deltas[name].dtype) * deltas[name] for name in deltas}
      # Welford: the deviation from the old mean times that from the new one.
      after = _wide(layer["mean"]) - new["mean"]
      spread = spread + weight.astype(after.dtype) * deltas["mean"] * after
      return _with_stats(mean, new["mean"], new["var"]), spread

    added = jax.tree.map(add_layer, batch_stats, self.mean, self.spread, is_leaf=_is_layer)
    is_pair = lambda x: isinstance(x, tuple) and len(x) == 2 and _is_layer(x[0])  # noqa: E731
    sums = (
      total,
      jax.tree.map(lambda pair: pair[0], added, is_leaf=is_pair),
      jax.tree.map(lambda pair: pair[1], added, is_leaf=is_pair),
    )
    # A select, not a multiply by 0: a skipped micro-batch's NaN stays out.
    new_weight, new_mean, new_spread = jax.tree.map(
      lambda new, old: jnp.where(skip, old, new), sums, (self.weight, self.mean, self.spread)
    )
    num_skipped = jnp.where(skip, optax.safe_increment(self.num_skipped), self.num_skipped)
    return BatchStatsWindow(new_weight, new_mean, new_spread, num_skipped)

  def close(
    self,
    batch_stats: BatchStats,
    *,
    momentum: float,
    when: Scalar = True,
    reset: Scalar | None = None,
  ) -> tuple[BatchStats, BatchStatsWindow]:
    """The `batch_stats` after the window, and the next window; or both unchanged.

    Call it after the micro-step's optimizer update, with `when` true where
    the update ran the optimizer and `reset` true where the update ended the
    window, whether the optimizer ran or the window guard dropped the window:

      info = optaccum.status(state.opt_state)
      batch_stats, window = window.close(
        state.batch_stats, momentum=m, when=info.has_updated, reset=info.mini_step == 0
      )

    A dropped window (`has_updated` false, `mini_step` back to 0) then leaves
    `batch_stats` as they were, and the next window starts empty, so its
    statistics are its own micro-batches' only. Before the update, `when`
    may also be whether it is the window's last micro-step
    (`optaccum.status(state.opt_state).mini_step == k - 1`, to pass
    `batch_stats=` to `optaccum.flax.apply_train_state_gradients`), but the
    window guard's verdict is not known yet: a dropped window's (finite)
    statistics are then applied.

    Args:
      batch_stats: the window-start `batch_stats`, which the window's
        micro-steps ran from.
      momentum: the layers' `BatchNorm(momentum=...)`, 0 <= momentum < 1.
      when: a scalar bool (Python or JAX): whether the window's statistics
        replace `batch_stats` now.
      reset: a scalar bool: whether the window ends now, applied or not. It
        starts the next window empty where `when` is false too; None
        (default) is `when`.

    Returns:
      `(batch_stats, window)`: where `when` holds, the large batch's new
      statistics (those given, if nothing was added) in the dtypes of
      `batch_stats`; where `when` or `reset` holds, an empty window (its
      `num_skipped` kept). Otherwise both as given.

    Raises:
      ValueError: if `momentum` is out of range (or not a number), or
        `batch_stats` does not match the window's structure and shapes.
      TypeError: if `when` or `reset` is not a scalar bool, or a leaf of
        `batch_stats` is not a floating-point array.
    """
    _check_momentum(_CLOSE, momentum)
    _validation.check_tree_matches(_CLOSE, "batch_stats", batch_stats, self.mean, "the window")
    when = _validation.as_flag(_CLOSE, "when", when)
    ends = when if reset is None else when | _validation.as_flag(_CLOSE, "reset", reset)
    replace = jnp.logical_and(when, self.weight > 0)
    total = jnp.where(self.weight > 0, self.weight, 1.0)

    def close_layer(layer: Layer, mean: Layer, spread: jax.Array) -> Layer:
      var = _variance(mean["var"], spread / total.astype(spread.dtype), momentum)
      return _with_stats(
        layer,
        jnp.where(replace, mean["mean"].astype(layer["mean"].dtype), layer["mean"]),
        jnp.where(replace, var.astype(layer["var"].dtype), layer["var"]),
      )

    batch_stats = jax.tree.map(close_layer, batch_stats, self.mean, self.spread, is_leaf=_is_layer)
    weight, mean, spread = jax.tree.map(
      lambda x: jnp.where(ends, jnp.zeros_like(x), x), (self.weight, self.mean, self.spread)
    )
    return batch_stats, BatchStatsWindow(weight, mean, spread, self.num_skipped)

"""Evaluating accumulation on the user's own step: speed, memory and divergence for each k.

Every configuration trains the same windows from the same initial state on the
same data: the unsplit batch (k = 1, the reference where it fits), and each
k, in the across-steps form (`accumulate`, k micro-steps per window) or the
in-step form (`microbatch`, one step per window). One pass in lockstep
measures how far each run drifts from the reference, window by window; then
timed rounds, in rotating order, give each configuration's time per example
(medians). Memory is XLA's compiled memory analysis of the step each run
executes.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeAlias, cast

import jax
import jax.numpy as jnp
import optax

from optaccum import _planning, _validation
from optaccum._planning import MemoryAnalysis, ValueAndGradFn
from optaccum._types import OptState, Params, PyTree

if TYPE_CHECKING:
  from rich.progress import Progress, TaskID
  from rich.table import Table

_WHERE = "evaluate"
#: A batch: the arguments of the gradient function after the parameters.
_Batch: TypeAlias = tuple[PyTree, ...]
#: What one run's steps take, window by window: the window's micro-batches (or its batch).
_Feed: TypeAlias = list[list[_Batch]]
#: The progress bar's one task (rich numbers its tasks from 0).
_WINDOWS_TASK = cast("TaskID", 0)


@dataclasses.dataclass(frozen=True)
class EvaluationRow:
  """One configuration's measurements.

  Attributes:
    form: "unsplit", "accumulate" or "microbatch".
    k: micro-batches per window (1 for unsplit).
    micro_batch_size: examples per micro-batch.
    seconds_per_example: median over the timed rounds of the run's wall time
      divided by the examples it trained on.
    memory: bytes the compiled step holds (as `optaccum.planning.plan` counts them).
    temporaries: of which temporaries.
    max_param_difference: the largest absolute parameter difference from the
      reference run, over every window's end; NaN once either run's
      parameters hold a NaN (or both an inf in one place): a comparison with a
      NaN is divergence, never agreement.
    max_loss_difference: the largest absolute difference of a window's
      training loss from the reference's; NaN as above.
    final_loss: the last window's training loss.
  """

  form: str
  k: int
  micro_batch_size: int
  seconds_per_example: float
  memory: int
  temporaries: int
  max_param_difference: float
  max_loss_difference: float
  final_loss: float

  @property
  def diverged(self) -> bool:
    """Whether a difference or the final loss is NaN or inf: the run cannot be compared."""
    values = (self.max_param_difference, self.max_loss_difference, self.final_loss)
    return not all(map(math.isfinite, values))


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """What `optaccum.planning.evaluate` measured: a row per configuration, the reference's first."""

  rows: tuple[EvaluationRow, ...]
  reference: int
  windows: int
  batch_size: int

  def table(self) -> Table:
    """The rows as a `rich.table.Table` (rich is one of the demo extras).

    Columns: the form, k, the micro-batch size, the median time per example,
    the compiled step's memory, and the largest parameter and window-loss
    differences from the reference (the rows hold the temporaries and final
    losses too). A difference that is NaN or inf reads "diverged", and a
    caption says which rows did.
    """
    from rich.table import Table

    diverged = [f"{row.form} k={row.k}" for row in self.rows if row.diverged]
    table = Table(
      title=f"{self.windows} windows of {self.batch_size} examples; reference: k={self.reference}",
      caption=None
      if not diverged
      else f"diverged (a loss or parameter became NaN or inf): {', '.join(diverged)}",
    )
    widths = {"form": 10, "k": 2, "batch": 5, "µs/example": 10, "memory": 9}
    widths.update({"Δparam": 7, "Δloss": 7})
    for column, width in widths.items():
      table.add_column(column, justify="right", no_wrap=True, min_width=width)
    for row in self.rows:
      table.add_row(
        row.form,
        str(row.k),
        str(row.micro_batch_size),
        f"{row.seconds_per_example * 1e6:,.2f}",
        _planning.size_text(row.memory),
        _difference_text(row.max_param_difference),
        _difference_text(row.max_loss_difference),
      )
    return table

  def plot(self, path: str) -> None:
    """Saves a PNG: time per example, compiled memory and divergence, for each k."""
    from matplotlib.figure import Figure

    labels = ["unsplit" if row.form == "unsplit" else f"k={row.k}" for row in self.rows]
    forms = sorted({row.form for row in self.rows} - {"unsplit"})
    figure = Figure(figsize=(11, 3.8), layout="constrained")
    speed, memory, drift = figure.subplots(1, 3)
    speed.bar(labels, [row.seconds_per_example * 1e6 for row in self.rows], color="tab:blue")
    speed.set_ylabel("µs per example (median)")
    memory.bar(labels, [row.memory / 2**10 for row in self.rows], color="tab:orange")
    memory.bar(labels, [row.temporaries / 2**10 for row in self.rows], color="tab:red")
    memory.set_ylabel("compiled step memory (KiB); red: temporaries")
    # A log axis has no zero: the reference, and exact runs, sit at the floor;
    # a diverged run has no height to draw, so it is a red bar marked "diverged".
    floor = 1e-12
    heights = [floor if row.diverged else max(row.max_param_difference, floor) for row in self.rows]
    colors = ["tab:red" if row.diverged else "tab:blue" for row in self.rows]
    drift.bar(labels, heights, color=colors)
    for index, row in enumerate(self.rows):
      if row.diverged:
        drift.text(index, floor, "diverged", rotation=90, ha="center", va="bottom", color="tab:red")
    drift.set_yscale("log")
    drift.set_ylabel(f"max |param - reference|, k={self.reference}")
    for axes in (speed, memory, drift):
      axes.tick_params(axis="x", labelsize="small")
      axes.grid(alpha=0.3, axis="y")
    figure.suptitle(
      f"{' and '.join(forms) or 'unsplit'} on your step: {self.windows} windows of "
      f"{self.batch_size} examples"
    )
    figure.savefig(path, dpi=100)


def _difference_text(difference: float) -> str:
  """A table cell: the difference, or "diverged" where it is NaN or inf."""
  return f"{difference:.1e}" if math.isfinite(difference) else "diverged"


@dataclasses.dataclass
class _Run:
  """One configuration: its compiled step, how a window feeds it, and its state."""

  form: str
  k: int
  step: jax.stages.Compiled  # (params, opt_state, *batch) -> (params, opt_state, loss)
  memory: MemoryAnalysis
  init: Callable[[Params], OptState]
  has_aux: bool
  state: tuple = ()  # (params, opt_state), once `reset`

  def reset(self, params: Params) -> None:
    """A fresh copy of the initial state: the step donates its buffers."""
    params = jax.tree.map(jnp.copy, params)
    self.state = (params, self.init(params))

  def window(self, batches: list[_Batch]) -> jax.Array:
    """Trains one window (its micro-batches, prepared); returns its mean training loss."""
    losses = []
    for batch in batches:
      params, opt_state, loss = self.step(*self.state, *batch)
      self.state = (params, opt_state)
      losses.append(loss[0] if self.has_aux else loss)
    return sum(losses[1:], losses[0]) / len(losses)


def _make_run(
  form: str,
  k: int,
  grad_fn: ValueAndGradFn,
  params: Params,
  optimizer: optax.GradientTransformation,
  batch: _Batch,
  has_aux: bool,
) -> _Run:
  """Compiles one configuration's step for these shapes."""
  compiled, tx = _planning.compile_step(form, k, grad_fn, params, optimizer, batch, has_aux)
  return _Run(form, k, compiled, _planning.memory_analysis(compiled), tx.init, has_aux)


def _feed(run: _Run, batch: _Batch) -> list[_Batch]:
  """The window's batches as `run` takes them: k contiguous micro-batches for `accumulate`."""
  if run.form != "accumulate":
    return [batch]
  size = _planning.batch_size_of(_WHERE, batch) // run.k
  return [jax.tree.map(lambda x: x[i * size : (i + 1) * size], batch) for i in range(run.k)]


@jax.jit
def _differences(a: Params, b: Params) -> list[jax.Array]:
  """Each leaf's largest absolute difference, in the leaf's own precision (complex: modulus)."""
  return [jnp.max(jnp.abs(x - y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)) if x.size]


def _max_difference(a: Params, b: Params) -> float:
  """The largest absolute difference between two parameter trees, on the host; NaN if any is."""
  return _worst(*(float(d) for d in jax.device_get(_differences(a, b))))


def _worst(*differences: float) -> float:
  """The largest difference (0 for none), NaN where any is NaN.

  Python's `max` would keep whichever comes first when a NaN meets a number
  (every comparison with NaN is False), reporting a diverged run as agreeing.
  """
  if any(map(math.isnan, differences)):
    return math.nan
  return max(differences, default=0.0)


def _check_batches(batches: object) -> int:
  """B, after checking that `batches` is a non-empty sequence of like-shaped batch tuples."""
  if isinstance(batches, tuple | str) or not isinstance(batches, Sequence) or not batches:
    raise TypeError(
      f"`{_WHERE}(batches=...)` must be a non-empty list of batches, one per window, each a "
      f"tuple of the arguments after the parameters, got a {type(batches).__name__}."
    )
  sizes = [
    _planning.batch_size_of(_WHERE, batch, name="batches", index=index, shapes=False)
    for index, batch in enumerate(batches)
  ]
  first = _batch_layout(batches[0])
  for index, batch in enumerate(batches[1:], start=1):
    difference = _layout_difference(_batch_layout(batch), first)
    if difference is not None:
      raise ValueError(
        f"`{_WHERE}(batches=...)` must hold batches of one structure, shapes and dtypes: "
        f"batch {index} differs from batch 0: {difference}."
      )
  return sizes[0]


def _batch_layout(batch: _Batch) -> tuple[object, list[tuple[str, str]]]:
  """A batch's tree structure and each leaf's (path, dtype and shape), as the step sees them."""
  leaves, structure = jax.tree_util.tree_flatten_with_path(_planning.abstract(batch))
  return structure, [(jax.tree_util.keystr(path), _planning.leaf_text(x)) for path, x in leaves]


def _layout_difference(
  layout: tuple[object, list[tuple[str, str]]], first: tuple[object, list[tuple[str, str]]]
) -> str | None:
  """Where a batch's layout differs from batch 0's, in words; None where it does not."""
  if layout[0] != first[0]:
    return f"structure {layout[0]} where batch 0 has {first[0]}"
  for (path, leaf), (_, first_leaf) in zip(layout[1], first[1]):
    if leaf != first_leaf:
      return f"{leaf} at {path or 'the root'} where batch 0 has {first_leaf}"
  return None


def _check_params(params: Params) -> None:
  """Checks that `params` holds arrays, every value finite: each run trains from them."""
  label = f"`{_WHERE}(params=...)`"
  _planning.check_array_leaves(label, params, shapes=False)
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
      continue
    bad = int(jnp.size(leaf) - jnp.count_nonzero(jnp.isfinite(leaf)))
    if bad:
      raise ValueError(
        f"{label} must be finite: the leaf at {_validation.place(path)} "
        f"holds {bad} NaN or inf of {jnp.size(leaf)} values, and every run would start from them."
      )


def _progress(enabled: bool, total: int) -> Progress | _NoProgress:
  """A rich progress bar over `total` windows, or a stand-in that shows nothing."""
  if not enabled:
    return _NoProgress()
  from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

  bar = Progress("evaluate", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
  bar.add_task("windows", total=total)
  return bar


class _NoProgress:
  def __enter__(self) -> _NoProgress:
    return self

  def __exit__(self, *_: object) -> None:
    return None

  def advance(self, task_id: int, advance: float = 1) -> None:
    return None


def _divergence(
  runs: list[_Run], feeds: list[_Feed], params: Params, bar: Progress | _NoProgress
) -> list[tuple[float, float, float]]:
  """Trains every run in lockstep; (max |Δ param|, max |Δ loss|, final loss) against runs[0]."""
  for run in runs:
    run.reset(params)
  worst = [(0.0, 0.0, 0.0)] * len(runs)
  for window in range(len(feeds[0])):
    losses = [float(run.window(feed[window])) for run, feed in zip(runs, feeds)]
    reference = runs[0].state[0]
    for index, run in enumerate(runs):
      param = _max_difference(run.state[0], reference)
      loss = abs(losses[index] - losses[0])
      worst[index] = (_worst(worst[index][0], param), _worst(worst[index][1], loss), losses[index])
    bar.advance(_WINDOWS_TASK, len(runs))
  return worst


def _timings(
  runs: list[_Run], feeds: list[_Feed], params: Params, rounds: int, bar: Progress | _NoProgress
) -> list[float]:
  """Each run's seconds per window-set, over `rounds` rounds in rotating order."""
  seconds: list[list[float]] = [[] for _ in runs]
  for round_index in range(rounds):
    order = list(range(len(runs)))
    shift = round_index % len(runs)
    for index in order[shift:] + order[:shift]:
      run = runs[index]
      run.reset(params)
      jax.block_until_ready(run.state)
      start = time.perf_counter()
      for batches in feeds[index]:
        run.window(batches)
      jax.block_until_ready(run.state)
      seconds[index].append(time.perf_counter() - start)
      bar.advance(_WINDOWS_TASK, len(feeds[index]))
  return [statistics.median(s) for s in seconds]


def evaluate(
  grad_fn: ValueAndGradFn,
  params: Params,
  optimizer: optax.GradientTransformation,
  batches: Sequence[_Batch],
  k: Sequence[int] = (2, 4, 8),
  *,
  form: str = "accumulate",
  budget: int | str | None = None,
  rounds: int = 3,
  has_aux: bool = False,
  progress: bool = True,
) -> Evaluation:
  """Trains the same windows with each k and measures speed, memory and divergence.

  From the same initial parameters, on the same data (`batches`, one global
  batch per window), it trains the unsplit batch (one optimizer step per
  batch: the reference) and, for each k, either `optaccum.accumulate(
  optimizer, k)` fed k contiguous micro-batches per window through the fast
  path (`form="accumulate"`) or `optaccum.microbatch(grad_fn, k)` in one step
  (`form="microbatch"`). A first pass runs them in lockstep and records, after
  every window, how far each run's parameters and window loss are from the
  reference's; then `rounds` timed rounds, in rotating order, give the median
  time per example. Memory is XLA's compiled memory analysis of the step each
  run executes (parameters and optimizer state donated).

  Args:
    grad_fn: `(params, *batch) -> (loss, grads)`, like `jax.value_and_grad(loss)`;
      `((loss, aux), grads)` with `has_aux=True`.
    params: the initial parameters (arrays; each run starts from a copy).
    optimizer: the optax optimizer (the inner optimizer of the accumulation).
    batches: one global batch per window, each a tuple of the arguments after
      the parameters, all of one shape with a leading batch axis B.
    k: the values of k to evaluate, each dividing B.
    form: "accumulate" (default) or "microbatch".
    budget: bytes a step may hold (an int or a size such as "2GiB"). A
      configuration whose compiled step needs more is not run (the unsplit
      batch included: then the smallest k run is the reference). None (default)
      runs every configuration.
    rounds: timed rounds.
    has_aux: whether `grad_fn` returns aux outputs.
    progress: show a rich progress bar.

  Returns:
    An `Evaluation`: a row per configuration run, `table()` (rich) and
    `plot(path)` (a PNG). A run that meets a NaN or inf (in its loss or its
    parameters) reports NaN differences and `row.diverged`, never agreement.

  Raises:
    TypeError: for a `grad_fn`, `optimizer`, `has_aux` or `progress` of the
      wrong kind (the first three checked as `plan` checks them), a leaf of
      `params` or of a batch that is not an array (`jax.ShapeDtypeStruct`
      included: this call runs the step), or a `grad_fn` that does not return
      `(loss, grads)` on the first batch (`jax.grad(loss)`), a loss that is a
      Python number, or a leaf of `params` that is not floating-point.
    ValueError: for a bad `k`, `form`, `rounds` or `budget`, batches that differ
      from batch 0 in structure, shapes or dtypes or have no examples,
      parameters holding NaN or inf, or a budget no configuration fits.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optaccum
    >>> def loss(w, x, y):
    ...   return jnp.mean((x @ w - y) ** 2)
    >>> x = jax.random.normal(jax.random.key(0), (3, 32, 4))  # 3 windows of 32
    >>> batches = [(x[i], x[i].sum(axis=1)) for i in range(3)]
    >>> result = optaccum.planning.evaluate(jax.value_and_grad(loss), jnp.zeros(4), optax.sgd(0.1),
    ...                            batches, k=[2, 4], rounds=1, progress=False)
    >>> [(row.form, row.k, row.micro_batch_size) for row in result.rows]
    [('unsplit', 1, 32), ('accumulate', 2, 16), ('accumulate', 4, 8)]
    >>> all(row.max_param_difference < 1e-6 for row in result.rows)
    True
  """
  _planning.check_step_arguments(_WHERE, grad_fn, optimizer, has_aux)
  batch_size = _check_batches(batches)
  ks = _planning.dividing_ks(_WHERE, "k", k, batch_size)
  _validation.check_choice(_WHERE, "form", form, _planning.FORMS)
  _validation.check_positive_int(_WHERE, "rounds", rounds)
  if not isinstance(progress, bool):
    raise TypeError(f"`{_WHERE}(progress=...)` must be a bool, got progress={progress!r}.")
  _check_params(params)
  limit = None if budget is None else _planning.parse_bytes(_WHERE, "budget", budget)
  _planning.check_grad_fn(_WHERE, grad_fn, params, batches[0], has_aux)
  configurations = [("unsplit", 1)] + [(form, k) for k in ks if k > 1]
  runs = [
    _make_run(f, k, grad_fn, params, optimizer, batches[0], has_aux) for f, k in configurations
  ]
  runs = [run for run in runs if limit is None or _planning.memory_total(run.memory) <= limit]
  if not runs:
    raise ValueError(
      f"`{_WHERE}(budget=...)` of {limit:,} bytes fits none of the configurations "
      f"(k = 1, {', '.join(map(str, ks))}); `optaccum.planning.plan` shows what each needs."
    )
  batches = jax.device_put(list(batches))
  feeds = [[_feed(run, batch) for batch in batches] for run in runs]
  with _progress(progress, (1 + rounds) * len(runs) * len(batches)) as bar:
    worst = _divergence(runs, feeds, params, bar)
    seconds = _timings(runs, feeds, params, rounds, bar)
  rows = tuple(
    EvaluationRow(
      run.form,
      run.k,
      batch_size // run.k,
      run_seconds / (len(batches) * batch_size),
      _planning.memory_total(run.memory),
      int(run.memory.temp_size_in_bytes),
      *run_worst,
    )
    for run, run_seconds, run_worst in zip(runs, seconds, worst)
  )
  return Evaluation(rows, runs[0].k, len(batches), batch_size)

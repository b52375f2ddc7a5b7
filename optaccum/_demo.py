"""The demo: one Flax model trained with a large batch, and with accumulated micro-batches.

Both runs start from the same parameters and see the same examples in the same
order; the accumulated run cuts each batch of B into k micro-batches of B/k and
updates once per k. The demo shows that the two end in the same place, what one
step of each costs in compiled memory, and how long each takes.

Needs the demo extras: `pip install "optaccum[demo]"` (Flax, scikit-learn for
its bundled digits, rich, matplotlib).
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen
from flax.training.train_state import TrainState
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import optaccum
from optaccum._planning import MemoryAnalysis, ValueAndGradFn, memory_analysis, size_text
from optaccum._types import Params

# The digits are split once, the same way whatever --seed: 1438 to train, 359 to test.
_TEST_FRACTION = 0.2
_SPLIT_SEED = 0
_HIDDEN = 128
_LEARNING_RATE = 0.1
_MOMENTUM = 0.9
# How often (in optimizer steps) the progress bar reads the loss back from the device;
# each read waits for the device, so not on every step.
_LOSS_REFRESH = 10


class DigitsMlp(linen.Module):
  """A two-hidden-layer MLP over the 8x8 digit images."""

  @linen.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    hidden = jax.nn.relu(linen.Dense(_HIDDEN)(images))
    hidden = jax.nn.relu(linen.Dense(_HIDDEN)(hidden))
    return linen.Dense(10)(hidden)


@dataclasses.dataclass
class RunResult:
  """What one training run produced.

  Attributes:
    name: the run's label in the table and the plot.
    losses: the training loss of each optimizer step's batch, float64[steps].
    params: the final parameters.
    train_loss: the final parameters' loss on the whole training set.
    test_accuracy: the final parameters' accuracy on the held-out digits.
    memory: XLA's memory analysis of one compiled (micro-)step.
    compile_seconds: time to compile that step.
    train_seconds: time of the training loop.
  """

  name: str
  losses: np.ndarray
  params: Params
  train_loss: float
  test_accuracy: float
  memory: MemoryAnalysis
  compile_seconds: float
  train_seconds: float


def load_digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """scikit-learn's bundled digits (no download), scaled to [0, 1] and split."""
  from sklearn.datasets import load_digits

  images, labels = load_digits(return_X_y=True)
  order = np.random.default_rng(_SPLIT_SEED).permutation(len(labels))
  images = (images[order] / 16.0).astype(np.float32)
  labels = labels[order].astype(np.int32)
  num_test = int(len(labels) * _TEST_FRACTION)
  return images[num_test:], labels[num_test:], images[:num_test], labels[:num_test]


def batch_indices(num_examples: int, batch_size: int, steps: int, seed: int) -> np.ndarray:
  """int[steps, batch_size]: consecutive slices of a stream of shuffled epochs."""
  rng = np.random.default_rng(seed)
  epochs = -(-steps * batch_size // num_examples)
  stream = np.concatenate([rng.permutation(num_examples) for _ in range(epochs)])
  return stream[: steps * batch_size].reshape(steps, batch_size)


def _loss(
  state: TrainState, params: Params, images: jax.typing.ArrayLike, labels: jax.typing.ArrayLike
) -> jax.Array:
  logits = state.apply_fn(params, images)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _train_step(
  state: TrainState, images: jax.Array, labels: jax.Array
) -> tuple[TrainState, jax.Array]:
  """One (micro-)step; the same code serves both runs, only `state.tx` differs."""
  loss, grads = jax.value_and_grad(lambda p: _loss(state, p, images, labels))(state.params)
  return state.apply_gradients(grads=grads), loss


def _compile(
  state: TrainState, images: np.ndarray, labels: np.ndarray
) -> tuple[jax.stages.Compiled, float]:
  """Compiles one step for these shapes; the state's buffers are donated and reused."""
  start = time.perf_counter()
  compiled = jax.jit(_train_step, donate_argnums=0).lower(state, images, labels).compile()
  return compiled, time.perf_counter() - start


def _train(
  name: str,
  state: TrainState,
  micro_batches: np.ndarray,
  data: tuple[np.ndarray, ...],
  progress: Progress,
) -> RunResult:
  """Runs every micro-batch of `micro_batches` (int[steps, k, B/k]) through one step."""
  train_images, train_labels, test_images, test_labels = data
  steps, k, _ = micro_batches.shape
  first = micro_batches[0, 0]
  step, compile_seconds = _compile(state, train_images[first], train_labels[first])
  task = progress.add_task(name, total=steps * k, loss=float("nan"))
  losses = []
  start = time.perf_counter()
  for micro_step, indices in enumerate(micro_batches.reshape(steps * k, -1), start=1):
    state, loss = step(state, train_images[indices], train_labels[indices])
    losses.append(loss)
    fields = {}
    if micro_step % (k * _LOSS_REFRESH) == 0 or micro_step == steps * k:
      fields["loss"] = _window_losses(losses[-k:], k)[0]
    progress.update(task, advance=1, **fields)
  jax.block_until_ready(state)
  train_seconds = time.perf_counter() - start
  window_losses = _window_losses(losses, k)
  logits = state.apply_fn(state.params, test_images)
  return RunResult(
    name=name,
    losses=window_losses,
    params=state.params,
    train_loss=float(_loss(state, state.params, train_images, train_labels)),
    test_accuracy=float(jnp.mean(jnp.argmax(logits, axis=-1) == test_labels)),
    memory=memory_analysis(step),
    compile_seconds=compile_seconds,
    train_seconds=train_seconds,
  )


def _window_losses(losses: list[jax.Array], k: int) -> np.ndarray:
  """The loss of each window of `k` consecutive micro-batch losses, float64[windows].

  Micro-batches are of equal size, so a window's loss is the mean of its k losses:
  the loss of the large batch they were cut from.
  """
  return np.asarray(jax.device_get(losses), np.float64).reshape(-1, k).mean(axis=1)


def max_param_difference(a: Params, b: Params) -> float:
  """The largest absolute difference between two parameter trees."""
  return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def results_table(large: RunResult, accumulated: RunResult) -> Table:
  """The summary: one column per run, one row per measure, then accumulated minus large."""
  table = Table(title="Large batch vs accumulated micro-batches")
  table.add_column("", no_wrap=True)
  for name in (large.name, accumulated.name, "difference"):
    table.add_column(name, justify="right", no_wrap=True)

  def add(
    label: str,
    large_value: float,
    accumulated_value: float,
    spec: str,
    unit: str = "",
    difference_spec: str | None = None,
  ) -> None:
    difference = accumulated_value - large_value
    cells = [
      f"{large_value:{spec}}",
      f"{accumulated_value:{spec}}",
      f"{difference:+{difference_spec or spec}}",
    ]
    table.add_row(label, *(cell + unit for cell in cells))

  add("loss, whole training set", large.train_loss, accumulated.train_loss, ".6f", "", ".1e")
  add("test accuracy", large.test_accuracy, accumulated.test_accuracy, ".2%")
  largest = max_param_difference(large.params, accumulated.params)
  table.add_row("max parameter difference", "", "", f"{largest:.1e}")
  for label, field in [
    ("step memory: temporaries", "temp_size_in_bytes"),
    ("step memory: arguments", "argument_size_in_bytes"),
  ]:
    kib = [getattr(run.memory, field) / 1024 for run in (large, accumulated)]
    add(label, kib[0], kib[1], ",.0f", " KiB")
  add("wall time: compile", large.compile_seconds, accumulated.compile_seconds, ".1f", " s")
  add("wall time: training loop", large.train_seconds, accumulated.train_seconds, ".1f", " s")
  return table


def plot_losses(large: RunResult, accumulated: RunResult, path: str) -> None:
  """Saves the two loss curves (top) and their absolute difference (bottom) as a PNG."""
  from matplotlib.figure import Figure

  figure = Figure(figsize=(8, 6), layout="constrained")
  top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=[3, 1])
  steps = np.arange(1, len(large.losses) + 1)
  top.plot(steps, large.losses, color="tab:blue", linewidth=2.5, label=large.name)
  top.plot(steps, accumulated.losses, color="tab:orange", linestyle="--", label=accumulated.name)
  top.set_yscale("log")
  top.set_ylabel("training loss of the step's batch")
  top.set_title("Same data, same model: one large batch vs accumulated micro-batches")
  top.legend()
  top.grid(alpha=0.3)
  difference = np.abs(large.losses - accumulated.losses)
  equal = difference == 0
  # A log axis cannot show exact zeros: leave gaps there and count them instead.
  bottom.plot(steps, np.where(equal, np.nan, difference), ".-", color="tab:gray", markersize=3)
  bottom.set_yscale("log")
  bottom.set_ylabel("|loss difference|")
  bottom.set_title(
    f"float32 rounding; exactly equal at {int(equal.sum())} of {len(steps)} steps (gaps)",
    fontsize="medium",
  )
  bottom.set_xlabel("optimizer step (gradient step)")
  bottom.grid(alpha=0.3)
  figure.savefig(path, dpi=100)


def _grad_fn() -> ValueAndGradFn:
  """The demo's gradient function: `(params, images, labels) -> (mean loss, grads)`."""

  def loss(params: Params, images: jax.Array, labels: jax.Array) -> jax.Array:
    logits = DigitsMlp().apply(params, images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  return jax.value_and_grad(loss)


def run_evaluation(
  *,
  k: list[int],
  batch_size: int,
  windows: int,
  rounds: int,
  form: str,
  seed: int,
  out: str,
  console: Console | None = None,
) -> optaccum.planning.Evaluation:
  """`optaccum.planning.evaluate` on the demo model and digits; prints the table, saves a PNG."""
  console = console or Console()
  train_images, train_labels, _, _ = load_digits_split()
  indices = batch_indices(len(train_images), batch_size, windows, seed)
  batches = [(train_images[i], train_labels[i]) for i in indices]
  params = DigitsMlp().init(jax.random.key(seed), train_images[:1])
  inner = optax.sgd(_LEARNING_RATE, momentum=_MOMENTUM)
  console.print(
    f"Digits MLP, {windows} optimizer steps of {batch_size} images: the unsplit batch and "
    f"k = {', '.join(map(str, k))} ({form}), {rounds} timed rounds."
  )
  result = optaccum.planning.evaluate(
    _grad_fn(), params, inner, batches, k=k, form=form, rounds=rounds
  )
  console.print(result.table())
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  result.plot(out)
  console.print(f"Plot saved to {os.path.abspath(out)}", soft_wrap=True)
  return result


def choose_k(*, batch_size: int, budget: int, console: Console | None = None) -> int:
  """Plans k for the demo's accumulated run from a memory budget, says why, and returns it.

  Compiles the demo's micro-step for every k dividing `batch_size`
  (`optaccum.planning.plan`, the across-steps form) and prints the table; raises a
  ValueError where no k fits.
  """
  console = console or Console()
  images = jax.ShapeDtypeStruct((batch_size, 64), jnp.float32)
  labels = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
  params = jax.eval_shape(DigitsMlp().init, jax.random.key(0), images)
  inner = optax.sgd(_LEARNING_RATE, momentum=_MOMENTUM)
  chosen = optaccum.planning.plan(
    _grad_fn(), params, inner, (images, labels), budget=budget, forms=["accumulate"]
  )
  console.print(chosen.table(), soft_wrap=True)
  k = chosen.accumulate
  assert k is not None
  row = next(row for row in chosen.rows if row.k == k)
  larger = [r for r in chosen.rows if r.k < k]
  why = f"k={k} is the smallest k whose micro-step fits: {size_text(row.total)}"
  if k == 1:
    why = f"the unsplit step fits ({size_text(row.total)}): k=1, no accumulation needed"
  if larger:
    last = larger[-1]
    why += f"; k={last.k} (micro-batches of {last.micro_batch_size}) needs {size_text(last.total)}"
  console.print(f"Memory budget {size_text(budget)}: {why}.", soft_wrap=True)
  return k


def run_demo(
  *,
  k: int,
  batch_size: int,
  steps: int,
  seed: int,
  out: str,
  console: Console | None = None,
) -> tuple[RunResult, RunResult]:
  """Trains the digits MLP twice, prints the table, saves the loss plot to `out`.

  The options are checked by the command line (`optaccum demo --help`); here
  `batch_size` must be a multiple of `k`.

  Returns:
    The large-batch run and the accumulated run.
  """
  console = console or Console()
  data = load_digits_split()
  train_images = data[0]
  micro_batch = batch_size // k
  console.print(
    f"Digits: {len(train_images)} training images, {len(data[2])} held out. "
    f"Training for {steps} optimizer steps of {batch_size} images, twice: "
    f"one batch of {batch_size} per step, then {k} micro-batches of {micro_batch} "
    "accumulated per step."
  )
  indices = batch_indices(len(train_images), batch_size, steps, seed)
  params = DigitsMlp().init(jax.random.key(seed), train_images[:1])
  inner = optax.sgd(_LEARNING_RATE, momentum=_MOMENTUM)

  def fresh_state(tx: optax.GradientTransformation) -> TrainState:
    # A copy per run: each run donates its state's buffers to its compiled step.
    own_params = jax.tree.map(jnp.copy, params)
    return TrainState.create(apply_fn=DigitsMlp().apply, params=own_params, tx=tx)

  columns = [
    TextColumn("{task.description}"),
    BarColumn(),
    MofNCompleteColumn(),
    TextColumn("batch loss {task.fields[loss]:.4f}"),
    TimeElapsedColumn(),
  ]
  with Progress(*columns, console=console) as progress:
    large = _train(
      f"batch of {batch_size}",
      fresh_state(inner),
      indices[:, None, :],
      data,
      progress,
    )
    accumulated = _train(
      f"{k} × {micro_batch} accumulated",
      fresh_state(optaccum.accumulate(inner, k)),
      indices.reshape(steps, k, micro_batch),
      data,
      progress,
    )

  console.print(results_table(large, accumulated))
  console.print(
    "The progress bars' batch loss is the loss of the last batch (refreshed every "
    f"{_LOSS_REFRESH} optimizer steps), which varies from batch to batch; the table's loss "
    f"is the final parameters' mean loss over all {len(train_images)} training images."
  )
  console.print(
    "Both runs took the same optimizer steps on the same images: the accumulated run "
    "averages the gradients of its k micro-batches and updates once per window, so it "
    "ends where the large-batch run ends, up to float32 rounding: a mean of k means "
    "rounds differently from one mean (the difference column). Its step compiles for a "
    "batch k times "
    "smaller: its temporaries (activations and gradients) shrink with the batch, while "
    "its arguments (parameters, optimizer state, batch) grow by one accumulator the "
    "size of the parameters. Accumulation saves memory where activations outweigh "
    "parameters, as they do at large batch sizes."
  )
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  plot_losses(large, accumulated, out)
  # No wrapping, so the path stays whole for copying.
  console.print(f"Loss curves saved to {os.path.abspath(out)}", soft_wrap=True)
  return large, accumulated

"""`optaccum.planning.evaluate` on bad input and bad numbers.

A tiny least-squares step (4 parameters, 3 windows of 8): a NaN or inf met on
the way is reported as divergence, never as agreement, and each refusal names
the call, the argument and the value, before anything compiles.
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from rich.console import Console

import optaccum
from optaccum import _planning

WINDOWS, BATCH, FEATURES = 3, 8, 4
LEARNING_RATE = 0.1


def loss(w, x, y):
  return jnp.mean((x @ w - y) ** 2)


GRAD_FN = jax.value_and_grad(loss)


def data():
  """float32 inputs and targets, [WINDOWS, BATCH, FEATURES] and [WINDOWS, BATCH]."""
  x = np.random.default_rng(0).normal(size=(WINDOWS, BATCH, FEATURES)).astype(np.float32)
  return x, x.sum(axis=2) / 2


def batches(x=None, y=None):
  x, y = data() if x is None else (x, y)
  return [(jnp.asarray(x[i]), jnp.asarray(y[i])) for i in range(len(x))]


def evaluate(**arguments):
  defaults = dict(
    grad_fn=GRAD_FN,
    params=jnp.zeros(FEATURES),
    optimizer=optax.sgd(LEARNING_RATE),
    batches=batches(),
    k=[2],
    rounds=1,
    progress=False,
  )
  return optaccum.planning.evaluate(**{**defaults, **arguments})


@pytest.fixture
def no_compiling(monkeypatch):
  """Fails any test that gets as far as compiling a step: the checks come first."""

  def refuse(*args, **kwargs):
    pytest.fail("a step was compiled before the bad input was refused")

  monkeypatch.setattr(_planning, "compile_step", refuse)


def numpy_window_losses(x, y):
  """The unsplit run in float64: one SGD step per window; each window's loss before its step."""
  w, losses = np.zeros(FEATURES), []
  for xs, ys in zip(x.astype(np.float64), y.astype(np.float64)):
    residual = xs @ w - ys
    losses.append(np.mean(residual**2))
    w = w - LEARNING_RATE * 2 * xs.T @ residual / len(ys)
  return losses


def table_text(result):
  console = Console(record=True, width=120)
  console.print(result.table())
  return console.export_text()


def test_clean_windows_agree_and_the_loss_is_numpys():
  # The control for the divergence tests: without NaN, every row agrees.
  result = evaluate()
  expected = numpy_window_losses(*data())[-1]
  for row in result.rows:
    assert not row.diverged
    assert row.max_param_difference < 1e-6 and row.max_loss_difference < 1e-6
    assert row.final_loss == pytest.approx(expected, rel=1e-5)
  assert "diverged" not in table_text(result)


@pytest.mark.parametrize("window", [1, 2], ids=["middle window", "last window"])
def test_a_nan_in_one_batch_is_divergence_never_agreement(window, tmp_path):
  x, y = data()
  x[window, 0, 0] = np.nan
  result = evaluate(batches=batches(x, y))
  unsplit, accumulated = result.rows
  assert (unsplit.form, accumulated.form) == ("unsplit", "accumulate")
  # NumPy agrees that the unsplit run's loss is NaN from that window on.
  assert math.isnan(numpy_window_losses(x, y)[-1]) and math.isnan(unsplit.final_loss)
  if window == 1:
    # accumulate's window guard drops the non-finite window: the run trains on windows 0
    # and 2 and ends finite, yet it cannot agree with a reference that is NaN.
    kept = numpy_window_losses(x[[0, 2]], y[[0, 2]])[-1]
    assert accumulated.final_loss == pytest.approx(kept, rel=1e-5)
  else:
    assert math.isnan(accumulated.final_loss)
  for row in result.rows:
    assert math.isnan(row.max_param_difference), row
    assert math.isnan(row.max_loss_difference), row
    assert row.diverged
  text = table_text(result)
  lines = [line.split("│") for line in text.splitlines() if line.startswith("│")]
  assert [cells[-3:-1] for cells in lines] == [[" diverged ", " diverged "]] * 2
  assert "diverged (a loss or parameter became NaN or inf): unsplit k=1, accumulate k=2" in (
    " ".join(text.split())
  )
  path = tmp_path / "diverged.png"
  result.plot(str(path))
  assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_an_inf_target_is_divergence_too():
  x, y = data()
  y[0, 3] = np.inf
  result = evaluate(batches=batches(x, y))
  assert all(row.diverged for row in result.rows)
  assert all(math.isnan(row.max_param_difference) for row in result.rows)


def test_windows_of_no_rows_are_refused_naming_batches_and_the_batch(no_compiling):
  empty = [(jnp.zeros((0, FEATURES)), jnp.zeros((0,)))] * 2
  with pytest.raises(ValueError) as error:
    evaluate(batches=empty)
  assert str(error.value) == (
    "`evaluate(batches=...)` batch 0 has no examples: its leading batch axis has size 0."
  )


def test_a_batch_error_names_the_batches_argument_and_the_batch_index(no_compiling):
  good = batches()
  bad = (good[2][0], good[2][1][:7])
  with pytest.raises(ValueError) as error:
    evaluate(batches=[good[0], good[1], bad])
  assert str(error.value) == (
    "`evaluate(batches=...)` batch 2 leaves must share one leading batch axis, got leading "
    "sizes 7, 8."
  )


def test_jax_grad_in_place_of_value_and_grad_is_named_before_compiling(no_compiling):
  with pytest.raises(TypeError) as error:
    evaluate(grad_fn=jax.grad(loss))
  assert str(error.value) == (
    "`evaluate(grad_fn=...)` must return (loss, grads) like jax.value_and_grad(loss), but on "
    "the first micro-batch it returned float32[4]. jax.grad(loss) returns the gradients alone: "
    "pass jax.value_and_grad(loss)."
  )


def test_has_aux_true_for_a_grad_fn_without_aux_is_named(no_compiling):
  with pytest.raises(TypeError) as error:
    evaluate(has_aux=True)
  assert str(error.value) == (
    "`evaluate(grad_fn=...)` must return ((loss, aux), grads) like "
    "jax.value_and_grad(loss, has_aux=True), but on the first micro-batch its first output is "
    "float32[], not (loss, aux)."
  )


@pytest.mark.parametrize(
  "arguments, error, message",
  [
    ({"grad_fn": 3}, TypeError, "`evaluate(grad_fn=...)` must be callable, got grad_fn=3."),
    (
      {"optimizer": 3},
      TypeError,
      "`evaluate(optimizer=...)` must be an optax.GradientTransformation, got optimizer=3.",
    ),
    ({"has_aux": "yes"}, TypeError, "`evaluate(has_aux=...)` must be a bool, got has_aux='yes'."),
    ({"progress": 1}, TypeError, "`evaluate(progress=...)` must be a bool, got progress=1."),
    ({"progress": None}, TypeError, "`evaluate(progress=...)` must be a bool, got progress=None."),
    ({"form": "scan"}, ValueError, "`evaluate(form=...)` must be one of 'microbatch', "),
    ({"form": None}, ValueError, "got form=None."),
  ],
)
def test_the_arguments_plan_checks_are_checked_the_same_way(
  arguments, error, message, no_compiling
):
  with pytest.raises(error, match=re.escape(message)):
    evaluate(**arguments)


@pytest.mark.parametrize(
  "k, error, message",
  [
    ([0], ValueError, "must be a positive int, got k=0."),
    ([-2], ValueError, "must be a positive int, got k=-2."),
    ([True], ValueError, "must be a positive int, got k=True."),
    ([2.0], ValueError, "must be a positive int, got k=2.0."),
    ([3], ValueError, "must divide the batch of 8, got 3."),
    ([16], ValueError, "must divide the batch of 8, got 16."),
    ([], TypeError, "must be a non-empty sequence of positive ints, got k=[]."),
    (2, TypeError, "must be a non-empty sequence of positive ints, got k=2."),
    ("2", TypeError, "must be a non-empty sequence of positive ints, got k='2'."),
    (None, TypeError, "must be a non-empty sequence of positive ints, got k=None."),
  ],
)
def test_bad_k_are_named(k, error, message, no_compiling):
  with pytest.raises(error, match=re.escape(f"`evaluate(k=...)` {message}")):
    evaluate(k=k)


@pytest.mark.parametrize("rounds", [0, -1, True, 1.0, None])
def test_bad_rounds_are_named(rounds, no_compiling):
  message = f"`evaluate(rounds=...)` must be a positive int, got rounds={rounds!r}."
  with pytest.raises(ValueError, match=re.escape(message)):
    evaluate(rounds=rounds)


@pytest.mark.parametrize(
  "bad, message",
  [
    ([], "got a list."),
    ((), "got a tuple."),
    ("windows", "got a str."),
    (iter(batches()), "got a list_iterator."),
    (batches()[0], "got a tuple."),  # one batch, not a list of them
  ],
)
def test_batches_must_be_a_non_empty_list(bad, message, no_compiling):
  prefix = "`evaluate(batches=...)` must be a non-empty list of batches, one per window"
  with pytest.raises(TypeError, match=re.escape(prefix) + ".*" + re.escape(message)):
    evaluate(batches=bad)


@pytest.mark.parametrize(
  "second, difference",
  [
    (lambda x, y: (x, {"y": y}), "structure PyTreeDef((*, {'y': *})) where batch 0 has"),
    (lambda x, y: (x[:, :3], y), "float32[8, 3] at [0] where batch 0 has float32[8, 4]"),
    (lambda x, y: (x.astype(jnp.float16), y), "float16[8, 4] at [0] where batch 0 has float32"),
    (lambda x, y: (x, y.astype(jnp.int32)), "int32[8] at [1] where batch 0 has float32[8]"),
  ],
  ids=["structure", "shape", "dtype", "integer"],
)
def test_batches_of_another_structure_shape_or_dtype_are_named(second, difference, no_compiling):
  first, other, _ = batches()
  with pytest.raises(ValueError) as error:
    evaluate(batches=[first, second(*other)])
  assert str(error.value).startswith(
    "`evaluate(batches=...)` must hold batches of one structure, shapes and dtypes: batch 1 "
    "differs from batch 0: "
  )
  assert difference in str(error.value)


@pytest.mark.parametrize(
  "bad_batch, message",
  [
    (
      (np.zeros((BATCH, FEATURES)).tolist(), np.zeros(BATCH).tolist()),
      "`evaluate(batches=...)` batch 0 must hold arrays of numbers, but the leaf at [0][0][0] is "
      "a float: 0.0. Pass jnp.asarray(...) of the dtype you mean.",
    ),
    (
      (jax.ShapeDtypeStruct((BATCH, FEATURES), jnp.float32), jnp.zeros(BATCH)),
      "`evaluate(batches=...)` batch 0 must hold arrays of numbers, but the leaf at [0] is a "
      "jax.ShapeDtypeStruct, float32[8, 4]: this call runs the step, so it needs values "
      "(`optaccum.planning.plan` takes shapes).",
    ),
  ],
  ids=["lists", "shapes"],
)
def test_batch_leaves_must_be_arrays(bad_batch, message, no_compiling):
  with pytest.raises(TypeError) as error:
    evaluate(batches=[bad_batch])
  assert str(error.value) == message


@pytest.mark.parametrize(
  "params, message",
  [
    (
      jax.ShapeDtypeStruct((FEATURES,), jnp.float32),
      "`evaluate(params=...)` must hold arrays of numbers, but the leaf at the root is a "
      "jax.ShapeDtypeStruct, float32[4]: this call runs the step, so it needs values "
      "(`optaccum.planning.plan` takes shapes).",
    ),
    (
      [0.0] * FEATURES,
      "`evaluate(params=...)` must hold arrays of numbers, but the leaf at [0] is a float: 0.0. "
      "Pass jnp.asarray(...) of the dtype you mean.",
    ),
    (
      {"w": None, "b": "zero"},
      "`evaluate(params=...)` must hold arrays of numbers, but the leaf at ['b'] is a str: "
      "'zero'. Pass jnp.asarray(...) of the dtype you mean.",
    ),
  ],
  ids=["shapes", "list", "str"],
)
def test_params_must_be_arrays(params, message, no_compiling):
  with pytest.raises(TypeError) as error:
    evaluate(params=params)
  assert str(error.value) == message


def test_params_holding_nan_or_inf_are_refused_with_a_count(no_compiling):
  params = {"b": jnp.zeros(()), "w": jnp.asarray([1.0, np.nan, 2.0, -np.inf])}
  with pytest.raises(ValueError) as error:
    evaluate(params=params)
  assert str(error.value) == (
    "`evaluate(params=...)` must be finite: the leaf at ['w'] holds 2 NaN or inf of 4 values, "
    "and every run would start from them."
  )


@pytest.mark.parametrize(
  "budget, message",
  [
    ("abc", "got budget='abc'."),
    (0, "must be at least 1 byte and finite, got 0."),
    (float("nan"), "must be at least 1 byte and finite, got nan."),
    (True, "got budget=True."),
  ],
)
def test_bad_budgets_are_named(budget, message, no_compiling):
  with pytest.raises((TypeError, ValueError), match=re.escape(message)) as error:
    evaluate(budget=budget)
  assert str(error.value).startswith("`evaluate(budget=...)`")

"""`optaccum.planning.plan` on bad input: each refusal names the call, the argument and the value.

A tiny least-squares step (4 parameters, 8 examples): the checks run before
anything compiles, and the few tests that compile compile one or two programs.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optaccum
from optaccum import _planning

BATCH, FEATURES = 8, 4


def loss(w, x, y):
  return jnp.mean((x @ w - y) ** 2)


def aux_loss(w, x, y):
  return loss(w, x, y), {"mean": jnp.mean(x @ w)}


GRAD_FN = jax.value_and_grad(loss)
OPTIMIZER = optax.sgd(0.1)


def params():
  return jnp.zeros(FEATURES)


def batch(size=BATCH):
  return (jnp.ones((size, FEATURES)), jnp.ones((size,)))


def plan(grad_fn=GRAD_FN, params_=None, optimizer=OPTIMIZER, batch_=None, **kwargs):
  kwargs = {"budget": "1GiB", "candidates": [1], **kwargs}
  params_ = params() if params_ is None else params_
  batch_ = batch() if batch_ is None else batch_
  return optaccum.planning.plan(grad_fn, params_, optimizer, batch_, **kwargs)


@pytest.fixture
def no_compiling(monkeypatch):
  """Fails any test that gets as far as compiling a step: the checks come first."""

  def refuse(*args, **kwargs):
    pytest.fail("a step was compiled before the bad input was refused")

  monkeypatch.setattr(_planning, "compile_step", refuse)


def test_the_tiny_problem_plans_and_counts_its_arguments_in_bytes():
  # The control for the refusals below: the same problem, well formed, plans.
  chosen = plan(candidates=[1, 2], forms=["accumulate"])
  assert [(row.form, row.k) for row in chosen.rows] == [("unsplit", 1), ("accumulate", 2)]
  # The unsplit step's arguments: the parameters, sgd's (empty) state and the batch.
  x, y = np.ones((BATCH, FEATURES), np.float32), np.ones(BATCH, np.float32)
  assert chosen.rows[0].arguments == np.zeros(FEATURES, np.float32).nbytes + x.nbytes + y.nbytes
  assert chosen.accumulate == 1


@pytest.mark.parametrize("abstract", [False, True], ids=["arrays", "shapes"])
def test_a_batch_of_no_rows_is_refused_naming_the_batch(abstract, no_compiling):
  empty = (jnp.zeros((0, FEATURES)), jnp.zeros((0,)))
  if abstract:
    empty = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in empty)
  with pytest.raises(ValueError) as error:
    plan(batch_=empty, candidates=None)
  assert str(error.value) == (
    "`plan(batch=...)` has no examples: its leading batch axis has size 0."
  )


def test_jax_grad_in_place_of_value_and_grad_is_named_before_compiling(no_compiling):
  with pytest.raises(TypeError) as error:
    plan(jax.grad(loss))
  assert str(error.value) == (
    "`plan(grad_fn=...)` must return (loss, grads) like jax.value_and_grad(loss), but on the "
    "first micro-batch it returned float32[4]. jax.grad(loss) returns the gradients alone: "
    "pass jax.value_and_grad(loss)."
  )


def test_jax_grad_of_two_parameters_looks_like_a_pair_and_is_still_refused(no_compiling):
  # jax.grad of a (w, b) tuple returns a pair too: its "loss" is w's gradient.
  def two(params, x, y):
    w, b = params
    return jnp.mean((x @ w + b - y) ** 2)

  with pytest.raises(TypeError, match=re.escape("its loss is float32[4], not a scalar")):
    plan(jax.grad(two), (jnp.zeros(FEATURES), jnp.zeros(())))


@pytest.mark.parametrize(
  "grad_fn, has_aux, problem",
  [
    (GRAD_FN, True, "its first output is float32[], not (loss, aux)."),
    (
      jax.value_and_grad(aux_loss, has_aux=True),
      False,
      "its first output is (float32[], {'mean': float32[]}): pass has_aux=True if it is "
      "(loss, aux).",
    ),
    (
      lambda w, x, y: (x @ w, jnp.zeros(FEATURES)),
      False,
      "its loss is float32[8], not a scalar.",
    ),
    (
      lambda w, x, y: (loss(w, x, y), jnp.zeros(FEATURES - 1)),
      False,
      "its gradients float32[3] do not match params float32[4].",
    ),
    (
      lambda w, x, y: (loss(w, x, y), {"w": w}),
      False,
      "its gradients {'w': float32[4]} do not match params float32[4].",
    ),
    (lambda w, x, y: loss(w, x, y), False, "it returned float32[]."),
  ],
  ids=["aux expected", "aux not declared", "vector loss", "grad shape", "grad tree", "loss only"],
)
def test_a_grad_fn_of_the_wrong_shape_is_named(grad_fn, has_aux, problem, no_compiling):
  expected = "((loss, aux), grads)" if has_aux else "(loss, grads)"
  with pytest.raises(TypeError) as error:
    plan(grad_fn, has_aux=has_aux)
  message = str(error.value)
  assert message.startswith(f"`plan(grad_fn=...)` must return {expected} like jax.value_and_grad(")
  assert problem in message


def test_the_grad_fn_check_sees_the_first_micro_batch():
  # A grad_fn that refuses micro-batches is checked on the smallest k's micro-batch.
  seen = []

  def recording(w, x, y):
    seen.append(x.shape)
    return GRAD_FN(w, x, y)

  plan(recording, candidates=[2, 4], forms=["accumulate"])
  assert seen[0] == (BATCH // 2, FEATURES)


@pytest.mark.parametrize(
  "bad_params, leaf, shown",
  [
    (1.0, "the root", "a float: 1.0"),
    ({"w": [0.0, 0.0]}, "['w'][0]", "a float: 0.0"),
    ({"w": "zeros"}, "['w']", "a str: 'zeros'"),
    ({"w": np.array(["a", "b"])}, "['w']", "a numpy.ndarray of dtype <U1."),
  ],
)
def test_params_leaves_must_be_arrays_or_shapes(bad_params, leaf, shown, no_compiling):
  with pytest.raises(TypeError) as error:
    plan(params_=bad_params)
  assert str(error.value).startswith(
    "`plan(params=...)` must hold arrays or jax.ShapeDtypeStruct of numbers, but the leaf at "
    f"{leaf} is {shown}"
  )


def test_params_holding_nan_plan_like_any_others_since_nothing_runs():
  # plan reads shapes only: the values, NaN included, cannot change a compiled step.
  with_nan = plan(params_=jnp.full(FEATURES, jnp.nan))
  finite = plan(params_=jax.ShapeDtypeStruct((FEATURES,), jnp.float32))
  assert with_nan.rows == finite.rows


@pytest.mark.parametrize(
  "bad_batch, error, message",
  [
    (
      [jnp.ones((BATCH, FEATURES))],
      TypeError,
      "`plan(batch=...)` must be a tuple of the arguments after the parameters, holding arrays "
      "(or jax.ShapeDtypeStruct) with a leading batch axis, got a list.",
    ),
    (
      jnp.ones((BATCH, FEATURES)),
      TypeError,
      "`plan(batch=...)` must be a tuple of the arguments after the parameters, holding arrays "
      "(or jax.ShapeDtypeStruct) with a leading batch axis, got a jax.Array of shape (8, 4).",
    ),
    (
      (),
      TypeError,
      "`plan(batch=...)` must be a tuple of the arguments after the parameters, holding arrays "
      "(or jax.ShapeDtypeStruct) with a leading batch axis, got a tuple with no arrays: ().",
    ),
    (
      (jnp.ones((BATCH, FEATURES)), [1.0] * BATCH),
      TypeError,
      "`plan(batch=...)` must hold arrays or jax.ShapeDtypeStruct of numbers, but the leaf at "
      "[1][0] is a float: 1.0. Pass jnp.asarray(...) of the dtype you mean.",
    ),
    (
      (jnp.ones((BATCH, FEATURES)), "labels"),
      TypeError,
      "`plan(batch=...)` must hold arrays or jax.ShapeDtypeStruct of numbers, but the leaf at "
      "[1] is a str: 'labels'. Pass jnp.asarray(...) of the dtype you mean.",
    ),
    (
      (jnp.ones((BATCH, FEATURES)), jnp.ones(())),
      ValueError,
      "`plan(batch=...)` leaves need a leading batch axis, but the leaf at [1] is a scalar "
      "(float32[]).",
    ),
    (
      # Sorted as numbers: 64 before 128 (as strings, "128" < "64").
      (jnp.ones((128, FEATURES)), jnp.ones((64,))),
      ValueError,
      "`plan(batch=...)` leaves must share one leading batch axis, got leading sizes 64, 128.",
    ),
  ],
  ids=["list", "bare array", "empty tuple", "list leaf", "str leaf", "scalar leaf", "sizes"],
)
def test_a_bad_batch_is_named(bad_batch, error, message, no_compiling):
  with pytest.raises(error) as raised:
    plan(batch_=bad_batch)
  assert str(raised.value) == message


@pytest.mark.parametrize(
  "budget, error, message",
  [
    (float("nan"), ValueError, "must be at least 1 byte and finite, got nan."),
    (float("inf"), ValueError, "must be at least 1 byte and finite, got inf."),
    (0.5, ValueError, "must be at least 1 byte and finite, got 0.5."),
    (-1, ValueError, "must be at least 1 byte and finite, got -1."),
    ("0KiB", ValueError, "must be at least 1 byte and finite, got '0KiB'."),
    ("-5MiB", ValueError, "got budget='-5MiB'."),
    ("1e400", ValueError, "got budget='1e400'."),
    ("5 XB", ValueError, "got budget='5 XB'."),
    ("", ValueError, "got budget=''."),
    (None, ValueError, "is required here: the cpu device"),
    (True, TypeError, "must be a number of bytes or a size such as '300KiB', got budget=True."),
    ([1024], TypeError, "got budget=[1024]."),
  ],
)
def test_a_bad_budget_is_named(budget, error, message, no_compiling):
  with pytest.raises(error) as raised:
    plan(budget=budget)
  assert str(raised.value).startswith("`plan(budget=...)`") and message in str(raised.value)


def test_a_huge_finite_budget_is_taken_as_given_and_everything_fits():
  chosen = plan(budget=1e30)
  assert chosen.budget == int(np.float64(1e30)) and chosen.microbatch == chosen.accumulate == 1


@pytest.mark.parametrize(
  "candidates, error, message",
  [
    ([], TypeError, "must be a non-empty sequence of positive ints, got candidates=[]."),
    (2, TypeError, "must be a non-empty sequence of positive ints, got candidates=2."),
    ("24", TypeError, "must be a non-empty sequence of positive ints, got candidates='24'."),
    ([0], ValueError, "must be a positive int, got candidates=0."),
    ([-2], ValueError, "must be a positive int, got candidates=-2."),
    ([True], ValueError, "must be a positive int, got candidates=True."),
    ([2.0], ValueError, "must be a positive int, got candidates=2.0."),
    ([3], ValueError, "must divide the batch of 8, got 3."),
    ([16], ValueError, "must divide the batch of 8, got 16."),
  ],
)
def test_bad_candidates_are_named(candidates, error, message, no_compiling):
  with pytest.raises(error, match=re.escape(f"`plan(candidates=...)` {message}")):
    plan(candidates=candidates)


@pytest.mark.parametrize("forms", ["microbatch", [], ["scan"], [None]])
def test_bad_forms_are_named(forms, no_compiling):
  with pytest.raises(ValueError, match=re.escape(f"got forms={forms!r}.")):
    plan(forms=forms)


@pytest.mark.parametrize(
  "arguments, message",
  [
    ({"grad_fn": 3}, "`plan(grad_fn=...)` must be callable, got grad_fn=3."),
    (
      {"optimizer": 3},
      "`plan(optimizer=...)` must be an optax.GradientTransformation, got optimizer=3.",
    ),
    (
      {"optimizer": optax.sgd},
      "`plan(optimizer=...)` must be an optax.GradientTransformation, got optimizer=<function",
    ),
    ({"has_aux": "yes"}, "`plan(has_aux=...)` must be a bool, got has_aux='yes'."),
    ({"has_aux": None}, "`plan(has_aux=...)` must be a bool, got has_aux=None."),
  ],
)
def test_bad_grad_fn_optimizer_and_has_aux_are_named(arguments, message, no_compiling):
  with pytest.raises(TypeError, match=re.escape(message)):
    plan(**arguments)


@pytest.mark.parametrize(
  "axis_name, error, message",
  [
    (3, TypeError, "must be a mesh axis name or a non-empty sequence of distinct names"),
    ((), TypeError, "must be a mesh axis name or a non-empty sequence of distinct names"),
    ("data", ValueError, "needs the mesh in context"),
  ],
)
def test_a_bad_axis_name_or_no_mesh_is_named(axis_name, error, message, no_compiling):
  with pytest.raises(error, match=re.escape("`plan(axis_name=") + ".*" + re.escape(message)):
    plan(axis_name=axis_name)


def test_an_axis_the_mesh_lacks_and_a_micro_batch_the_replicas_cannot_share_are_named(
  no_compiling,
):
  mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
  with jax.set_mesh(mesh), pytest.raises(ValueError, match=r"names axes \['model'\] that the"):
    plan(axis_name="model")
  with pytest.raises(ValueError, match="leaves micro-batches of 3 examples, which do not divide"):
    _planning._candidates(6, [2], replicas=2)
  with pytest.raises(ValueError, match=re.escape("`plan(batch=...)` of 3 examples does not")):
    _planning._candidates(3, None, replicas=2)
  assert _planning._candidates(8, None, replicas=2) == [1, 2, 4]


def test_axis_name_plans_each_form_as_it_is_and_deferred():
  mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
  with jax.set_mesh(mesh):
    chosen = plan(candidates=[1, 2], axis_name="data")
  assert [(row.form, row.k) for row in chosen.rows] == [
    ("unsplit", 1),
    ("microbatch", 2),
    ("microbatch(axis_name)", 2),
    ("accumulate", 2),
    ("accumulate(axis_name)", 2),
  ]
  # One replica: the deferred accumulator is one replica's sum, as large as the other.
  rows = {row.form: row for row in chosen.rows}
  assert rows["accumulate(axis_name)"].arguments == rows["accumulate"].arguments
  assert (chosen.microbatch_deferred, chosen.accumulate_deferred) == (1, 1)
  assert "| accumulate(axis_name) | 2 | 4 |" in chosen.table()

"""The core forms on bad input: each bad argument named at the call that received it.

`accumulate(...).init` and `.update`, `apply_gradients`, the skip policies,
`scale_learning_rate`, the `k` schedule and `plan`/`evaluate`'s arguments.
Valid input next to each refusal is checked against NumPy.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optaccum
from optaccum import _validation

PARAMS = {"w": jnp.array([1.0, -2.0, 4.0])}
GRADS = [{"w": jnp.array([0.5, 1.0, -3.0])}, {"w": jnp.array([1.5, -1.0, 1.0])}]


def sgd_with_decay():
  """sgd(1) after a weight decay of 0.5: its updates, -(g + 0.5 p), read the parameters."""
  return optax.chain(optax.add_decayed_weights(0.5), optax.sgd(1.0))


def expected_window(grads, params):
  """NumPy: the decayed SGD update of the window's mean gradient."""
  mean = np.mean([np.asarray(g["w"], np.float64) for g in grads], axis=0)
  return -(mean + 0.5 * np.asarray(params["w"], np.float64))


# --- apply_gradients and update: params checked against the accumulator ---------------


def test_apply_gradients_without_params_is_refused_by_name():
  # Before: AttributeError "'dict' object has no attribute 'dtype'" from inside the step.
  tx = optaccum.accumulate(optax.sgd(0.1), 2)
  message = (
    "`apply_gradients(params=...)` is required: the fast path writes the window's updates "
    "into the parameters, got params=None. Pass the parameters opt_state was built for."
  )
  with pytest.raises(TypeError, match=re.escape(message)):
    optaccum.apply_gradients(tx, GRADS[0], tx.init(PARAMS), None)


@pytest.mark.parametrize("form", ["update", "apply_gradients", "MultiSteps"])
def test_params_of_another_structure_are_named_not_the_inner_state(form):
  # Before: "`accumulate(...).update(state=...)` holds an inner_opt_state that is
  # not the state of this accumulation's inner optimizer" for adamw.
  tx = optaccum.accumulate(optax.adamw(0.1), 1)
  if form == "MultiSteps":
    tx = optaccum.compat.MultiSteps(optax.adamw(0.1), 1)
  state, other = tx.init(PARAMS), {"v": jnp.ones(3)}
  where = {"update": "accumulate(...).update", "MultiSteps": "MultiSteps.update"}.get(
    form, "apply_gradients"
  )
  message = (
    f"`{where}(params=...)` has a tree structure that does not match the accumulator in "
    "opt_state.\n  params: PyTreeDef({'v': *})\n  the accumulator in opt_state: PyTreeDef({'w': *})"
  )
  with pytest.raises(ValueError, match=re.escape(message)):
    if form != "apply_gradients":
      tx.update(GRADS[0], state, other)
    else:
      optaccum.apply_gradients(tx, GRADS[0], state, other)


@pytest.mark.parametrize("form", ["update", "apply_gradients", "MultiSteps"])
def test_params_of_another_shape_are_named_with_both_shapes(form):
  # Before: the fast path failed in XLA's add ("incompatible shapes for broadcasting").
  tx = optaccum.accumulate(sgd_with_decay(), 2)
  if form == "MultiSteps":
    tx = optaccum.compat.MultiSteps(sgd_with_decay(), 2)
  state, other = tx.init(PARAMS), {"w": jnp.ones(4)}
  where = {"update": "accumulate(...).update", "MultiSteps": "MultiSteps.update"}.get(
    form, "apply_gradients"
  )
  message = (
    f"`{where}(params=...)` does not match the accumulator in opt_state at ['w']: params has "
    "shape (4,), the accumulator (3,)."
  )
  with pytest.raises(ValueError, match=re.escape(message)):
    if form != "apply_gradients":
      tx.update(GRADS[0], state, other)
    else:
      optaccum.apply_gradients(tx, GRADS[0], state, other)


def test_matching_params_still_reach_the_inner_optimizer_under_jit():
  # The check runs at trace time; the window reads the parameters as before.
  tx = optaccum.accumulate(sgd_with_decay(), 2)
  params = dict(PARAMS, step=jnp.array(3))  # an int leaf: no accumulator, None there
  state, update = tx.init(params), jax.jit(tx.update)
  for g in GRADS:
    updates, state = update(dict(g, step=None), state, params)
  np.testing.assert_allclose(updates["w"], expected_window(GRADS, PARAMS), rtol=1e-6)
  applied, _ = optaccum.apply_gradients(tx, dict(GRADS[1], step=None), state, params)
  assert int(applied["step"]) == 3


def test_params_under_mesh_axes_are_compared_past_the_replica_axis():
  mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
  tx = optaccum.accumulate(sgd_with_decay(), 2, axis_name=("data",))
  with jax.set_mesh(mesh):
    state = tx.init(PARAMS)
    per_replica = [jax.tree.map(lambda x: x[None], g) for g in GRADS]
    for g in per_replica:
      updates, state = tx.update(g, state, PARAMS)
    np.testing.assert_allclose(updates["w"], expected_window(GRADS, PARAMS), rtol=1e-6)
    message = (
      "`accumulate(...).update(params=...)` does not match the accumulator in opt_state at "
      "['w']: params has shape (1, 3), the accumulator (1, 3) (a leading axis of replicas, "
      "then the parameter's shape)."
    )
    with pytest.raises(ValueError, match=re.escape(message)):
      tx.update(per_replica[0], state, {"w": jnp.ones((1, 3))})


# --- init ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "params, message",
  [
    ("abc", "must be a pytree of arrays, got a str: 'abc'."),
    ({"w": 1.0}, "must hold arrays, but the leaf at ['w'] is a float: 1.0."),
  ],
  ids=["str", "python-float"],
)
def test_init_refuses_params_that_are_not_arrays(params, message):
  # Before: "data type 'abc' not understood" (a str was read as a dtype name).
  tx = optaccum.accumulate(optax.sgd(0.1), 2)
  with pytest.raises(TypeError, match=re.escape(f"`accumulate(...).init(params=...)` {message}")):
    tx.init(params)


# --- skip policies -------------------------------------------------------------------------


@pytest.mark.parametrize("threshold", [float("nan"), float("inf"), -1.0, 0.0, True, "a"], ids=repr)
def test_large_updates_refuses_a_threshold_that_is_not_finite_and_positive(threshold):
  # Before: NaN and -1 skipped every micro-batch, True was read as 1.0, "a" failed in float().
  message = (
    "`skip.large_updates(max_squared_norm=...)` must be a finite positive number, "
    f"got max_squared_norm={threshold!r}."
  )
  with pytest.raises(ValueError, match=re.escape(message)):
    optaccum.skip.large_updates(GRADS[0], 0, None, threshold)


@pytest.mark.parametrize(
  "threshold", [jnp.float32(10.25), np.float64(10.25), 10], ids=["jax", "numpy", "int"]
)
def test_large_updates_takes_real_scalars_and_compares_the_squared_norm(threshold):
  squared_norm = float(np.sum(np.square(np.asarray(GRADS[0]["w"], np.float64))))  # 10.25
  skip, info = optaccum.skip.large_updates(GRADS[0], 0, None, threshold)
  assert bool(skip) == (not squared_norm < float(threshold))
  np.testing.assert_allclose(info["norm_squared"], squared_norm, rtol=1e-6)
  traced = jax.jit(lambda t: optaccum.skip.large_updates(GRADS[0], 0, None, t)[0])
  assert bool(traced(10.5)) is False and bool(traced(10.0)) is True


def test_not_finite_refuses_a_python_number_leaf_by_name():
  # Before: AttributeError "'float' object has no attribute 'size'".
  message = (
    "`skip.not_finite(updates=...)` must hold arrays, but the leaf at ['w'] is a float: 1.0. "
    "Pass jnp.asarray(...) of the dtype you mean."
  )
  with pytest.raises(TypeError, match=re.escape(message)):
    optaccum.skip.not_finite({"w": 1.0}, 0)


@pytest.mark.parametrize(
  "make, where",
  [
    (lambda policy: optaccum.accumulate(optax.sgd(0.1), 2, skip=policy), "accumulate(skip="),
    (
      lambda policy: optaccum.compat.MultiSteps(optax.sgd(0.1), 2, should_skip_update_fn=policy),
      "MultiSteps(should_skip_update_fn=",
    ),
  ],
  ids=["accumulate", "multisteps"],
)
def test_a_skip_policy_that_breaks_its_contract_is_named(make, where):
  # Before: "cannot unpack non-iterable int object".
  tx = make(lambda updates, step, params: 3)
  message = (
    f"`{where}...)`: the skip policy must return a pair (should_skip, skip_state), "
    "should_skip a scalar bool and skip_state any pytree, but it returned an int: 3."
  )
  with pytest.raises(TypeError, match=re.escape(message)):
    tx.init(PARAMS)
  tx = make(lambda updates, step, params: ("yes", ()))
  message = (
    f"`{where}...)`: the skip policy must return a scalar bool as its first output "
    "(should_skip, skip_state), got a str: 'yes'."
  )
  with pytest.raises(ValueError, match=re.escape(message)):
    tx.init(PARAMS)


# --- scale_learning_rate and k schedules ---------------------------------------------------


@pytest.mark.parametrize(
  "rate, expected",
  [
    (jnp.float32(0.1), np.float32(0.1) * np.float32(4)),
    (np.asarray(0.1), 0.4),
    (jnp.array(3, jnp.int32), 12.0),
  ],
  ids=["jax-float32", "numpy-0d", "jax-int"],
)
def test_scale_learning_rate_takes_concrete_scalar_arrays(rate, expected):
  # Before: "must be a positive number, got learning_rate=Array(0.1, dtype=float32)".
  scaled = optaccum.planning.scale_learning_rate(rate, 4)
  assert scaled == expected
  assert np.asarray(scaled).dtype == np.asarray(rate).dtype


@pytest.mark.parametrize(
  "rate, message",
  [
    (jnp.array([0.1]), "must be a positive number, got learning_rate=Array([0.1], dtype=float32)."),
    (jnp.bool_(True), "must be a positive number, got learning_rate=Array(True, dtype=bool)."),
    (jnp.float32(np.inf), "must be finite, got learning_rate=Array(inf, dtype=float32)."),
  ],
  ids=["vector", "bool", "inf"],
)
def test_scale_learning_rate_still_refuses_bad_arrays(rate, message):
  with pytest.raises(
    ValueError, match=re.escape(f"`scale_learning_rate(learning_rate=...)` {message}")
  ):
    optaccum.planning.scale_learning_rate(rate, 4)


def test_scale_learning_rate_refuses_a_traced_rate():
  message = "`scale_learning_rate(learning_rate=...)` must be a positive number, got learning_rate="
  with pytest.raises(ValueError, match=re.escape(message)):
    jax.jit(lambda rate: optaccum.planning.scale_learning_rate(rate, 4))(0.1)


def _calls_with_k(k):
  """The calls that read a `k` schedule, by the name their messages give."""
  state = optaccum.accumulate(optax.sgd(0.1), 2).init(PARAMS)
  return [
    ("accumulate", lambda: optaccum.accumulate(optax.sgd(0.1), k)),
    ("scale_learning_rate", lambda: optaccum.planning.scale_learning_rate(0.1, k)),
    ("checkpoint.metadata", lambda: optaccum.checkpoint.metadata(state, k=k)),
  ]


@pytest.mark.parametrize(
  "value, message",
  [
    (None, "must return a real scalar, but at gradient step 0 it returned None."),
    ("4", "must return a real scalar, but at gradient step 0 it returned '4'."),
    (
      2**31,
      "must return at most 2**31 - 1 micro-steps (the largest int32 counter), but at "
      "gradient step 0 it returned 2147483648.",
    ),
    (
      2.0**40,
      "must return at most 2**31 - 1 micro-steps (the largest int32 counter), but at "
      "gradient step 0 it returned 1099511627776.0.",
    ),
  ],
  ids=["none", "str", "int-2**31", "float-2**40"],
)
def test_a_k_schedule_bad_at_step_0_is_named_by_every_call_that_reads_it(value, message):
  # Before: "float() argument must be ... not 'NoneType'", and for 2**31 an
  # OverflowError in the first update.
  for where, call in _calls_with_k(lambda step: value):
    with pytest.raises(ValueError, match=re.escape(f"`{where}(k=...)` {message}")):
      call()


def test_a_k_schedule_at_the_int32_limit_is_accepted():
  largest = 2**31 - 1
  tx, scaled, record = (call() for _, call in _calls_with_k(lambda step: largest))
  params = {"w": jnp.zeros(2)}
  _, state = tx.update({"w": jnp.ones(2)}, tx.init(params), params)
  assert int(optaccum.status(state).mini_step) == 1
  assert float(scaled(0)) == np.float32(0.1) * np.float32(largest)
  assert record["optaccum"]["k"] == largest


@pytest.mark.parametrize(
  "value, window, clamped",
  [(2**40, 2**31 - 1, False), (-(2**40), 1, True), (np.int64(2**40), 2**31 - 1, False)],
  ids=["above", "below", "numpy-above"],
)
def test_a_python_int_beyond_int32_is_kept_in_range_not_overflowed(value, window, clamped):
  # A schedule read at a later step than 0 (`window_length` is every form's reader):
  # above int32 it is kept at the largest int32 window; below 1 clamped and counted.
  length = _validation.window_length(lambda step: value, where="accumulate")
  got_window, got_clamped = jax.jit(length)(jnp.int32(5))
  assert (int(got_window), bool(got_clamped)) == (window, clamped)


def test_a_k_schedule_that_turns_non_numeric_is_named_while_traced():
  length = _validation.window_length(lambda step: None, where="accumulate")
  message = "`accumulate(k=...)` must return a real scalar, got None."
  with pytest.raises(ValueError, match=re.escape(message)):
    jax.jit(length)(jnp.int32(5))


# --- plan and evaluate ---------------------------------------------------------------------

X = jnp.asarray(np.random.default_rng(0).normal(size=(8, 4)), jnp.float32)
BATCH = (X, X.sum(axis=1))


def _loss(w, x, y):
  return jnp.mean((x @ w - y) ** 2)


@pytest.mark.parametrize("where", ["plan", "evaluate"])
def test_a_python_number_loss_is_refused_alike_by_plan_and_evaluate(where):
  # Before: plan failed with "'float' object has no attribute 'astype'"; evaluate accepted it.
  grad_fn = lambda w, x, y: (0.0, jax.grad(_loss)(w, x, y))  # noqa: E731
  message = (
    f"`{where}(grad_fn=...)` must return (loss, grads) like jax.value_and_grad(loss), but on "
    "the first micro-batch its loss is a float (0.0), not an array computed from the batch: "
    "return the loss as JAX computes it."
  )
  with pytest.raises(TypeError, match=re.escape(message)):
    if where == "plan":
      optaccum.planning.plan(grad_fn, jnp.zeros(4), optax.sgd(0.1), BATCH, budget="1MiB")
    else:
      optaccum.planning.evaluate(
        grad_fn, jnp.zeros(4), optax.sgd(0.1), [BATCH], [2], rounds=1, progress=False
      )


@pytest.mark.parametrize("where", ["plan", "evaluate"])
def test_integer_params_are_named_before_grad_fn_is_traced(where):
  # Before: JAX's "grad requires real- or complex-valued inputs" from inside the trace.
  params = {"w": jnp.zeros(4, jnp.int32)}
  grad_fn = jax.value_and_grad(lambda p, x, y: _loss(p["w"], x, y))
  message = (
    f"`{where}(params=...)` must hold floating-point (or complex) arrays, which grad_fn "
    "differentiates, but the leaf at ['w'] is int32[4]."
  )
  with pytest.raises(TypeError, match=re.escape(message)):
    if where == "plan":
      optaccum.planning.plan(grad_fn, params, optax.sgd(0.1), BATCH, budget="1MiB")
    else:
      optaccum.planning.evaluate(
        grad_fn, params, optax.sgd(0.1), [BATCH], [2], rounds=1, progress=False
      )


def test_stochastic_bfloat16_refuses_a_seed_beyond_64_bits():
  with pytest.raises(
    ValueError,
    match=re.escape("`stochastic_bfloat16(key=...)` must be an int seed from -2**63 to 2**63 - 1"),
  ):
    optaccum.stochastic_bfloat16(2**70)

"""`optaccum.flush` on adversarial input: every bad argument named at the call.

Valid input is checked against NumPy: flush emits the mean of the partial
window's gradients through the inner optimizer (`sgd(lr)`: `-lr * mean`),
and a window that just closed has nothing left to emit.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optaccum

LR = 0.5
K = 4


def gradients(count, size=3, seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  return [{"w": jnp.asarray(rng.normal(size=size), dtype)} for _ in range(count)]


def after(tx, grads, params):
  state = tx.init(params)
  for g in grads:
    _, state = tx.update(g, state, params)
  return state


def numpy_mean(grads):
  return np.mean([np.asarray(g["w"], np.float64) for g in grads], axis=0)


PARAMS = {"w": jnp.zeros(3)}


def partial_state():
  tx = optaccum.accumulate(optax.sgd(LR), k=K)
  return tx, after(tx, gradients(2), PARAMS)


# --- Valid input: the partial window's mean through the inner optimizer ------------------


def test_a_mid_window_flush_emits_minus_lr_times_the_mean_and_closes_the_window():
  tx = optaccum.accumulate(optax.sgd(LR, momentum=0.9), k=K)
  grads = gradients(3)
  updates, state = optaccum.flush(tx, after(tx, grads, PARAMS), PARAMS)
  # Momentum's first step is the gradient itself.
  np.testing.assert_allclose(updates["w"], -LR * numpy_mean(grads), rtol=1e-6)
  info = optaccum.status(state)
  assert (int(info.mini_step), int(info.gradient_step), bool(info.has_updated)) == (0, 1, True)
  np.testing.assert_allclose(state.inner_opt_state[0].trace["w"], numpy_mean(grads), rtol=1e-6)


def test_a_flush_right_after_a_window_closed_emits_zeros_and_leaves_the_inner_state():
  tx = optaccum.accumulate(optax.sgd(LR, momentum=0.9), k=K)
  grads = gradients(K)
  state = after(tx, grads, PARAMS)
  assert bool(optaccum.status(state).has_updated)  # the window of K just closed
  updates, flushed = optaccum.flush(tx, state, PARAMS)
  np.testing.assert_array_equal(updates["w"], np.zeros(3))
  info = optaccum.status(flushed)
  assert (int(info.mini_step), int(info.gradient_step), bool(info.has_updated)) == (0, 1, False)
  np.testing.assert_allclose(flushed.inner_opt_state[0].trace["w"], numpy_mean(grads), rtol=1e-6)


def test_a_flush_inside_jit_equals_the_numpy_weighted_mean():
  tx = optaccum.accumulate(optax.sgd(LR), k=K)
  grads = gradients(3, seed=1)
  weights = [2.0, float("nan"), 3.0]  # the NaN skips its micro-batch
  state = tx.init(PARAMS)
  for g, w in zip(grads, weights):
    _, state = tx.update(g, state, PARAMS, weight=jnp.float32(w))
  updates, state = jax.jit(lambda s, p: optaccum.flush(tx, s, p))(state, PARAMS)
  kept = [np.asarray(grads[i]["w"], np.float64) for i in (0, 2)]
  expected = -LR * (2.0 * kept[0] + 3.0 * kept[1]) / 5.0
  np.testing.assert_allclose(updates["w"], expected, rtol=1e-6)
  assert int(optaccum.status(state).num_skipped) == 1


def test_bfloat16_params_of_100k_entries_flush_the_float32_window_mean():
  # bfloat16 params get a float32 accumulator: the sum of bfloat16 gradients is
  # exact in float32, so the update is the mean rounded once to bfloat16 (unit
  # roundoff 2**-8; sgd(0.5) is exact). A bfloat16 accumulator (measured: 1.0)
  # or a second rounding would exceed that.
  size = 100_000
  params = {"w": jnp.zeros(size, jnp.bfloat16), "b": jnp.zeros(2, jnp.float32)}
  tx = optaccum.accumulate(optax.sgd(LR), k=8)
  rng = np.random.default_rng(2)
  grads = [
    {"w": jnp.asarray(rng.normal(size=size), jnp.bfloat16), "b": jnp.ones(2, jnp.float32)}
    for _ in range(3)
  ]
  state = after(tx, grads, params)
  assert state.acc_grads["w"].dtype == jnp.float32
  updates, _ = jax.jit(lambda s, p: optaccum.flush(tx, s, p))(state, params)
  assert updates["w"].dtype == jnp.bfloat16 and updates["b"].dtype == jnp.float32
  expected = -LR * numpy_mean(grads)
  np.testing.assert_allclose(np.asarray(updates["w"], np.float64), expected, rtol=1.01 * 2.0**-8)
  np.testing.assert_allclose(updates["b"], np.full(2, -LR), rtol=1e-7)


# --- opt_state and tx that are not accumulate's -------------------------------------------


@pytest.mark.parametrize(
  "make_state, kind, found",
  [
    (lambda: optax.adam(1.0).init(PARAMS), "tuple", 0),
    (lambda: optaccum.compat.MultiSteps(optax.sgd(LR), K).init(PARAMS), "MultiStepsState", 0),
    (lambda: optax.MultiSteps(optax.sgd(LR), K).init(PARAMS), "MultiStepsState", 0),
    (lambda: None, "NoneType", 0),
    (lambda: (partial_state()[1], partial_state()[1]), "tuple", 2),
  ],
  ids=["adam", "compat-multisteps", "optax-multisteps", "none", "two-accumulations"],
)
def test_a_state_without_exactly_one_accumulation_is_refused(make_state, kind, found):
  tx, _ = partial_state()
  message = (
    r"`flush\(opt_state=...\)` must hold exactly one optaccum AccumulateState "
    rf"\(from `optaccum.accumulate`\), found {found} in a state of type {kind}\. "
    r"With no window to close, `tx.update` would take a plain optimizer step\."
  )
  with pytest.raises(ValueError, match=message):
    optaccum.flush(tx, make_state(), PARAMS)


@pytest.mark.parametrize("tx", [None, lambda g, s, p: (g, s)], ids=["none", "function"])
def test_a_tx_that_is_not_a_transformation_is_refused(tx):
  _, state = partial_state()
  message = (
    r"`flush\(tx=...\)` must be the optax GradientTransformation whose state is opt_state "
    r"\(`optaccum.accumulate\(...\)` or a chain holding it\), got tx="
  )
  with pytest.raises(TypeError, match=message):
    optaccum.flush(tx, state, PARAMS)


@pytest.mark.parametrize(
  "tx",
  [optax.sgd(LR), optax.adam(LR), optaccum.accumulate(optax.adam(LR), k=K)],
  ids=["sgd", "adam", "accumulate-adam"],
)
def test_a_tx_that_did_not_build_the_state_is_refused(tx):
  # sgd and adam raised optax's "number of updates and states" error; an
  # accumulate of adam named `accumulate(...).update(state=...)`, not flush.
  _, state = partial_state()
  message = (
    r"`flush\(tx=...\)` is not the transformation whose state is opt_state: "
    r"tx.init\(params\) builds\n"
  )
  with pytest.raises(ValueError, match=message):
    optaccum.flush(tx, state, PARAMS)


# --- params unlike the accumulator --------------------------------------------------------


@pytest.mark.parametrize(
  "params, message",
  [
    ({"v": jnp.zeros(3)}, r"has a tree structure that does not match the accumulator"),
    ({"w": [0.0, 0.0, 0.0]}, r"has a tree structure that does not match the accumulator"),
    (None, r"has a tree structure that does not match the accumulator"),
    (
      {"w": jnp.zeros((1, 3))},
      r"does not match the accumulator in opt_state at \['w'\]: params has shape \(1, 3\), "
      r"the accumulator \(3,\)\.",
    ),
  ],
  ids=["other-key", "list-leaf", "none", "extra-axis"],
)
def test_params_of_another_structure_or_shape_are_refused(params, message):
  tx, state = partial_state()
  with pytest.raises(ValueError, match=r"`flush\(params=...\)` " + message):
    optaccum.flush(tx, state, params)


def test_scalar_params_are_refused_against_a_vector_accumulator():
  # A () param passed as the replica-axis case `acc.shape[1:]`, and the inner
  # optimizer then saw params of the wrong shape (weight decay broadcast them).
  tx = optaccum.accumulate(optax.chain(optax.add_decayed_weights(0.5), optax.sgd(LR)), k=K)
  state = after(tx, gradients(1), PARAMS)
  message = (
    r"`flush\(params=...\)` does not match the accumulator in opt_state at \['w'\]: "
    r"params has shape \(\), the accumulator \(3,\)\."
  )
  with pytest.raises(ValueError, match=message):
    optaccum.flush(tx, state, {"w": jnp.full((), 7.0)})


@pytest.mark.parametrize(
  "leaf, message",
  [
    (jnp.zeros(3, jnp.int32), r"has dtype int32 at \['w'\], where the accumulator in opt_state "),
    (jnp.zeros(3, jnp.complex64), r"has dtype complex64 at \['w'\], where the accumulator in "),
    (0.0, r"must hold arrays, but the leaf at \['w'\] is a float: 0.0\."),
    ("abc", r"must hold arrays, but the leaf at \['w'\] is a str: 'abc'\."),
  ],
  ids=["int", "complex", "python-float", "str"],
)
def test_params_that_are_not_floating_arrays_are_refused_by_flush(leaf, message):
  # Before: the int and complex ones were named as `accumulate(...).update(updates=...)`,
  # a Python float passed, and a str failed inside NumPy.
  tx, state = partial_state()
  with pytest.raises(TypeError, match=r"`flush\(params=...\)` " + message):
    optaccum.flush(tx, state, {"w": leaf})


@pytest.mark.parametrize("name", ["weight", "flush"])
def test_extra_args_that_flush_passes_itself_are_refused(name):
  tx, state = partial_state()
  message = re.escape(
    f"`flush(**extra_args)` may not hold {name}: flush passes weight=0 and flush=True to "
    "tx.update itself."
  )
  with pytest.raises(TypeError, match=message):
    optaccum.flush(tx, state, PARAMS, **{name: jnp.float32(1.0)})

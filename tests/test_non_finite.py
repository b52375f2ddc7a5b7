"""No NaN or inf reaches the parameters: the window guard, skip policies, bad weights.

Every case plants one lone bad value (NaN, +inf or -inf, never two kinds at once)
in a leaf of 300 000 entries, where XLA:CPU's max reduction once hid a NaN, and
checks both forms: the transformation and the fast path `apply_gradients`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optaccum

SIZE = 300_000
BAD_VALUES = [np.nan, np.inf, -np.inf]


def _params() -> dict[str, jax.Array]:
  return {"w": jnp.zeros((300, 1000), jnp.float32), "b": jnp.zeros(7, jnp.float32)}


def _grads(value: float = 1.0, bad: float | None = None, at: int = SIZE // 2) -> dict:
  w = np.full((300, 1000), value, np.float32)
  if bad is not None:
    w.reshape(-1)[at] = bad
  return {"w": jnp.asarray(w), "b": jnp.full(7, value, jnp.float32)}


def _stepper(tx, form: str):
  """A jitted `(grads, state, params, weight) -> (params, state)` for either form."""

  def transformation(grads, state, params, weight):
    updates, state = tx.update(grads, state, params, weight=weight)
    return optax.apply_updates(params, updates), state

  def fast_path(grads, state, params, weight):
    return optaccum.apply_gradients(tx, grads, state, params, weight=weight)

  return jax.jit(transformation if form == "transformation" else fast_path)


FORMS = ["transformation", "fast_path"]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("bad", BAD_VALUES)
@pytest.mark.parametrize("at", [0, SIZE // 2, SIZE - 1])
def test_default_guard_drops_window_with_one_lone_bad_entry(form, bad, at):
  tx = optaccum.accumulate(optax.sgd(1.0), k=2)
  step = _stepper(tx, form)
  params, state = _params(), tx.init(_params())
  one = jnp.ones((), jnp.float32)
  params, state = step(_grads(bad=bad, at=at), state, params, one)
  params, state = step(_grads(), state, params, one)
  # The bad window ran no step and was counted; nothing else moved.
  for leaf in jax.tree.leaves(params):
    np.testing.assert_array_equal(np.asarray(leaf), 0.0)
  assert int(optaccum.status(state).num_skipped_windows) == 1
  assert int(optaccum.status(state).gradient_step) == 0
  assert not bool(optaccum.status(state).has_updated)
  # The next window starts clean and equals sgd on its mean gradient.
  params, state = step(_grads(1.0), state, params, one)
  params, state = step(_grads(3.0), state, params, one)
  for leaf in jax.tree.leaves(params):
    np.testing.assert_array_equal(np.asarray(leaf), -2.0)
  assert int(optaccum.status(state).gradient_step) == 1


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("bad", BAD_VALUES)
def test_skip_not_finite_drops_only_the_bad_micro_batch(form, bad):
  tx = optaccum.accumulate(optax.sgd(1.0), k=2, skip=optaccum.skip.not_finite)
  step = _stepper(tx, form)
  params, state = _params(), tx.init(_params())
  one = jnp.ones((), jnp.float32)
  for grads in (_grads(1.0), _grads(5.0, bad=bad), _grads(3.0)):
    params, state = step(grads, state, params, one)
  for leaf in jax.tree.leaves(params):
    np.testing.assert_array_equal(np.asarray(leaf), -2.0)
  assert int(optaccum.status(state).num_skipped) == 1
  assert int(optaccum.status(state).num_skipped_windows) == 0


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("size", [1, 4095, 4096, 100_000, 300_000])
@pytest.mark.parametrize("bad", BAD_VALUES)
def test_skip_not_finite_sees_a_lone_bad_entry_anywhere(dtype, size, bad):
  check = jax.jit(optaccum.skip.not_finite)
  for at in sorted({0, size // 2, size - 1}):
    leaf = np.ones(size, np.float32)
    leaf[at] = bad
    skip, info = check({"g": jnp.asarray(leaf, dtype), "h": jnp.ones(3, dtype)}, 0)
    assert bool(skip), (size, at)
    assert int(info["num_not_finite"]) == 1
  skip, info = check({"g": jnp.ones(size, dtype)}, 0)
  assert not bool(skip) and int(info["num_not_finite"]) == 0


@pytest.mark.parametrize("form", FORMS)
def test_overflowing_float32_sum_is_caught_by_the_window_guard(form):
  # 64 finite gradients of 1e37 sum past float32's largest value.
  tx = optaccum.accumulate(optax.sgd(1.0), k=64, skip=optaccum.skip.not_finite)
  step = _stepper(tx, form)
  params, state = _params(), tx.init(_params())
  for _ in range(64):
    params, state = step(_grads(1e37), state, params, jnp.ones((), jnp.float32))
  assert all(np.all(np.asarray(leaf) == 0.0) for leaf in jax.tree.leaves(params))
  assert int(optaccum.status(state).num_skipped_windows) == 1
  assert int(optaccum.status(state).num_skipped) == 0  # no micro-batch was bad


@pytest.mark.parametrize("form", FORMS)
def test_finite_huge_weight_times_finite_gradient_is_caught(form):
  tx = optaccum.accumulate(optax.sgd(1.0), k=2)
  step = _stepper(tx, form)
  params, state = _params(), tx.init(_params())
  params, state = step(_grads(1e10), state, params, jnp.float32(1e30))
  params, state = step(_grads(1.0), state, params, jnp.float32(1.0))
  assert all(np.all(np.asarray(leaf) == 0.0) for leaf in jax.tree.leaves(params))
  assert int(optaccum.status(state).num_skipped_windows) == 1


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("weight", [np.inf, -np.inf, np.nan, -1.0])
def test_bad_weight_skips_its_micro_batch_and_is_counted(form, weight):
  tx = optaccum.accumulate(optax.sgd(1.0), k=2)
  step = _stepper(tx, form)
  params, state = _params(), tx.init(_params())
  weights = [1.0, weight, 1.0]
  for value, w in zip([1.0, 7.0, 3.0], weights):
    params, state = step(_grads(value), state, params, jnp.float32(w))
  # The window is the two good micro-batches: mean 2, nothing silently dropped.
  for leaf in jax.tree.leaves(params):
    np.testing.assert_array_equal(np.asarray(leaf), -2.0)
  assert int(optaccum.status(state).num_skipped) == 1
  assert int(optaccum.status(state).gradient_step) == 1


def test_window_of_only_negative_weights_is_counted_not_dropped_silently():
  tx = optaccum.accumulate(optax.sgd(1.0), k=2)
  params = _params()
  state = tx.init(params)
  for _ in range(2):
    _, state = tx.update(_grads(), state, params, weight=jnp.float32(-1.0))
  assert int(optaccum.status(state).num_skipped) == 2
  assert int(optaccum.status(state).gradient_step) == 0


@pytest.mark.parametrize("form", FORMS)
def test_zero_weight_window_emits_zeros_and_is_counted_empty(form):
  tx = optaccum.accumulate(optax.sgd(1.0, momentum=0.9), k=2)
  step = _stepper(tx, form)
  params, state = _params(), tx.init(_params())
  before = state.inner_opt_state
  for _ in range(2):
    params, state = step(_grads(), state, params, jnp.float32(0.0))
  assert all(np.all(np.asarray(leaf) == 0.0) for leaf in jax.tree.leaves(params))
  assert int(optaccum.status(state).num_empty_windows) == 1
  assert int(optaccum.status(state).num_skipped_windows) == 0
  assert int(optaccum.status(state).gradient_step) == 0
  jax.tree.map(np.testing.assert_array_equal, state.inner_opt_state, before)


def test_flush_of_an_empty_window_is_not_counted_as_an_empty_window():
  tx = optaccum.accumulate(optax.sgd(1.0), k=3)
  params = _params()
  updates, state = optaccum.flush(tx, tx.init(params), params)
  assert int(optaccum.status(state).num_empty_windows) == 0
  assert all(np.all(np.asarray(leaf) == 0.0) for leaf in jax.tree.leaves(updates))


def test_window_guard_false_lets_the_bad_gradient_through():
  tx = optaccum.accumulate(optax.sgd(1.0), k=2, window_guard=False)
  params = _params()
  state = tx.init(params)
  _, state = tx.update(_grads(bad=np.nan), state, params)
  updates, state = tx.update(_grads(), state, params)
  assert np.isnan(np.asarray(updates["w"])).sum() == 1
  assert int(optaccum.status(state).num_skipped_windows) == 0


@pytest.mark.parametrize("strategy", ["loop", "cond", "select"])
def test_guard_holds_for_every_strategy_with_momentum(strategy):
  tx = optaccum.accumulate(optax.sgd(0.1, momentum=0.9), k=2, strategy=strategy)
  params = _params()
  state = tx.init(params)
  _, state = tx.update(_grads(bad=np.inf), state, params)
  updates, state = tx.update(_grads(), state, params)
  assert all(np.all(np.asarray(leaf) == 0.0) for leaf in jax.tree.leaves(updates))
  for trace in jax.tree.leaves(state.inner_opt_state):
    np.testing.assert_array_equal(np.asarray(trace), 0.0)  # momentum untouched
  assert int(optaccum.status(state).num_skipped_windows) == 1


def test_window_guard_must_be_a_bool():
  with pytest.raises(TypeError, match=r"accumulate\(window_guard=...\)` must be a bool"):
    optaccum.accumulate(optax.sgd(1.0), 2, window_guard=1)


def test_skipped_micro_batch_draws_no_rounding_bits():
  # "As if it never happened", also for the stochastic rounding of a bfloat16 sum.
  def run(grads_sequence):
    tx = optaccum.accumulate(
      optax.sgd(1.0),
      k=4,
      accumulator=optaccum.stochastic_bfloat16(3),
      skip=optaccum.skip.not_finite,
    )
    params = {"w": jnp.zeros(100_000, jnp.float32)}
    state = tx.init(params)
    step = jax.jit(lambda grads, state, params: tx.update({"w": grads}, state, params)[1])
    for grads in grads_sequence:
      state = step(grads, state, params)
    return state

  rng = np.random.default_rng(0)
  g1, g2 = (jnp.asarray(rng.normal(size=100_000), jnp.float32) for _ in range(2))
  with_nan = run([g1, g1.at[5].set(jnp.nan), g2])
  without = run([g1, g2])
  assert int(with_nan.num_skipped) == 1
  np.testing.assert_array_equal(
    np.asarray(with_nan.acc_grads["w"], np.float32), np.asarray(without.acc_grads["w"], np.float32)
  )
  np.testing.assert_array_equal(np.asarray(with_nan.rounding_key), np.asarray(without.rounding_key))


def test_replicas_close_windows_together_when_one_skips():
  # Under an axis every micro-step counts on every replica, skipped or not.
  tx = optaccum.accumulate(optax.sgd(1.0), k=2, axis_name="replica", skip=optaccum.skip.not_finite)
  params = {"w": jnp.zeros(4)}
  state = jax.vmap(lambda _: tx.init(params))(jnp.arange(2))
  update = jax.jit(jax.vmap(lambda g, s: tx.update(g, s, params), axis_name="replica"))
  first = {"w": jnp.stack([jnp.ones(4), jnp.ones(4).at[1].set(jnp.nan)])}
  second = {"w": jnp.stack([jnp.full(4, 3.0), jnp.full(4, 5.0)])}
  _, state = update(first, state)
  np.testing.assert_array_equal(np.asarray(state.mini_step), [1, 1])
  updates, state = update(second, state)
  np.testing.assert_array_equal(np.asarray(state.emitted), [True, True])
  np.testing.assert_array_equal(np.asarray(state.num_skipped), [0, 1])
  # Three accepted micro-batches over both replicas: mean (1 + 3 + 5) / 3.
  np.testing.assert_allclose(np.asarray(updates["w"]), -3.0)


def test_counters_saturate_instead_of_wrapping():
  top = jnp.int32(2**31 - 1)
  tx = optaccum.accumulate(optax.sgd(1.0), k=2**31 - 1, skip=optaccum.skip.not_finite)
  params = {"w": jnp.zeros(3)}
  state = tx.init(params)._replace(num_skipped=top, mini_step=top - 1)
  _, state = tx.update({"w": jnp.full(3, jnp.nan)}, state, params)
  assert int(state.num_skipped) == 2**31 - 1
  # mini_step reaches k = 2**31 - 1 and the window closes; a wrap would never close it.
  _, state = tx.update({"w": jnp.ones(3)}, state, params)
  assert bool(state.emitted) and int(state.mini_step) == 0

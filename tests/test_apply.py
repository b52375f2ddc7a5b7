"""The fast path gives the parameters of update + apply_updates."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import pytest

import optaccum
from tests import helpers


@pytest.mark.parametrize("every_k", [1, 3])
def test_apply_gradients_equals_update_then_apply_updates(every_k):
  with jax.numpy_dtype_promotion("standard"):  # for optax's adamw, see test_equivalence
    tx = optaccum.accumulate(
      optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(0.01)), every_k
    )
    params = helpers.init_params()
    x, y = helpers.make_data(4 * every_k * 3)

    @jax.jit
    def slow(params, state, xb, yb):
      updates, state = tx.update(helpers.grad(params, xb, yb), state, params)
      return optax.apply_updates(params, updates), state

    @jax.jit
    def fast(params, state, xb, yb):
      return optaccum.apply_gradients(tx, helpers.grad(params, xb, yb), state, params)

    slow_params, slow_state = params, tx.init(params)
    fast_params, fast_state = params, tx.init(params)
    for start in range(0, x.shape[0], 4):
      batch = (x[start : start + 4], y[start : start + 4])
      slow_params, slow_state = slow(slow_params, slow_state, *batch)
      fast_params, fast_state = fast(fast_params, fast_state, *batch)
  helpers.assert_trees_close(fast_params, slow_params, rtol=1e-6, atol=1e-8)
  assert int(fast_state.gradient_step) == int(slow_state.gradient_step) == 3


def test_apply_gradients_with_weights_and_flush():
  tx = optaccum.accumulate(optax.sgd(1.0), k=4)
  params = {"w": jnp.zeros(1)}
  state = tx.init(params)
  params, state = optaccum.apply_gradients(tx, {"w": jnp.ones(1)}, state, params, weight=3.0)
  params, state = optaccum.apply_gradients(
    tx, {"w": jnp.full(1, 5.0)}, state, params, weight=1.0, flush=True
  )
  assert float(params["w"][0]) == pytest.approx(-2.0)
  assert int(state.gradient_step) == 1


def test_apply_gradients_rejects_a_chain():
  tx = optax.chain(optax.clip(1.0), optaccum.accumulate(optax.sgd(1.0), 2))
  with pytest.raises(TypeError, match=r"`apply_gradients\(tx=...\)` must be a transformation"):
    optaccum.apply_gradients(tx, {"w": jnp.ones(1)}, None, {"w": jnp.zeros(1)})


def test_apply_train_state_gradients_fast_path_equals_train_state_apply_gradients():
  train_state = pytest.importorskip("flax.training.train_state")
  with jax.numpy_dtype_promotion("standard"):  # for optax's adamw, see test_equivalence
    tx = optaccum.accumulate(optax.adamw(0.01), k=3)
    state = train_state.TrainState.create(apply_fn=None, params=helpers.init_params(), tx=tx)
    x, y = helpers.make_data(4 * 3 * 2 + 4)  # two windows and one micro-step more

    @jax.jit
    def flax_step(state, xb, yb):
      return state.apply_gradients(grads=helpers.grad(state.params, xb, yb))

    @jax.jit
    def fast_step(state, xb, yb):
      return optaccum.flax.apply_train_state_gradients(
        state, grads=helpers.grad(state.params, xb, yb)
      )

    reference, fast = state, state
    for start in range(0, x.shape[0], 4):
      batch = (x[start : start + 4], y[start : start + 4])
      reference = flax_step(reference, *batch)
      fast = fast_step(fast, *batch)
  helpers.assert_trees_close(fast.params, reference.params, rtol=1e-6, atol=1e-8)
  helpers.assert_trees_close(
    fast.opt_state.inner_opt_state, reference.opt_state.inner_opt_state, rtol=1e-6, atol=1e-8
  )
  assert int(fast.step) == int(reference.step) == 7  # micro-steps
  assert int(optaccum.status(fast.opt_state).gradient_step) == 2
  assert int(fast.opt_state.mini_step) == int(reference.opt_state.mini_step) == 1


def test_apply_train_state_gradients_fast_path_passes_weight_and_flush():
  train_state = pytest.importorskip("flax.training.train_state")
  state = train_state.TrainState.create(
    apply_fn=None, params={"w": jnp.zeros(1)}, tx=optaccum.accumulate(optax.sgd(1.0), 4)
  )
  state = optaccum.flax.apply_train_state_gradients(state, grads={"w": jnp.ones(1)}, weight=3.0)
  state = optaccum.flax.apply_train_state_gradients(
    state, grads={"w": jnp.full(1, 5.0)}, weight=1.0, flush=True
  )
  # (3 * 1 + 1 * 5) / 4 = 2, applied with lr 1.
  assert float(state.params["w"][0]) == pytest.approx(-2.0)
  assert state.step == 2 and int(optaccum.status(state.opt_state).gradient_step) == 1


def test_apply_train_state_gradients_with_a_chain_takes_the_update_path():
  train_state = pytest.importorskip("flax.training.train_state")
  tx = optax.chain(optax.scale(2.0), optaccum.accumulate(optax.sgd(1.0), 2))
  state = train_state.TrainState.create(apply_fn=None, params={"w": jnp.zeros(1)}, tx=tx)
  state = optaccum.flax.apply_train_state_gradients(state, grads={"w": jnp.ones(1)}, weight=1.0)
  state = optaccum.flax.apply_train_state_gradients(
    state, grads={"w": jnp.full(1, 3.0)}, weight=3.0
  )
  # Scaled by 2 first, then the weighted mean: 2 * (1 * 1 + 3 * 3) / 4 = 5.
  assert float(state.params["w"][0]) == pytest.approx(-5.0)

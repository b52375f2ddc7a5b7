"""The three ways to make the window-closing step conditional agree."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optaccum
from tests import helpers


@pytest.mark.parametrize("strategy", ["loop", "cond", "select"])
def test_strategies_give_large_batch_result_and_skip_nan(strategy):
  every_k = 3
  params = helpers.init_params()
  x, y = helpers.make_data(4 * every_k * 2)
  skip = optaccum.skip.not_finite
  tx = optaccum.accumulate(optax.sgd(0.1, momentum=0.9), every_k, strategy=strategy, skip=skip)
  fast_tx = optaccum.accumulate(optax.sgd(0.1, momentum=0.9), every_k, strategy=strategy, skip=skip)

  @jax.jit
  def step(params, state, fast_params, fast_state, xb, yb):
    updates, state = tx.update(helpers.grad(params, xb, yb), state, params)
    fast_params, fast_state = optaccum.apply_gradients(
      fast_tx, helpers.grad(fast_params, xb, yb), fast_state, fast_params
    )
    return optax.apply_updates(params, updates), state, fast_params, fast_state

  state, fast_params, fast_state = tx.init(params), params, fast_tx.init(params)
  reference, ref_state = params, optax.sgd(0.1, momentum=0.9).init(params)
  for window in range(2):
    for i in range(every_k):
      start = (window * every_k + i) * 4
      params, state, fast_params, fast_state = step(
        params, state, fast_params, fast_state, x[start : start + 4], y[start : start + 4]
      )
    # A NaN micro-batch in the middle of nowhere is skipped by every strategy.
    nan_x = jnp.full((4, helpers.IN_FEATURES), jnp.nan)
    params, state, fast_params, fast_state = step(
      params, state, fast_params, fast_state, nan_x, y[:4]
    )
    big = slice(window * every_k * 4, (window + 1) * every_k * 4)
    updates, ref_state = optax.sgd(0.1, momentum=0.9).update(
      helpers.grad(reference, x[big], y[big]), ref_state, reference
    )
    reference = optax.apply_updates(reference, updates)
  helpers.assert_trees_close(params, reference, rtol=2e-5, atol=1e-7)
  helpers.assert_trees_close(fast_params, reference, rtol=2e-5, atol=1e-7)
  assert int(state.num_skipped) == int(fast_state.num_skipped) == 2


def test_cond_strategy_is_reverse_differentiable():
  params = {"w": jnp.ones(2)}
  tx = optaccum.accumulate(optax.sgd(0.5), k=2, strategy="cond", skip=None)

  def after_window(scale):
    state = tx.init(params)
    _, state = tx.update({"w": scale * jnp.ones(2)}, state, params)
    updates, _ = tx.update({"w": 3.0 * scale * jnp.ones(2)}, state, params)
    return jnp.sum(optax.apply_updates(params, updates)["w"])

  # d/ds sum(w - 0.5 * mean(s, 3s)) = -0.5 * 2 * 2 = -2.
  np.testing.assert_allclose(jax.grad(after_window)(jnp.float32(1.0)), -2.0)


def test_bad_strategy_is_rejected():
  with pytest.raises(
    ValueError,
    match=r"`accumulate\(strategy=...\)` must be one of 'loop', 'cond', 'select', "
    r"got strategy='auto'",
  ):
    optaccum.accumulate(optax.sgd(0.1), 2, strategy="auto")

"""Accumulating k micro-batches of b equals one batch of k*b through the same optimizer."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import optax
import pytest

import optaccum
from tests import helpers

MICRO_BATCH = 4
NUM_WINDOWS = 4


def _adamw_clip_schedule() -> optax.GradientTransformation:
  schedule = optax.warmup_cosine_decay_schedule(
    init_value=0.0, peak_value=0.05, warmup_steps=2, decay_steps=10, end_value=0.001
  )
  return optax.chain(optax.clip_by_global_norm(0.5), optax.adamw(schedule, weight_decay=0.1))


# optax 0.2.8's adam family computes `decay**count` with an int32 count, which
# strict promotion rejects inside optax itself; those run under standard
# promotion. optaccum's own code is checked under strict promotion elsewhere.
OPTIMIZERS = {
  "sgd": (lambda: optax.sgd(0.1), True),
  "momentum": (lambda: optax.sgd(0.1, momentum=0.9), True),
  "nesterov": (lambda: optax.sgd(0.1, momentum=0.9, nesterov=True), True),
  "adam": (lambda: optax.adam(0.01), False),
  "adamw_clip_warmup_cosine": (_adamw_clip_schedule, False),
  "lion": (lambda: optax.lion(0.003, weight_decay=0.01), True),
}


def _train(tx, params, x, y, batch):
  """Jitted update + apply_updates over consecutive batches of `batch` rows."""
  state = tx.init(params)

  @jax.jit
  def step(params, state, xb, yb):
    updates, state = tx.update(helpers.grad(params, xb, yb), state, params)
    return optax.apply_updates(params, updates), state

  for start in range(0, x.shape[0], batch):
    params, state = step(params, state, x[start : start + batch], y[start : start + batch])
  return params, state


@pytest.mark.parametrize("every_k", [1, 3, 8])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_accumulated_windows_equal_large_batch_training(name, every_k):
  make_opt, strict_ok = OPTIMIZERS[name]
  promotion = contextlib.nullcontext() if strict_ok else jax.numpy_dtype_promotion("standard")
  with promotion:
    params = helpers.init_params()
    x, y = helpers.make_data(MICRO_BATCH * every_k * NUM_WINDOWS)
    expected, _ = _train(make_opt(), params, x, y, MICRO_BATCH * every_k)
    actual, state = _train(optaccum.accumulate(make_opt(), every_k), params, x, y, MICRO_BATCH)
  assert int(state.gradient_step) == NUM_WINDOWS
  helpers.assert_trees_close(actual, expected, rtol=2e-5, atol=1e-7)
  # The test can fail: a single micro-batch step differs from the window's.
  assert not jnp.allclose(actual["w1"], params["w1"])


@pytest.mark.parametrize("every_k", [3, 8])
def test_inner_state_advances_once_per_window(every_k):
  with jax.numpy_dtype_promotion("standard"):
    params = helpers.init_params()
    x, y = helpers.make_data(MICRO_BATCH * every_k * 2)
    _, state = _train(optaccum.accumulate(optax.adamw(0.01), every_k), params, x, y, MICRO_BATCH)
  adam_state = state.inner_opt_state[0]
  assert int(adam_state.count) == 2  # two windows, not 2 * every_k micro-steps


def test_multisteps_equals_large_batch_and_optax_multisteps():
  every_k = 3
  with jax.numpy_dtype_promotion("standard"):
    params = helpers.init_params()
    x, y = helpers.make_data(MICRO_BATCH * every_k * NUM_WINDOWS)
    expected, _ = _train(optax.adam(0.01), params, x, y, MICRO_BATCH * every_k)
    ours, state = _train(
      optaccum.compat.MultiSteps(optax.adam(0.01), every_k).gradient_transformation(),
      params,
      x,
      y,
      MICRO_BATCH,
    )
    theirs, _ = _train(
      optax.MultiSteps(optax.adam(0.01), every_k).gradient_transformation(),
      params,
      x,
      y,
      MICRO_BATCH,
    )
  helpers.assert_trees_close(ours, expected, rtol=2e-5, atol=1e-7)
  helpers.assert_trees_close(ours, theirs, rtol=2e-5, atol=1e-7)
  assert int(state.gradient_step) == NUM_WINDOWS

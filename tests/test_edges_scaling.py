"""`optaccum.planning.scale_learning_rate` on bad input: NaN, inf, overflow, bad schedules.

A `k` schedule is read exactly as `optaccum.accumulate` reads it, so the scaled
rate follows the window accumulate really runs; the expected windows below come
from NumPy (floor, NaN and values below 1 to 1) and from running accumulate.
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optaccum

scale = optaccum.planning.scale_learning_rate

#: k at gradient steps 0, 1, 2, 3, ...: fine, NaN, below 1, fractional (then 3.7 on).
K_VALUES = np.array([2.0, np.nan, 0.5, 3.7], np.float32)


def k_schedule(step):
  return jnp.asarray(K_VALUES)[jnp.minimum(step, len(K_VALUES) - 1)]


def numpy_windows(values):
  """The window each k value gives: floored, NaN and values below 1 counted as 1."""
  floored = np.floor(np.nan_to_num(values, nan=1.0))
  return np.maximum(floored, 1.0).astype(np.int64)


def accumulate_windows(schedule, windows):
  """Runs `optaccum.accumulate` with the k schedule: the micro-steps of each window."""
  tx = optaccum.accumulate(optax.sgd(1.0), schedule)
  params = jnp.zeros(2)
  state, update = tx.init(params), jax.jit(tx.update)
  lengths, length = [], 0
  while len(lengths) < windows:
    _, state = update(jnp.ones(2), state, params)
    length += 1
    if int(optaccum.status(state).gradient_step) > len(lengths):
      lengths.append(length)
      length = 0
  return lengths


def test_the_scaled_rate_follows_the_window_accumulate_runs():
  expected = numpy_windows(K_VALUES)
  assert list(expected) == [2, 1, 1, 3]
  assert accumulate_windows(k_schedule, len(K_VALUES)) == list(expected)
  linear = scale(0.1, k_schedule)
  square_root = scale(0.1, k_schedule, rule="sqrt")
  for step, window in enumerate(expected):
    np.testing.assert_allclose(float(linear(jnp.int32(step))), 0.1 * window, rtol=1e-6)
    np.testing.assert_allclose(
      float(square_root(jnp.int32(step))), 0.1 * np.sqrt(window), rtol=1e-6
    )


def test_a_learning_rate_schedule_with_a_k_schedule_scales_step_by_step():
  warmup = optax.linear_schedule(0.0, 1.0, transition_steps=4)  # 0 at step 0: allowed
  scaled = scale(warmup, k_schedule, rule="sqrt")
  windows = numpy_windows(K_VALUES)
  for step in range(6):
    expected = min(step, 4) / 4 * np.sqrt(windows[min(step, 3)])
    np.testing.assert_allclose(float(scaled(jnp.int32(step))), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
  "value, message",
  [
    (
      math.nan,
      "must return a finite number of micro-steps, but at gradient step 0 it returned nan.",
    ),
    (
      math.inf,
      "must return a finite number of micro-steps, but at gradient step 0 it returned inf.",
    ),
    (
      jnp.ones(2),
      "must return a real scalar, but at gradient step 0 it returned Array([1., 1.], "
      "dtype=float32).",
    ),
    (jnp.complex64(2), "must return a real scalar, but at gradient step 0 it returned"),
    (jnp.bool_(True), "must return a real scalar, but at gradient step 0 it returned"),
  ],
  ids=["nan", "inf", "vector", "complex", "bool"],
)
def test_a_k_schedule_bad_at_step_0_is_refused_as_accumulate_refuses_it(value, message):
  with pytest.raises(ValueError, match=re.escape(f"`scale_learning_rate(k=...)` {message}")):
    scale(0.1, lambda step: value)
  with pytest.raises(ValueError, match=re.escape(message)):
    optaccum.accumulate(optax.sgd(0.1), lambda step: value)


@pytest.mark.parametrize(
  "learning_rate, message",
  [
    (math.inf, "must be finite, got learning_rate=inf."),
    (np.float64(np.inf), "must be finite, got learning_rate=np.float64(inf)."),
    (-math.inf, "must be a positive number, got learning_rate=-inf."),
    (math.nan, "must be a positive number, got learning_rate=nan."),
    (0.0, "must be a positive number, got learning_rate=0.0."),
    (-0.1, "must be a positive number, got learning_rate=-0.1."),
    (True, "must be a positive number, got learning_rate=True."),
    ("0.1", "must be a positive number, got learning_rate='0.1'."),
    (None, "must be a positive number, got learning_rate=None."),
    (0.1 + 0j, "must be a positive number, got learning_rate=(0.1+0j)."),
  ],
)
def test_a_bad_constant_learning_rate_is_named(learning_rate, message):
  with pytest.raises(
    ValueError, match=re.escape(f"`scale_learning_rate(learning_rate=...)` {message}")
  ):
    scale(learning_rate, 4)


@pytest.mark.parametrize(
  "learning_rate, k, rule, message",
  [
    (1e308, 4, "linear", "scaled by 4 overflows: 1e+308 × 4 is not a finite float."),
    (1e308, 4, "sqrt", "scaled by 2 overflows: 1e+308 × 2 is not a finite float."),
    (np.float32(3e38), 2, "linear", "scaled by 2 overflows: 3e+38 × 2 is not a finite float."),
    (
      1e39,  # finite as a Python float, inf as the float32 a schedule computes in
      lambda step: 2,
      "linear",
      "scaled by 2 overflows: 1e+39 × 2 is not a finite float (float32, at step 0).",
    ),
    (
      optax.constant_schedule(1e38),
      8,
      "linear",
      "scaled by 8 overflows: 1e+38 × 8 is not a finite float (float32, at step 0).",
    ),
  ],
  ids=["linear", "sqrt", "float32", "constant with k schedule", "schedule"],
)
def test_a_scaled_rate_that_overflows_is_refused_naming_the_values(learning_rate, k, rule, message):
  with pytest.raises(ValueError) as error:
    scale(learning_rate, k, rule=rule)
  assert str(error.value) == f"`scale_learning_rate(learning_rate=...)` {message}"


def test_a_large_rate_that_stays_finite_is_scaled_exactly():
  assert scale(1e290, 2**31 - 1) == np.float64(1e290) * np.float64(2**31 - 1)
  assert scale(0.1, np.int64(8)) == pytest.approx(np.float64(0.1) * 8, rel=1e-15)


@pytest.mark.parametrize(
  "value",
  [jnp.nan, jnp.inf, -0.1, jnp.ones(2), True],
  ids=["nan", "inf", "negative", "vector", "bool"],
)
def test_a_learning_rate_schedule_bad_at_step_0_is_refused(value):
  message = (
    "`scale_learning_rate(learning_rate=...)` must return a finite, non-negative real scalar, "
    "but at step 0 it returned"
  )
  with pytest.raises(ValueError, match=re.escape(message)):
    scale(lambda step: value, 4)


@pytest.mark.parametrize("rule", ["cubic", "Linear", 1, None])
def test_a_bad_rule_is_named(rule):
  message = f"`scale_learning_rate(rule=...)` must be one of 'linear', 'sqrt', got rule={rule!r}."
  with pytest.raises(ValueError, match=re.escape(message)):
    scale(0.1, 4, rule=rule)


@pytest.mark.parametrize("k", [0, -1, True, 2.0, 2**31, "4", None])
def test_a_bad_k_is_named(k):
  message = "`scale_learning_rate(k=...)` must be a positive int (at most 2**31 - 1"
  with pytest.raises(ValueError, match=re.escape(message) + r".*" + re.escape(f"got k={k!r}.")):
    scale(0.1, k)

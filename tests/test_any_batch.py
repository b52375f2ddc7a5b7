"""`microbatch` on any batch: rows that k does not divide, and a traced count of real micro-batches.

References are the unsplit call in float64 (the whole batch, or its real rows),
never the split function itself.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optaccum


def mse(w, x, y):
  return jnp.mean((x @ w - y) ** 2)


def reference(w, x, y):
  """The unsplit mean squared error and its gradient, in float64 NumPy."""
  w, x, y = (np.asarray(a, np.float64) for a in (w, x, y))
  residual = x @ w - y
  return np.mean(residual**2), 2 * x.T @ residual / len(x)


def data(rows, features=3, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(rows, features)).astype(np.float32)
  y = rng.normal(size=(rows,)).astype(np.float32)
  w = rng.normal(size=(features,)).astype(np.float32)
  return jnp.asarray(w), jnp.asarray(x), jnp.asarray(y)


@pytest.mark.parametrize("rows, k", [(10, 4), (9, 4), (3, 4), (17, 8), (7, 7)])
def test_rows_that_k_does_not_divide_give_the_unsplit_mean(rows, k):
  # 10 rows, k=4: micro-batches of 3, 3, 3 and 1 rows; 9 rows: 3, 3, 3.
  w, x, y = data(rows)
  value, grads = jax.jit(optaccum.microbatch(jax.value_and_grad(mse), k))(w, x, y)
  ref_value, ref_grads = reference(w, x, y)
  np.testing.assert_allclose(float(value), ref_value, rtol=2e-6)
  np.testing.assert_allclose(np.asarray(grads, np.float64), ref_grads, rtol=2e-5, atol=1e-6)


def test_a_leaf_of_100k_entries_and_a_short_last_micro_batch():
  # 1001 rows, k=8: seven micro-batches of 126 rows and one of 119.
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(1001, 320)).astype(np.float32))
  w = jnp.asarray(rng.normal(size=(320, 320)).astype(np.float32) / 18)  # 102 400 entries
  y = jnp.asarray(rng.normal(size=(1001, 320)).astype(np.float32))
  value, grads = jax.jit(optaccum.microbatch(jax.value_and_grad(mse), 8))(w, x, y)
  x64, w64, y64 = (np.asarray(a, np.float64) for a in (x, w, y))
  residual = x64 @ w64 - y64
  np.testing.assert_allclose(float(value), np.mean(residual**2), rtol=1e-5)
  expected = 2 * x64.T @ residual / residual.size
  np.testing.assert_allclose(np.asarray(grads, np.float64), expected, rtol=1e-4, atol=1e-7)


def test_sum_reduction_with_a_short_last_micro_batch_is_the_unsplit_sum():
  def sse(w, x, y):
    return jnp.sum((x @ w - y) ** 2)

  w, x, y = data(10)
  value, grads = optaccum.microbatch(jax.value_and_grad(sse), 4, reduction="sum")(w, x, y)
  ref_value, ref_grads = reference(w, x, y)
  np.testing.assert_allclose(float(value), 10 * ref_value, rtol=2e-6)
  np.testing.assert_allclose(np.asarray(grads, np.float64), 10 * ref_grads, rtol=2e-5)


def test_token_weights_with_a_short_last_micro_batch_give_the_token_mean():
  # A masked loss: each micro-batch's mean over its own valid tokens, weighted by
  # their count, is the whole batch's mean over valid tokens, whatever the cut.
  def masked(w, x, y, mask):
    errors = (x @ w - y) ** 2
    return jnp.sum(errors * mask) / jnp.maximum(jnp.sum(mask), 1.0)

  w, x, y = data(11)
  mask = jnp.asarray(np.array([1, 1, 0, 1, 0, 1, 1, 1, 0, 1, 1], np.float32))
  split = optaccum.microbatch(
    jax.value_and_grad(masked), 4, weight_fn=lambda w, x, y, mask: jnp.sum(mask)
  )
  value, grads = split(w, x, y, mask)
  keep = np.asarray(mask) > 0
  ref_value, ref_grads = reference(w, np.asarray(x)[keep], np.asarray(y)[keep])
  np.testing.assert_allclose(float(value), ref_value, rtol=2e-6)
  np.testing.assert_allclose(np.asarray(grads, np.float64), ref_grads, rtol=2e-5, atol=1e-6)


def test_concat_aux_keeps_the_batch_order_and_stack_is_refused_with_a_tail():
  def with_residuals(w, x, y):
    residual = x @ w - y
    return jnp.mean(residual**2), residual

  w, x, y = data(10)
  fn = jax.value_and_grad(with_residuals, has_aux=True)
  (_, residuals), _ = optaccum.microbatch(fn, 4, has_aux=True, aux_reduction="concat")(w, x, y)
  np.testing.assert_allclose(np.asarray(residuals), np.asarray(x @ w - y), rtol=1e-6)
  stacked = optaccum.microbatch(fn, 4, has_aux=True, aux_reduction="stack")
  with pytest.raises(ValueError, match=r"aux_reduction=\.\.\.\)` stacks an aux leaf \('stack'\)"):
    stacked(w, x, y)
  np.testing.assert_equal(stacked(w, x[:8], y[:8])[0][1].shape, (4, 2))  # k divides 8: stacks


def test_traced_num_real_takes_the_real_micro_batches_without_recompiling():
  w, x, y = data(12)
  calls = []

  @jax.jit
  def step(w, x, y, num_real):
    calls.append(1)  # one trace, whatever num_real
    return optaccum.microbatch(jax.value_and_grad(mse), 4, num_real=num_real)(w, x, y)

  for num_real in range(5):
    value, grads = step(w, x, y, jnp.int32(num_real))
    # Micro-batch i holds rows i, i + 4, i + 8: the real ones are those with r % 4 < n.
    real = np.arange(12) % 4 < num_real
    if num_real:
      ref_value, ref_grads = reference(w, np.asarray(x)[real], np.asarray(y)[real])
    else:  # no real micro-batch: zeros, not NaN
      ref_value, ref_grads = 0.0, np.zeros(3)
    np.testing.assert_allclose(float(value), ref_value, rtol=2e-6, atol=0)
    np.testing.assert_allclose(np.asarray(grads, np.float64), ref_grads, rtol=2e-5, atol=1e-7)
  assert len(calls) == 1


def test_num_real_beyond_k_is_clamped_and_runs_nothing_past_the_real_ones():
  w, x, y = data(8)
  seen = []

  def counting(w, x, y):
    jax.debug.callback(lambda: seen.append(1))
    return jax.value_and_grad(mse)(w, x, y)

  split = jax.jit(lambda w, x, y, n: optaccum.microbatch(counting, 4, num_real=n)(w, x, y))
  value, _ = split(w, x, y, jnp.int32(9))
  np.testing.assert_allclose(float(value), reference(w, x, y)[0], rtol=2e-6)
  seen.clear()
  jax.block_until_ready(split(w, x, y, jnp.int32(1)))
  jax.effects_barrier()
  assert len(seen) == 1  # the three padding micro-batches did not run


@pytest.mark.parametrize(
  "num_real, error, message",
  [
    (2.5, TypeError, r"must be an int or a scalar integer array.*got num_real=a float: 2\.5\."),
    (True, TypeError, r"must be an int or a scalar integer array.*got num_real=a bool: True\."),
    (jnp.ones(2, jnp.int32), TypeError, r"must be an int or a scalar integer array"),
    (-1, ValueError, r"must be between 0 and k=4, got num_real=-1\."),
    (5, ValueError, r"must be between 0 and k=4, got num_real=5\."),
  ],
)
def test_bad_num_real_is_refused_naming_the_value(num_real, error, message):
  with pytest.raises(error, match=r"`microbatch\(num_real=\.\.\.\)` " + message):
    optaccum.microbatch(jax.value_and_grad(mse), 4, num_real=num_real)


def test_num_real_with_a_batch_that_k_does_not_divide_is_refused():
  w, x, y = data(10)
  split = optaccum.microbatch(jax.value_and_grad(mse), 4, num_real=2)
  with pytest.raises(ValueError, match=r"num_real=\.\.\.\)` counts micro-batches of equal rows"):
    split(w, x, y)

"""Window statistics: the estimators against float64 formulas and known Gaussian gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optaccum


def _reference(micro_batch_grads, weights, examples_per_weight=1.0):
  """Float64 statistics of one window from its micro-batch gradients, by definition.

  Each micro-batch holds weight * examples_per_weight examples. The spread is
  the weighted sum of squared deviations from the window mean, whose
  expectation is (k - 1) tr(Sigma) / W (see optaccum/_statistics.py).
  """
  g = np.asarray(micro_batch_grads)  # (k, d)
  g = g.astype(np.complex128 if np.iscomplexobj(g) else np.float64)
  w = np.asarray(weights, np.float64)
  k, total = len(w), w.sum()
  mean = (w[:, None] * g).sum(axis=0) / total
  spread = (w * np.sum(np.abs(g - mean) ** 2, axis=1)).sum() / total
  trace = examples_per_weight * total * spread / (k - 1)
  squared_norm = np.sum(np.abs(mean) ** 2) - trace / (examples_per_weight * total)
  return {
    "window_norm": np.linalg.norm(mean),
    "micro_batch_squared_norm": (w * np.sum(np.abs(g) ** 2, axis=1)).sum() / total,
    "gradient_squared_norm": squared_norm,
    "trace_covariance": trace,
    "noise_scale": trace / squared_norm,
    "batch_size": examples_per_weight * total,
    "num_micro_batches": k,
  }


def _assert_statistics(actual, expected, rtol=1e-5):
  for name, value in expected.items():
    np.testing.assert_allclose(float(getattr(actual, name)), value, rtol=rtol, err_msg=name)


def _split(flat):
  """A flat (d,) gradient as a tree of two leaves, so norms sum over leaves."""
  return {"a": flat[:3], "b": flat[3:].reshape(2, 2)}


PARAMS = {"a": jnp.zeros(3), "b": jnp.zeros((2, 2))}
GRADS = np.array(
  [
    [1.0, -2.0, 0.5, 3.0, 0.0, 1.0, -1.0],
    [2.0, -1.0, 0.0, 2.5, 1.0, 0.5, -0.5],
    [0.5, -3.0, 1.5, 3.5, -1.0, 2.0, -2.0],
  ],
  np.float32,
)


@pytest.mark.parametrize("strategy", ["loop", "cond", "select"])
def test_statistics_match_float64_definitions(strategy):
  tx = optaccum.accumulate(optax.sgd(0.1), k=3, statistics=True, strategy=strategy)
  state = tx.init(PARAMS)
  for g in GRADS:
    _, state = tx.update(_split(jnp.asarray(g)), state, PARAMS)
  statistics = optaccum.status(state, micro_batch_size=16).statistics
  _assert_statistics(statistics, _reference(GRADS, [1, 1, 1], 16.0))


def test_weighted_statistics_take_weights_as_micro_batch_sizes():
  weights = [5.0, 1.0, 12.0]
  tx = optaccum.accumulate(optax.sgd(0.1), k=3, statistics=True)
  state = tx.init(PARAMS)
  for g, w in zip(GRADS, weights):
    _, state = tx.update(_split(jnp.asarray(g)), state, PARAMS, weight=jnp.float32(w))
  _assert_statistics(optaccum.status(state).statistics, _reference(GRADS, weights))


def test_statistics_are_summed_over_replicas():
  tx = optaccum.accumulate(optax.sgd(0.1), k=2, statistics=True, axis_name="data")
  grads = np.concatenate([GRADS, GRADS[:1] * 2]).reshape(2, 2, -1)  # (step, replica, d)
  states = jax.tree.map(lambda x: jnp.stack([x, x]), tx.init(PARAMS))
  step = jax.jit(jax.vmap(tx.update, in_axes=(0, 0, None), axis_name="data"))
  for g in grads:
    _, states = step(jax.vmap(_split)(jnp.asarray(g)), states, PARAMS)
  for replica in range(2):
    window = jax.tree.map(lambda x, r=replica: x[r], optaccum.status(states).statistics)
    _assert_statistics(window, _reference(grads.reshape(4, -1), [1, 1, 1, 1]))


def test_skipped_micro_batch_is_left_out_of_the_statistics():
  tx = optaccum.accumulate(optax.sgd(0.1), k=3, statistics=True, skip=optaccum.skip.not_finite)
  state = tx.init(PARAMS)
  nan = np.full_like(GRADS[0], np.nan)
  for g in [GRADS[0], nan, GRADS[1], GRADS[2]]:
    _, state = tx.update(_split(jnp.asarray(g)), state, PARAMS)
  _assert_statistics(optaccum.status(state).statistics, _reference(GRADS, [1, 1, 1]))


@pytest.mark.parametrize("part", ["complex", "imaginary"])
@pytest.mark.parametrize("dtype", ["complex64", "complex128"])
def test_complex_gradients_count_their_imaginary_part(dtype, part):
  # |z|^2 = re^2 + im^2, as the window guard and the skip policies measure it;
  # a purely imaginary gradient has the norm of its imaginary part, not 0.
  rng = np.random.default_rng(4)
  grads = 1j * GRADS.astype(np.float64)
  if part == "complex":
    grads = grads + rng.normal(size=GRADS.shape)
  weights = [2.0, 1.0, 3.0]
  with jax.enable_x64(dtype == "complex128"):
    params = jax.tree.map(lambda leaf: leaf.astype(dtype), PARAMS)
    tx = optaccum.accumulate(optax.sgd(0.1), k=3, statistics=True)
    state = tx.init(params)
    step = jax.jit(lambda g, state, params, w: tx.update(g, state, params, weight=w)[1])
    for g, w in zip(grads, weights):
      state = step(_split(jnp.asarray(g, dtype)), state, params, jnp.float32(w))
    assert state.acc_grads["a"].dtype == jnp.dtype(dtype)
    _assert_statistics(optaccum.status(state).statistics, _reference(grads, weights))


def test_single_micro_batch_window_has_nan_estimates_and_a_finite_norm():
  tx = optaccum.accumulate(optax.sgd(0.1), k=1, statistics=True)
  state = tx.init(PARAMS)
  before = optaccum.status(state).statistics
  assert np.isnan(float(before.window_norm)) and int(before.num_micro_batches) == 0
  _, state = tx.update(_split(jnp.asarray(GRADS[0])), state, PARAMS)
  window = optaccum.status(state).statistics
  np.testing.assert_allclose(float(window.window_norm), np.linalg.norm(GRADS[0]), rtol=1e-6)
  for name in ("gradient_squared_norm", "trace_covariance", "noise_scale"):
    assert np.isnan(float(getattr(window, name))), name


def test_empty_flushed_window_keeps_the_last_statistics():
  tx = optaccum.accumulate(optax.sgd(0.1), k=3, statistics=True)
  state = tx.init(PARAMS)
  for g in GRADS:
    _, state = tx.update(_split(jnp.asarray(g)), state, PARAMS)
  closed = optaccum.status(state).statistics
  _, state = optaccum.flush(tx, state, PARAMS)
  assert not bool(optaccum.status(state).has_updated)
  for kept, before in zip(optaccum.status(state).statistics, closed):
    np.testing.assert_array_equal(np.asarray(kept), np.asarray(before))


def test_statistics_add_only_scalars_to_the_state():
  def extra_bytes(params):
    plain = optaccum.accumulate(optax.sgd(0.1), 4).init(params)
    with_statistics = optaccum.accumulate(optax.sgd(0.1), 4, statistics=True).init(params)
    assert all(leaf.shape == () for leaf in jax.tree.leaves(with_statistics.statistics))
    size = lambda tree: sum(leaf.nbytes for leaf in jax.tree.leaves(tree))  # noqa: E731
    return size(with_statistics) - size(plain)

  small = extra_bytes({"w": jnp.zeros(10)})
  # 9 four-byte scalars, whatever the model's size.
  assert small == extra_bytes({"w": jnp.zeros((512, 512)), "b": jnp.zeros(512)}) == 36


def test_state_with_statistics_can_be_donated():
  tx = optaccum.accumulate(optax.sgd(0.1), k=2, statistics=True)
  step = jax.jit(lambda g, s: tx.update(_split(g), s, PARAMS)[1], donate_argnums=1)
  state = tx.init(PARAMS)
  for g in GRADS[:2]:
    state = step(jnp.asarray(g), state)  # fails if two fields share one buffer
  assert int(optaccum.status(state).statistics.num_micro_batches) == 2


# --- Unbiasedness on Gaussian gradients with known mean and covariance -------------------


def _gaussian_problem(dimension=6, seed=0):
  rng = np.random.default_rng(seed)
  mean = rng.normal(size=dimension) * 0.3
  factor = rng.normal(size=(dimension, dimension)) / np.sqrt(dimension)
  return rng, mean, factor @ factor.T  # per-example gradient: N(mean, covariance)


def _per_window_statistics(tx, grads, weights, micro_batch_size=None):
  """The statistics of every window of a scan over micro-steps, as float64 arrays."""
  params = jnp.zeros(grads.shape[1], jnp.float32)

  def body(state, step):
    g, w = step
    _, state = tx.update(g, state, params, weight=w)
    statistics = optaccum.status(state, micro_batch_size=micro_batch_size).statistics
    return state, (statistics, optaccum.status(state).has_updated)

  run = jax.jit(lambda xs: jax.lax.scan(body, tx.init(params), xs)[1])
  windows, emitted = run((jnp.asarray(grads, jnp.float32), jnp.asarray(weights, jnp.float32)))
  return jax.tree.map(lambda x: np.asarray(x, np.float64)[np.asarray(emitted)], windows)


def test_estimators_are_unbiased_for_gaussian_micro_batch_gradients():
  rng, mean, covariance = _gaussian_problem()
  every_k, micro_batch_size, num_windows = 4, 8, 3000
  steps = every_k * num_windows
  # A micro-batch gradient averages `micro_batch_size` examples: N(mean, covariance / B).
  noise = rng.multivariate_normal(np.zeros_like(mean), covariance / micro_batch_size, size=steps)
  tx = optaccum.accumulate(optax.sgd(0.1), every_k, statistics=True)
  windows = _per_window_statistics(tx, mean + noise, np.ones(steps), micro_batch_size)
  assert len(windows.trace_covariance) == num_windows
  # For Gaussian g_i with covariance C = Sigma / B, the unbiased sample variance
  # trace is a sum of eigenvalue-weighted chi^2_{k-1} / (k - 1): variance
  # 2 tr(C^2) / (k - 1), so the tr(Sigma) estimate (B times it) has variance
  # 2 tr(Sigma^2) / (k - 1). The |G|^2 estimate, |Gbar|^2 - (that trace) / k,
  # sums two independent terms: variance 2 tr(C^2) / (k (k - 1)) + 4 G'CG / k.
  # The mean over N windows has standard error sqrt(variance / N); allow 5.
  c = covariance / micro_batch_size
  trace_error = np.sqrt(2 * np.trace(covariance @ covariance) / (every_k - 1) / num_windows)
  norm_variance = 2 * np.trace(c @ c) / (every_k * (every_k - 1)) + 4 * mean @ c @ mean / every_k
  norm_error = np.sqrt(norm_variance / num_windows)
  assert abs(windows.trace_covariance.mean() - np.trace(covariance)) < 5 * trace_error
  assert abs(windows.gradient_squared_norm.mean() - mean @ mean) < 5 * norm_error
  # The naive estimates are biased by more than the tolerance: the test can tell.
  assert (
    abs(np.trace(covariance) * (every_k - 1) / every_k - np.trace(covariance)) > 10 * trace_error
  )


def test_weighted_estimators_are_unbiased_for_unequal_micro_batches():
  rng, mean, covariance = _gaussian_problem(seed=1)
  every_k, num_windows = 4, 3000
  sizes = rng.choice([1, 2, 4, 16], size=every_k * num_windows)
  noise = rng.multivariate_normal(np.zeros_like(mean), covariance, size=len(sizes))
  grads = mean + noise / np.sqrt(sizes)[:, None]  # covariance / size each
  tx = optaccum.accumulate(optax.sgd(0.1), every_k, statistics=True)
  windows = _per_window_statistics(tx, grads, sizes)
  # The windows are independent, so each mean's standard error is the sample
  # standard deviation over sqrt(N) (itself known to ~1/sqrt(2N) = 1.3%); allow 5.
  for estimate, truth in [
    (windows.trace_covariance, np.trace(covariance)),
    (windows.gradient_squared_norm, mean @ mean),
  ]:
    standard_error = estimate.std(ddof=1) / np.sqrt(num_windows)
    assert abs(estimate.mean() - truth) < 5 * standard_error


# --- Bad input --------------------------------------------------------------------------


def test_non_bool_statistics_is_rejected():
  with pytest.raises(
    TypeError, match=r"`accumulate\(statistics=...\)` must be a bool, got statistics=1"
  ):
    optaccum.accumulate(optax.sgd(0.1), 2, statistics=1)


def test_micro_batch_size_scales_sizes_into_examples():
  tx = optaccum.accumulate(optax.sgd(0.1), k=3, statistics=True)
  state = tx.init(PARAMS)
  for g in GRADS:
    _, state = tx.update(_split(jnp.asarray(g)), state, PARAMS)
  per_unit = optaccum.status(state).statistics
  examples = optaccum.status(state, micro_batch_size=16).statistics
  for field in ("batch_size", "trace_covariance", "noise_scale"):
    np.testing.assert_allclose(getattr(examples, field), 16 * getattr(per_unit, field), rtol=1e-6)
  for field in ("window_norm", "micro_batch_squared_norm", "gradient_squared_norm"):
    assert getattr(examples, field) == getattr(per_unit, field)


@pytest.mark.parametrize("size", [0, 2.5, True])
def test_bad_micro_batch_size_is_rejected(size):
  tx = optaccum.accumulate(optax.sgd(0.1), 2, statistics=True)
  with pytest.raises(ValueError, match=r"`status\(micro_batch_size=...\)` must be a positive int"):
    optaccum.status(tx.init(PARAMS), micro_batch_size=size).statistics


def test_status_without_statistics_holds_none():
  state = optaccum.accumulate(optax.sgd(0.1), 2).init(PARAMS)
  assert optaccum.status(state).statistics is None

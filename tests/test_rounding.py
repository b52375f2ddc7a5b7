"""bfloat16 accumulators: stochastic rounding, its bias, its key, its memory, its errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optaccum
from optaccum._rounding import stochastic_round

BFLOAT16_GAP_AT_ONE = 2.0**-7  # bfloat16 keeps 8 significant bits


def _stochastic(every_k, key=0, **kwargs):
  return optaccum.accumulate(
    optax.identity(),
    every_k,
    accumulator=optaccum.stochastic_bfloat16(key),
    **kwargs,
  )


def _window_means(tx, grads):
  """Runs `tx` over the micro-steps `grads[step]` in one scan; returns what each step emits."""
  params = jnp.zeros(grads.shape[1:], jnp.float32)

  def body(state, g):
    updates, state = tx.update(g, state, params)
    return state, updates

  return jax.jit(lambda gs: jax.lax.scan(body, tx.init(params), gs)[1])(grads)


# --- The rounding itself --------------------------------------------------------------


@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.875])
def test_stochastic_round_rounds_up_with_probability_of_distance_to_lower_neighbour(fraction, sign):
  lower = 1.5  # a bfloat16; the next one up is 1.5 + 2^-7
  x = sign * (lower + fraction * BFLOAT16_GAP_AT_ONE)  # exact in float32
  size = 2**16
  rounded = np.asarray(
    stochastic_round(jnp.full((size,), x, jnp.float32), jnp.asarray([7, 11], jnp.uint32)),
    np.float64,
  )
  up = sign * (lower + BFLOAT16_GAP_AT_ONE)
  assert set(np.unique(rounded)) <= {sign * lower, up}
  # Each element rounds up independently with probability `fraction`: the
  # fraction that did has standard deviation sqrt(p (1 - p) / size); allow 5 of them.
  tolerance = 5 * np.sqrt(fraction * (1 - fraction) / size)
  assert abs(np.mean(rounded == up) - fraction) < tolerance


def test_stochastic_round_keeps_bfloat16_values_and_non_finite_values():
  values = jnp.array([0.0, -0.0, 1.5, -3.0, 2.0**-130, jnp.inf, -jnp.inf, jnp.nan], jnp.float32)
  rounded = stochastic_round(values, jnp.asarray([3, 5], jnp.uint32))
  assert rounded.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(rounded, np.float32), np.asarray(values))
  assert np.signbit(np.asarray(rounded, np.float32)[1])


# --- Bias of the window mean ------------------------------------------------------------


def test_stochastic_window_mean_is_unbiased_where_nearest_loses_small_gradients():
  # Each window: one gradient in [1, 2), then k - 1 in [1e-4, 3e-3], below half a
  # bfloat16 gap at 1 (2^-8): rounded to nearest, they never enter the sum.
  every_k, num_windows, size = 8, 64, 1024
  rng = np.random.default_rng(0)
  grads = rng.uniform(1e-4, 3e-3, size=(num_windows, every_k, size)).astype(np.float32)
  grads[:, 0] = rng.uniform(1.0, 2.0, size=(num_windows, size))
  expected = grads.astype(np.float64).mean(axis=1)
  flat = jnp.asarray(grads.reshape(num_windows * every_k, size))

  def mean_error(tx):
    emitted = np.asarray(_window_means(tx, flat), np.float64)[every_k - 1 :: every_k]
    return np.mean(emitted - expected)

  stochastic_bias = mean_error(_stochastic(every_k))
  nearest_bias = mean_error(
    optaccum.accumulate(optax.identity(), every_k, accumulator=jnp.bfloat16)
  )
  # The sum stays below 2 + 7 * 3e-3 < 4, where the bfloat16 gap u is at most
  # 2^-6. Each of the k roundings of a window errs by a zero-mean amount of
  # variance <= u^2 / 4, independently of the others given the past (a
  # martingale), so the window mean errs with variance <= u^2 / (4 k), and the
  # mean over N = windows * elements independent samples has standard deviation
  # <= u / (2 sqrt(k N)). Allow 5 of them, plus 2^-21 for float32's own rounding
  # of the sums (k additions of <= 2^-24 * 4 each, over k) and of the division.
  gap = 2.0**-6
  tolerance = 5 * gap / (2 * np.sqrt(every_k * num_windows * size)) + 2.0**-21
  assert abs(stochastic_bias) < tolerance
  # Nearest drops the k - 1 small gradients: bias ~ -(7/8) * 1.55e-3.
  assert nearest_bias < -20 * tolerance


# --- The key ----------------------------------------------------------------------------


def _accumulator_after(tx, steps=3):
  params = {"w": jnp.zeros(256)}
  state = tx.init(params)
  update = jax.jit(tx.update)
  rng = np.random.default_rng(1)
  for _ in range(steps):
    _, state = update({"w": jnp.asarray(rng.normal(size=256), jnp.float32)}, state, params)
  return np.asarray(state.acc_grads["w"], np.float32)


def test_stochastic_rounding_is_reproducible_from_its_key():
  from_seed = _accumulator_after(_stochastic(8, key=0))
  np.testing.assert_array_equal(
    _accumulator_after(_stochastic(8, key=jax.random.key(0))), from_seed
  )
  np.testing.assert_array_equal(
    _accumulator_after(_stochastic(8, key=jax.random.PRNGKey(0))), from_seed
  )
  assert not np.array_equal(_accumulator_after(_stochastic(8, key=1)), from_seed)


def test_state_key_advances_on_every_micro_step():
  tx = _stochastic(2)
  params = {"w": jnp.zeros(3)}
  state = tx.init(params)
  keys = [np.asarray(state.rounding_key)]
  for _ in range(3):
    _, state = tx.update({"w": jnp.ones(3)}, state, params)
    keys.append(np.asarray(state.rounding_key))
  assert len({key.tobytes() for key in keys}) == 4
  assert state.rounding_key.dtype == jnp.uint32


def test_replicas_round_with_their_own_bits():
  tx = _stochastic(4, axis_name="data")
  params = {"w": jnp.zeros(512)}
  replicas = 2
  states = jax.tree.map(lambda x: jnp.stack([x] * replicas), tx.init(params))
  # Halfway between two bfloat16s: each element rounds up with probability 1/2.
  grads = {"w": jnp.full((replicas, 512), 1.5 + BFLOAT16_GAP_AT_ONE / 2, jnp.float32)}
  step = jax.jit(jax.vmap(tx.update, in_axes=(0, 0, None), axis_name="data"))
  _, states = step(grads, states, params)
  first, second = np.asarray(states.acc_grads["w"], np.float32)
  # Shared bits would round both replicas alike; independent ones differ in
  # about half the elements (P(all 512 equal) = 2^-512).
  assert not np.array_equal(first, second)


# --- Memory -----------------------------------------------------------------------------


def _nbytes(tree):
  return sum(leaf.nbytes for leaf in jax.tree.leaves(tree))


def test_bfloat16_stochastic_state_is_half_of_float32():
  params = {"w": jnp.zeros((64, 32)), "b": jnp.zeros(32)}
  float32_state = optaccum.accumulate(optax.sgd(0.1), 4).init(params)
  bfloat16_state = _stochastic(4).init(params)
  assert _nbytes(bfloat16_state.acc_grads) * 2 == _nbytes(float32_state.acc_grads)
  # Everything else is the same scalars, plus the 8-byte key.
  accumulator_saving = _nbytes(float32_state.acc_grads) // 2
  assert _nbytes(float32_state) - _nbytes(bfloat16_state) == accumulator_saving - 8


# --- Bad input --------------------------------------------------------------------------


def test_stochastic_rounding_refuses_complex_leaves():
  # There is no complex bfloat16: a complex leaf would need a complex64 sum.
  with pytest.raises(
    ValueError,
    match=r"`accumulate\(accumulator=optaccum.stochastic_bfloat16\(...\)\)` rounds into "
    r"bfloat16 only, but a leaf of dtype complex64 needs a complex64 accumulator",
  ):
    _stochastic(2).init({"w": jnp.zeros(3, jnp.complex64)})


@pytest.mark.parametrize("value", ["int32", 3, jnp.int32, "nearest"])
def test_bad_accumulator_is_rejected(value):
  with pytest.raises(TypeError, match=r"`accumulate\(accumulator=...\)` must be None, a floating"):
    optaccum.accumulate(optax.sgd(0.1), 2, accumulator=value)


@pytest.mark.parametrize("key", ["0", 1.5, True, jax.random.split(jax.random.key(0), 2)])
def test_bad_rounding_key_is_rejected(key):
  with pytest.raises(
    TypeError, match=r"`stochastic_bfloat16\(key=...\)` must be a single jax.random.key or an int"
  ):
    _stochastic(2, key=key)

"""Skip policies, checked against NumPy."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import optaccum


def test_skip_not_finite_counts_nan_and_inf_across_leaves():
  grads = {"a": jnp.array([1.0, jnp.nan, jnp.inf]), "b": jnp.array([-jnp.inf], jnp.bfloat16)}
  skip, info = optaccum.skip.not_finite(grads, jnp.int32(0), None)
  assert bool(skip) and int(info["num_not_finite"]) == 3


def test_skip_not_finite_accepts_finite_and_none_leaves():
  skip, info = optaccum.skip.not_finite({"a": jnp.ones(3), "b": None}, jnp.int32(0), None)
  assert not bool(skip) and int(info["num_not_finite"]) == 0


@pytest.mark.parametrize("shape", [(300, 1000), (257, 1024), (3, 70_000), (100_003, 1)])
def test_skip_not_finite_counts_large_leaves_in_blocks_like_numpy(shape):
  # Large leaves are counted a block of rows at a time; rows a prime number
  # (257 and 100_003: no divisor to block by) and rows too long for one
  # block take the other ways.
  rng = np.random.default_rng(0)
  values = rng.normal(size=shape).astype(np.float32)
  flat = values.reshape(-1)
  flat[rng.choice(flat.size, 37, replace=False)] = np.nan
  flat[rng.choice(flat.size, 11, replace=False)] = -np.inf
  skip, info = optaccum.skip.not_finite({"w": jnp.asarray(values)}, jnp.int32(0), None)
  assert bool(skip)
  assert int(info["num_not_finite"]) == int(np.sum(~np.isfinite(values)))


def test_skip_large_updates_norm_matches_numpy_in_float32():
  rng = np.random.default_rng(0)
  values = rng.normal(size=50).astype(np.float32)
  grads = {"a": jnp.asarray(values[:20], jnp.bfloat16), "b": jnp.asarray(values[20:])}
  expected = float(np.sum(np.asarray(grads["a"], np.float64) ** 2) + np.sum(values[20:] ** 2.0))
  skip, info = optaccum.skip.large_updates(grads, jnp.int32(0), max_squared_norm=expected + 1)
  np.testing.assert_allclose(float(info["norm_squared"]), expected, rtol=1e-5)
  assert not bool(skip)
  skip, _ = optaccum.skip.large_updates(grads, jnp.int32(0), max_squared_norm=expected - 1)
  assert bool(skip)


def test_skip_large_updates_skips_nan_norm():
  skip, _ = optaccum.skip.large_updates({"a": jnp.array([jnp.nan])}, 0, max_squared_norm=1e9)
  assert bool(skip)

"""Shared test helpers: a small regression model, its data, and tree comparisons."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

IN_FEATURES, HIDDEN, OUT_FEATURES = 6, 5, 3


def init_params(seed: int = 0, dtype: Any = jnp.float32) -> dict[str, jax.Array]:
  """A two-layer MLP's parameters."""
  rng = np.random.default_rng(seed)
  return {
    "w1": jnp.asarray(rng.normal(size=(IN_FEATURES, HIDDEN)) / 2, dtype),
    "b1": jnp.zeros(HIDDEN, dtype),
    "w2": jnp.asarray(rng.normal(size=(HIDDEN, OUT_FEATURES)) / 2, dtype),
    "b2": jnp.zeros(OUT_FEATURES, dtype),
  }


def make_data(num_examples: int, seed: int = 1) -> tuple[jax.Array, jax.Array]:
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(num_examples, IN_FEATURES)).astype(np.float32)
  y = np.sin(x @ rng.normal(size=(IN_FEATURES, OUT_FEATURES))).astype(np.float32)
  return jnp.asarray(x), jnp.asarray(y)


def loss(params: dict[str, jax.Array], x: jax.Array, y: jax.Array) -> jax.Array:
  """Mean squared error over the batch."""
  x = x.astype(params["w1"].dtype)
  hidden = jnp.tanh(x @ params["w1"] + params["b1"])
  prediction = hidden @ params["w2"] + params["b2"]
  return jnp.mean(jnp.square(prediction.astype(jnp.float32) - y))


grad = jax.grad(loss)


def assert_trees_close(actual: Any, expected: Any, *, rtol: float, atol: float = 0.0) -> None:
  """Asserts equal tree structures and leafwise closeness, naming the failing leaf."""
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for (path, a), b in zip(
    jax.tree_util.tree_flatten_with_path(actual)[0], jax.tree.leaves(expected)
  ):
    np.testing.assert_allclose(
      np.asarray(a, np.float64),
      np.asarray(b, np.float64),
      rtol=rtol,
      atol=atol,
      err_msg=f"at {jax.tree_util.keystr(path)}",
    )


def assert_trees_equal(actual: Any, expected: Any) -> None:
  """Asserts equal structures, dtypes and bit-identical leaves."""
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def init_mlp(key: jax.Array, sizes: tuple[int, ...]) -> list[dict[str, jax.Array]]:
  """An MLP's layers, `[{"w": [m, n], "b": [n]}, ...]`, for `sizes` (m, n, ...)."""
  keys = jax.random.split(key, len(sizes) - 1)
  return [
    {"w": jax.random.normal(k, (m, n)) / np.sqrt(m), "b": jnp.full((n,), 0.1)}
    for k, m, n in zip(keys, sizes[:-1], sizes[1:])
  ]


def mlp(params: list[dict[str, jax.Array]], x: jax.Array) -> jax.Array:
  """The MLP of `init_mlp`: tanh between layers, linear output."""
  for layer in params[:-1]:
    x = jnp.tanh(x @ layer["w"] + layer["b"])
  return x @ params[-1]["w"] + params[-1]["b"]

"""Batches the replicas cannot share: `data_parallel`, `per_replica` and `microbatch`.

A batch whose rows do not divide among the replicas, a batch leaf with no rows
axis, and (for `microbatch`) a batch of 0 rows fail at the call, naming it, the
argument and the sizes, rather than inside `shard_map` or a reshape. The device
count is fixed when JAX starts, so the multi-device cases run in the suite's
8-device child (`eight_devices` in conftest.py).
"""

import jax
import jax.numpy as jnp
import pytest

import optaccum

CHECK = """
import json

import jax
import jax.numpy as jnp
import numpy as np

import optaccum

auto = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
explicit = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))


def loss(w, x):
  return jnp.mean((x @ w) ** 2)


def message(call):
  try:
    call()
  except ValueError as error:
    return str(error)
  return "no error"


w = jnp.linspace(-1.0, 1.0, 3)
data_parallel = optaccum.parallel.data_parallel
def mean_grad(w, x):
  return jax.lax.pmean(jax.grad(loss)(w, x), "data")


grad = jax.jit(data_parallel(mean_grad, auto, axis_name="data", batch_argnums=1))
def scaled_grad(w, x, s):
  return jax.grad(loss)(w, x * s)


scaled = jax.jit(data_parallel(scaled_grad, auto, axis_name="data", batch_argnums=(1, 2)))
messages = {
  "data_parallel 12 rows": message(lambda: grad(w, jnp.ones((12, 3)))),
  "data_parallel nested 12 rows": message(
    lambda: jax.jit(data_parallel(
      lambda w, b: jax.grad(loss)(w, b["x"]), auto, axis_name="data", batch_argnums=1
    ))(w, {"x": jnp.ones((12, 3))})
  ),
  "data_parallel float leaf": message(lambda: scaled(w, jnp.ones((16, 3)), 2.0)),
}
split = jax.jit(optaccum.microbatch(jax.value_and_grad(loss), 2, axis_name=("data",)))
per_replica = jax.jit(optaccum.parallel.per_replica(jax.grad(loss), axis_name=("data",)))
with jax.set_mesh(explicit):
  messages["microbatch 0 rows"] = message(lambda: split(w, jnp.ones((0, 3))))
  messages["per_replica 12 rows"] = message(lambda: per_replica(w, jnp.ones((12, 3))))
# 16 rows divide among 8 replicas: the mean of their gradients is the batch's.
x = np.arange(48.0, dtype=np.float32).reshape(16, 3) / 40
mean = np.asarray(grad(w, jnp.asarray(x)), np.float64)
x64, w64 = x.astype(np.float64), np.asarray(w, np.float64)
expected = 2 * x64.T @ (x64 @ w64) / len(x64)
print(json.dumps({"messages": messages, "error": float(np.max(np.abs(mean - expected)))}))
"""


pytestmark = pytest.mark.eight_devices("edges_parallel", code=CHECK)


@pytest.fixture(name="results", scope="module")
def _results(eight_devices):
  return eight_devices


def test_data_parallel_names_a_batch_that_does_not_divide_among_the_replicas(results):
  # Issue 21: shard_map's "axis sizes that are not evenly divisible", naming neither.
  assert results["messages"]["data_parallel 12 rows"] == (
    "`data_parallel(batch_argnums=...)` splits argument 1 along axis 0 among the 8 "
    "replicas of mesh axis 'data', but its leaf at the root is a batch of 12 rows, "
    "which does not divide by 8."
  )
  assert results["messages"]["data_parallel nested 12 rows"] == (
    "`data_parallel(batch_argnums=...)` splits argument 1 along axis 0 among the 8 "
    "replicas of mesh axis 'data', but its leaf at ['x'] is a batch of 12 rows, "
    "which does not divide by 8."
  )


def test_data_parallel_names_a_python_float_in_a_batch_argument(results):
  # Issue 21: shard_map's "in_specs entry which is too long".
  assert results["messages"]["data_parallel float leaf"] == (
    "`data_parallel(batch_argnums=...)` splits argument 2 along axis 0 among the 8 "
    "replicas of mesh axis 'data', but its leaf at the root is a scalar, with no batch "
    "axis to split (pass it outside batch_argnums)."
  )


def test_data_parallel_still_splits_a_batch_that_divides(results):
  assert results["error"] < 1e-5


def test_per_replica_names_a_batch_that_does_not_divide_among_the_replicas(results):
  assert results["messages"]["per_replica 12 rows"] == (
    "`per_replica(axis_name='data')` splits every batch into 8 replicas, but "
    "argument 1 at the root has a batch of 12, which does not divide by 8."
  )


EMPTY = (
  "`microbatch(...)` got a batch of 0 rows: argument 1 at the root has shape (0, 3), "
  "and an empty batch has no micro-batch to take a loss or gradients of. Skip the "
  "call, or pass at least one row per micro-batch."
)


def test_microbatch_refuses_0_rows_on_a_mesh(results):
  # Issue 21: a ShardingTypeError from a reshape of float32[8@data,0,3].
  assert results["messages"]["microbatch 0 rows"] == EMPTY


@pytest.mark.parametrize("jit", [False, True])
def test_microbatch_refuses_0_rows_on_one_device_as_on_a_mesh(jit):
  # Issue 21: on one device 0 rows gave a NaN loss and zero gradients, silently.
  split = optaccum.microbatch(jax.value_and_grad(lambda w, x: jnp.mean((x @ w) ** 2)), 2)
  split = jax.jit(split) if jit else split
  with pytest.raises(ValueError) as error:
    split(jnp.ones(3), jnp.ones((0, 3)))
  assert str(error.value) == EMPTY

"""`microbatch(axis_name=...)` under plain `jax.jit` on any batch size (8 CPU devices).

The device count is fixed when JAX starts, so the check runs in the suite's
8-device child (`eight_devices` in conftest.py).
"""

import pytest

CHECK = """
import json

import jax
import jax.numpy as jnp
import numpy as np

import optaccum

mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))


def loss(w, x):
  return jnp.mean((x @ w) ** 2)


split = jax.jit(optaccum.microbatch(jax.value_and_grad(loss), 4, axis_name=("data",)))
messages = {}
with jax.set_mesh(mesh):
  w = jnp.linspace(-1.0, 1.0, 3)
  for rows in (16, 12):
    try:
      split(w, jnp.ones((rows, 3)))
    except ValueError as error:
      messages[rows] = str(error)
  errors = {}
  for rows in (32, 16):  # 4 rows per replica, and 2 (fewer than k: two micro-batches of 1)
    x = np.arange(rows * 3.0, dtype=np.float32).reshape(rows, 3) / 50
    _, grads = split(w, jnp.asarray(x))
    x64, w64 = x.astype(np.float64), np.asarray(w, np.float64)
    expected = 2 * x64.T @ (x64 @ w64) / len(x64)
    errors[rows] = float(np.max(np.abs(np.asarray(grads, np.float64) - expected)))
print(json.dumps({"messages": messages, "errors": errors}))
"""


pytestmark = pytest.mark.eight_devices("edges_microbatch", code=CHECK)


def test_a_batch_whose_replica_share_k_does_not_divide_gives_the_unsplit_gradient(eight_devices):
  result = eight_devices
  # 16 rows are 2 per replica: k=4 does not divide them, so each replica cuts
  # them into micro-batches of ceil(2 / 4) = 1 row (issue 22: any batch).
  assert "16" not in result["messages"]
  # A batch that does not divide among the replicas keeps the replicas' own message.
  assert result["messages"]["12"] == (
    "`microbatch(axis_name='data')` splits every batch into 8 replicas, but "
    "argument 1 at the root has a batch of 12, which does not divide by 8."
  )
  # Both give the unsplit gradient (float32 against float64).
  assert result["errors"]["32"] < 1e-5
  assert result["errors"]["16"] < 1e-5

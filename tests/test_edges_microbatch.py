"""`microbatch(axis_name=...)`'s batch-size messages name the caller's batch (8 CPU devices).

The device count is fixed when JAX starts, so the check runs in a child
process (`run_python` in conftest.py) with 8 simulated devices.
"""

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
  x = np.arange(96.0, dtype=np.float32).reshape(32, 3) / 50
  _, grads = split(w, jnp.asarray(x))
x64, w64 = x.astype(np.float64), np.asarray(w, np.float64)
expected = 2 * x64.T @ (x64 @ w64) / len(x64)
print(json.dumps({
  "messages": messages,
  "error": float(np.max(np.abs(np.asarray(grads, np.float64) - expected))),
}))
"""


def test_a_batch_that_splits_among_replicas_but_not_into_k_is_named_whole(run_python):
  result = run_python(["-c", CHECK], num_devices=8, timeout=120)
  # Issue 21: it said "has a batch of 2", one replica's share, with no word of
  # the replicas or of the 16 rows the caller passed.
  assert result["messages"]["16"] == (
    "`microbatch(k=4, axis_name=('data',))` splits each replica's rows into k "
    "micro-batches, but argument 1 at the root has a batch of 16 rows, which the 8 "
    "replicas hold as 2 rows each, and 2 does not split into k=4 equal micro-batches. "
    "Pass a batch whose size is a multiple of 32 (8 replicas x k=4), or a k that divides 2."
  )
  # A batch that does not divide among the replicas keeps the replicas' own message.
  assert result["messages"]["12"] == (
    "`microbatch(axis_name=('data',))` splits every batch into 8 replicas, but "
    "argument 1 at the root has a batch of 12, which does not divide by 8."
  )
  # 32 rows (4 per replica) pass the check and give the unsplit gradient.
  assert result["error"] < 1e-5

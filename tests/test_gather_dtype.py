"""`microbatch(gather_dtype=...)`: FSDP parameters cast before the once-per-call gather.

On one device, an Explicit mesh of one replica: the parameters sharded over
"data" are gathered as on eight (the 8-device counts are in
tests/checks/plain_jit.py). References are NumPy sums of gradients taken at the
cast parameters one micro-batch at a time, never the split function itself.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optaccum

K, ROWS = 4, 32


def loss(params, x, y):
  # A mixed-precision model: the inputs in the parameters' dtype.
  x, y = x.astype(params["w1"].dtype), y.astype(params["w1"].dtype)
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  return jnp.mean((h @ params["w2"] - y) ** 2)


def problem(features=64, hidden=2048):
  """A 131 072-entry matrix among the parameters (float32), sharded by rows."""
  rng = np.random.default_rng(0)
  params = {
    "w1": rng.normal(size=(features, hidden)) / np.sqrt(features),
    "b1": np.zeros(hidden),
    "w2": rng.normal(size=(hidden, 1)) / np.sqrt(hidden),
  }
  params = {n: jnp.asarray(v, jnp.float32) for n, v in params.items()}
  x = jnp.asarray(rng.normal(size=(ROWS, features)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(ROWS, 1)), jnp.float32)
  return params, x, y


def mesh(kind=AxisType.Explicit):
  return jax.make_mesh((1,), ("data",), axis_types=(kind,))


def sharded(params, kind=AxisType.Explicit):
  return {n: jax.device_put(v, NamedSharding(mesh(kind), P("data"))) for n, v in params.items()}


# On an Auto mesh XLA places the gather; the cast comes before it all the same.
@pytest.mark.parametrize("kind", [AxisType.Explicit, AxisType.Auto], ids=["explicit", "auto"])
def test_the_gradient_is_taken_at_the_cast_parameters_and_returned_in_their_own_dtype(kind):
  params, x, y = problem()
  split = optaccum.microbatch(
    jax.value_and_grad(loss), K, axis_name="data", gather_dtype=jnp.bfloat16
  )
  with jax.set_mesh(mesh(kind)):
    value, grads = jax.jit(split)(sharded(params, kind), x, y)
  # Reference: each micro-batch's (rows i, i + k, ...) bfloat16 gradient at the
  # bfloat16 parameters, summed in float64, divided by k.
  cast = jax.tree.map(lambda v: v.astype(jnp.bfloat16), params)
  parts = [jax.value_and_grad(loss)(cast, x[i::K], y[i::K]) for i in range(K)]
  for name in params:
    assert grads[name].dtype == jnp.float32
    expected = sum(np.asarray(g[name], np.float64) for _, g in parts) / K
    np.testing.assert_allclose(np.asarray(grads[name]), expected, rtol=1e-5, atol=1e-7)
  # The loss comes back in fn's dtype, bfloat16: to its rounding (8 bits).
  np.testing.assert_allclose(float(value), np.mean([float(v) for v, _ in parts]), rtol=2**-8)
  # Not the float32 gradient: the cast happened (bfloat16 keeps 8 bits).
  exact = jax.grad(loss)(params, x, y)
  assert float(jnp.max(jnp.abs(grads["w1"] - exact["w1"]))) > 0
  np.testing.assert_allclose(
    grads["w1"], exact["w1"], atol=2**-6 * float(jnp.max(jnp.abs(exact["w1"])))
  )


def test_the_parameters_are_cast_before_they_are_gathered():
  params, x, y = problem(features=8, hidden=16)
  split = optaccum.microbatch(
    jax.value_and_grad(loss), K, axis_name="data", gather_dtype=jnp.bfloat16
  )
  with jax.set_mesh(mesh()):
    jaxpr = jax.make_jaxpr(split)(sharded(params), x, y)
  gathers = [
    e
    for e in jaxpr.eqns
    if e.primitive.name == "reshard"
    and "data" in str(e.invars[0].aval.sharding.spec)
    and "data" not in str(e.outvars[0].aval.sharding.spec)
  ]
  assert len(gathers) == 3  # w1, b1, w2, each gathered once per call
  assert {str(e.invars[0].aval.dtype) for e in gathers} == {"bfloat16"}


def test_integer_and_already_narrow_leaves_are_left_as_they_are():
  params, x, y = problem(features=8, hidden=16)
  params = {**params, "w2": params["w2"].astype(jnp.bfloat16), "n": jnp.arange(8, dtype=jnp.int32)}
  seen = {}

  def grad_fn(p, x, y):
    seen.update({n: v.dtype for n, v in p.items()})
    return jax.value_and_grad(lambda q: loss({k: q[k] for k in ("w1", "b1", "w2")}, x, y))(
      {k: p[k] for k in ("w1", "b1", "w2")}
    )

  split = optaccum.microbatch(grad_fn, K, axis_name="data", gather_dtype=jnp.bfloat16)
  with jax.set_mesh(mesh()):
    placed = sharded(params)
    with pytest.raises(ValueError, match=r"must be shaped like its first argument"):
      jax.jit(split)(placed, x, y)  # gradients of three leaves for four parameters
  assert seen == {"w1": jnp.bfloat16, "b1": jnp.bfloat16, "w2": jnp.bfloat16, "n": jnp.int32}


def test_bad_gather_dtype_is_refused_naming_the_call_and_the_value():
  grad_fn = jax.value_and_grad(loss)
  for bad in (jnp.int8, "not a dtype", 3):
    with pytest.raises(TypeError, match=r"`microbatch\(gather_dtype=...\)` must be a floating"):
      optaccum.microbatch(grad_fn, K, axis_name="data", gather_dtype=bad)
  with pytest.raises(ValueError, match=r"needs `axis_name=`, got gather_dtype=bfloat16"):
    optaccum.microbatch(grad_fn, K, gather_dtype=jnp.bfloat16)
  # Inside shard_map the in_specs place the parameters: nothing here gathers them.
  params, x, y = problem(features=8, hidden=16)
  split = optaccum.microbatch(grad_fn, K, axis_name="data", gather_dtype="bfloat16")
  auto = jax.make_mesh((1,), ("data",), axis_types=(AxisType.Auto,))
  inside = jax.shard_map(split, mesh=auto, in_specs=(P(), P("data"), P("data")), out_specs=P())
  with pytest.raises(ValueError, match=r"runs inside `shard_map`.*got gather_dtype=bfloat16"):
    inside(params, x, y)


def test_gather_dtype_refusals_name_the_call_the_argument_and_the_value():
  grad_fn = jax.value_and_grad(loss)
  # float64 (also `float`) would cast nothing; complex is no floating dtype.
  for bad, shown in ((jnp.float64, "float64"), (float, "float64"), (jnp.complex64, "complex64")):
    with pytest.raises(TypeError, match=rf"narrower than float64.*got gather_dtype={shown}\."):
      optaccum.microbatch(grad_fn, K, axis_name="data", gather_dtype=bad)
  # It casts argument 0, the parameters: not when that argument is a batch.
  with pytest.raises(ValueError, match=r"casts the first positional argument.*splits argument 0"):
    optaccum.microbatch(grad_fn, K, axis_name="data", gather_dtype=jnp.bfloat16, batch_argnums=0)
  params, x, y = problem(features=8, hidden=16)
  split = optaccum.microbatch(
    lambda *, p, x, y: grad_fn(p, x, y),
    K,
    axis_name="data",
    gather_dtype=jnp.bfloat16,
    batch_argnames=("x", "y"),
  )
  with jax.set_mesh(mesh()), pytest.raises(ValueError, match=r"passes no positional argument"):
    split(p=sharded(params), x=x, y=y)
  # No mesh in context and no shard_map: the axis is bound nowhere, and the
  # message says so (not that the call runs inside shard_map).
  split = optaccum.microbatch(grad_fn, K, axis_name="data", gather_dtype=jnp.bfloat16)
  with pytest.raises(ValueError, match=r"no axis 'data' here"):
    split(params, x, y)

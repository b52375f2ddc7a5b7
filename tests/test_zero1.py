"""ZeRO-1: AdamW's state sharded over the replicas, parameters replicated (8 CPU devices).

The check (tests/checks/zero1.py) runs in the shared 8-device child
(`eight_devices` in conftest.py); its numbers are counted in the compiled program.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import optaccum

pytestmark = pytest.mark.eight_devices("zero1", module="tests.checks.zero1")


@pytest.fixture(name="results", scope="module")
def _results(eight_devices):
  return eight_devices


FORMS = ["apply_gradients", "update", "microbatch"]
ACROSS_STEPS = ["apply_gradients", "update"]


@pytest.mark.parametrize("form", FORMS)
def test_one_gradient_reduction_and_one_gather_of_the_updates_per_window(results, form):
  result = results[form]
  gradient = result["gradient_bytes"]
  # Once per window, in the closing step: the window's gradient reduced (an
  # all-reduce, sliced into the sharded optimizer: XLA:CPU has no reduce-scatter)
  # and AdamW's sharded updates gathered to the parameters' layout, one leaf each
  # (in one step, by the caller's reshard). microbatch's reduction may carry the
  # loss too (a float32 scalar or two, as the JAX version's compiler keeps them).
  extra = 8 if form == "microbatch" else 0
  assert result["all-reduce"] == 1
  assert gradient <= result["all-reduce bytes"] <= gradient + extra
  assert (result["all-gather"], result["all-gather bytes"]) == (3, gradient)
  assert result["reduce-scatter"] == 0


@pytest.mark.parametrize("form", FORMS)
def test_on_an_auto_mesh_the_window_reduces_and_gathers_once_in_its_closing_step(results, form):
  # XLA picks the layouts and the step pins none. Before shard_optimizer pinned
  # its updates' layout, XLA carried the state's sharding into the updates and
  # the parameters: 12 all-gathers per window, the parameters returned sharded.
  result = results[f"auto {form}"]
  gradient = result["gradient_bytes"]
  if form in ACROSS_STEPS:  # nothing collective on a micro-step that does not close
    assert result["all-reduce on every call"] == result["all-gather on every call"] == 0
  # XLA reduces the window one leaf at a time here (3 leaves; with them a scalar
  # the closing step needs): one gradient's bytes all told.
  assert 1 <= result["all-reduce"] <= 4
  assert gradient <= result["all-reduce bytes"] <= gradient + 16
  assert (result["all-gather"], result["all-gather bytes"]) == (3, gradient)
  assert result["mu_bytes_per_device"] * 8 == result["mu_bytes"]
  assert result["mu_spec"] == "P('data',)"
  assert result["params_spec"] == ["P()"] * 3  # replicated, as given, with no out_shardings
  assert result["relative_error"] < 1e-6


@pytest.mark.parametrize("form", FORMS)
def test_the_state_stays_sharded_the_parameters_replicated_and_equal_to_the_large_batch(
  results, form
):
  result = results[form]
  assert result["mu_bytes_per_device"] * 8 == result["mu_bytes"]
  assert result["params_spec"] == ["P(None, None)"] * 3
  assert result["relative_error"] < 1e-6


@pytest.mark.parametrize("kind", ["explicit", "auto"])
def test_beside_tensor_parallelism_the_moments_shard_over_both_axes_and_train_exactly(
  results, kind
):
  result = results[f"tensor parallel {kind}"]
  assert result["relative_error"] < 1e-6
  # Each moment: over "data" along its first dimension, "model" kept on the second.
  assert result["mu_spec"] == "P('data', 'model')"
  # The parameters keep their layout: on an Auto mesh because shard_optimizer
  # pins its updates' first dimension unsharded (unpinned, XLA returned them
  # sharded over "data" as well).
  assert result["params_spec"] == ["P(None, 'model')"] * 3


def test_init_shards_each_leaf_on_its_first_dimension_the_replicas_divide(results):
  for how in ("eager", "jitted"):
    specs = results["placement"][how]
    assert specs["rows_divide"] == "P('data', None)", specs
    assert specs["columns_divide"] == "P(None, 'data')", specs
    # No dimension of 3 x 5 divides among 8 replicas; a scalar has none: left as they are.
    assert "data" not in specs["none_divides"] and "data" not in specs["count"], specs
  assert results["placement"]["already"] == "P(None, 'data')"


def test_shard_optimizer_refuses_bad_arguments_naming_them():
  with pytest.raises(TypeError, match=r"`shard_optimizer\(inner=...\)` must be an optax"):
    optaccum.parallel.shard_optimizer(lambda g: g)
  with pytest.raises(TypeError, match=r"`shard_optimizer\(axis_name=...\)` must be a mesh axis"):
    optaccum.parallel.shard_optimizer(optax.sgd(0.1), axis_name=("data", "data"))
  tx = optaccum.parallel.shard_optimizer(optax.sgd(0.1, momentum=0.9))
  with pytest.raises(ValueError, match=r"`shard_optimizer\(...\).init\(axis_name='data'\)`"):
    tx.init({"w": jnp.zeros(4)})
  with pytest.raises(TypeError, match=r"shard_optimizer\(...\).init"):
    tx.init({"w": "not an array"})
  # Inside shard_map each device's state is its own: refused, saying where to call it.
  mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  params = {"w": jnp.zeros((2, 3))}
  with jax.set_mesh(mesh):
    state = tx.init(params)
    inside = jax.shard_map(lambda g, s: tx.update(g, s), in_specs=(P(), P()), out_specs=(P(), P()))
    with pytest.raises(
      ValueError,
      match=r"`shard_optimizer\(...\).update\(axis_name='data'\)` runs under plain "
      r"`jax.jit`.*not inside `shard_map`",
    ):
      inside(params, state)


def test_on_one_replica_it_is_the_inner_optimizer():
  mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
  # Not Adam: optax's bias correction fails the suite's strict dtype promotion.
  inner = optax.sgd(0.1, momentum=0.9)
  tx = optaccum.parallel.shard_optimizer(inner)
  params = {"w": jnp.arange(6.0).reshape(2, 3)}
  grads = {"w": jnp.ones((2, 3))}
  with jax.set_mesh(mesh):
    state = tx.init(params)
    for _ in range(2):
      updates, state = jax.jit(tx.update)(grads, state, params)
  expected, reference = None, inner.init(params)
  for _ in range(2):
    expected, reference = inner.update(grads, reference, params)
  np.testing.assert_allclose(updates["w"], expected["w"], rtol=1e-6)
  np.testing.assert_allclose(updates["w"], -0.19 * np.ones((2, 3)), rtol=1e-6)  # -0.1 (1 + 0.9)


def test_without_parameters_to_follow_the_updates_are_gathered_over_the_replicas():
  # An Explicit mesh of one replica: the moments are still typed as sharded over
  # "data". With no typed parameters to follow (none passed, or made off the
  # mesh), the updates are gathered over the replicas rather than left sharded,
  # which would turn replicated parameters sharded through apply_updates.
  mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
  tx = optaccum.parallel.shard_optimizer(optax.sgd(0.1, momentum=0.9))
  off_mesh = {"w": jnp.ones((16, 4))}
  with jax.set_mesh(mesh):
    on_mesh = {"w": jnp.ones((16, 4))}
    for params in (on_mesh, off_mesh):
      state = tx.init(params)
      assert state[0].trace["w"].sharding.spec == P("data", None)
      for given in (params, None):
        updates, _ = jax.jit(tx.update)(params, state, given)
        assert "data" not in str(updates["w"].sharding.spec)
        np.testing.assert_allclose(updates["w"], -0.1 * np.ones((16, 4)), rtol=1e-6)


def test_bfloat16_parameters_and_a_large_leaf_train_as_plain_optax_does():
  # bfloat16 parameters, float32 gradients, a 131 072-entry leaf; one replica of an
  # Explicit mesh, where the moments are still typed as sharded over "data".
  mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
  rng = np.random.default_rng(0)
  start = {
    "w": jnp.asarray(rng.normal(size=(512, 256)), jnp.bfloat16),
    "b": jnp.asarray(rng.normal(size=(256,)), jnp.bfloat16),
  }
  grads = [
    {n: jnp.asarray(rng.normal(size=v.shape), jnp.float32) for n, v in start.items()}
    for _ in range(8)
  ]
  inner = optax.sgd(0.05, momentum=0.9)

  @jax.jit  # one program, as the window's close is: XLA keeps the same excess precision
  def optax_window(mean, state, params):
    with jax.numpy_dtype_promotion("standard"):  # optax's own bfloat16 + float32
      updates, new_state = inner.update(mean, state, params)
      params = optax.apply_updates(params, updates)
    # The state keeps its dtypes from window to window (bfloat16 momentum, as
    # init made it), where optax alone would let float32 gradients widen it.
    return params, jax.tree.map(lambda new, old: new.astype(old.dtype), new_state, state)

  # Reference: plain optax on each window's mean gradient, the float32 sum in
  # order times 1/4 in NumPy (exact in float32: a power of two).
  expected, reference = start, inner.init(start)
  for w in range(2):
    window = grads[4 * w : 4 * w + 4]
    mean = {n: jnp.asarray(sum(np.asarray(g[n]) for g in window) * np.float32(0.25)) for n in start}
    expected, reference = optax_window(mean, reference, expected)
  tx = optaccum.accumulate(optaccum.parallel.shard_optimizer(inner), 4)
  # optax's momentum (bfloat16, from the parameters) meets float32 gradients
  # inside optax: its own promotion, as in the reference.
  with jax.set_mesh(mesh), jax.numpy_dtype_promotion("standard"):
    params = start
    state = tx.init(params)
    step = jax.jit(lambda g, s, p: optaccum.apply_gradients(tx, g, s, p))
    for g in grads:
      params, state = step(g, state, params)
  assert state.inner_opt_state[0].trace["w"].sharding.spec == P("data", None)
  for n in start:
    assert params[n].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.float32(params[n]), np.float32(expected[n]))

"""Equinox models through optaccum: None leaves, integer and bool leaves, a module as argument.

`eqx.filter(model, eqx.is_array)` keeps integer and bool arrays (index tables,
masks) in the tree the optimizer sees, while `eqx.filter_value_and_grad` gives
them a None gradient; Optax's moments of them turn None after an update. The
accumulation keeps no accumulator for them and its state keeps `init`'s
structure, so a `lax.scan` over micro-steps traces.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optaccum

EVERY_K = 4
MICRO_BATCH = 8
WINDOWS = 3
WIDTH = 512  # the hidden layer's weight: 512 x 512, 262144 entries
# sgd with momentum: optax 0.2.8's adam fails strict promotion (see test_equivalence.py).
OPTIMIZER = optax.sgd(0.05, momentum=0.9)


class Net(eqx.Module):
  """An MLP behind a fixed input permutation (int32) and input mask (bool)."""

  mlp: eqx.nn.MLP
  feature_order: jax.Array
  keep: jax.Array

  def __call__(self, x):
    x = jnp.where(self.keep, x[self.feature_order], jnp.zeros((), x.dtype))
    return self.mlp(x)[0]


def make_net():
  mlp = eqx.nn.MLP(8, 1, width_size=WIDTH, depth=2, key=jax.random.key(0))
  return Net(mlp, jnp.arange(8, dtype=jnp.int32)[::-1], jnp.arange(8) % 4 != 0)


def loss_fn(model, x, y):
  return jnp.mean(jnp.square(jax.vmap(model)(x) - y))


grad_fn = eqx.filter_value_and_grad(loss_fn)


def make_batches():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(WINDOWS, EVERY_K * MICRO_BATCH, 8)).astype(np.float32)
  return jnp.asarray(x), jnp.asarray(np.sin(x.sum(-1)).astype(np.float32))


@eqx.filter_jit
def _large_batch_step(model, opt_state, x, y):
  _, grads = grad_fn(model, x, y)
  updates, opt_state = OPTIMIZER.update(grads, opt_state, eqx.filter(model, eqx.is_array))
  return eqx.apply_updates(model, updates), opt_state


def large_batch_optax(model, xs, ys):
  """The reference: plain Optax and `eqx.apply_updates`, one step per whole batch."""
  opt_state = OPTIMIZER.init(eqx.filter(model, eqx.is_array))
  for x, y in zip(xs, ys):
    model, opt_state = _large_batch_step(model, opt_state, x, y)
  return model


def assert_models_close(model, reference):
  leaves = jax.tree.leaves(eqx.filter(model, eqx.is_array))
  ref_leaves = jax.tree.leaves(eqx.filter(reference, eqx.is_array))
  assert max(leaf.size for leaf in leaves) >= 100_000
  for leaf, ref in zip(leaves, ref_leaves, strict=True):
    assert leaf.dtype == ref.dtype
    np.testing.assert_allclose(np.asarray(leaf), np.asarray(ref), rtol=1e-5, atol=2e-6)


def test_model_has_none_integer_and_bool_leaves():
  params = eqx.filter(make_net(), eqx.is_array)
  leaves = jax.tree.leaves(params, is_leaf=lambda x: x is None)
  assert None in leaves
  assert {str(leaf.dtype) for leaf in leaves if leaf is not None} == {"float32", "int32", "bool"}
  _, grads = grad_fn(make_net(), *[b[0] for b in make_batches()])
  assert grads.feature_order is None and grads.keep is None


@pytest.mark.parametrize("path", ["update", "apply_gradients"])
def test_scanned_micro_steps_equal_large_batch_optax(path):
  model = make_net()
  xs, ys = make_batches()
  params, static = eqx.partition(model, eqx.is_array)
  tx = optaccum.accumulate(OPTIMIZER, EVERY_K)
  state = tx.init(params)
  assert state.acc_grads.feature_order is None and state.acc_grads.keep is None

  def micro_step(carry, batch):
    params, state = carry
    _, grads = grad_fn(eqx.combine(params, static), *batch)
    if path == "apply_gradients":
      return optaccum.apply_gradients(tx, grads, state, params), None
    updates, state = tx.update(grads, state, params)
    return (eqx.apply_updates(params, updates), state), None

  micro_batches = jax.tree.map(lambda a: a.reshape(-1, MICRO_BATCH, *a.shape[2:]), (xs, ys))
  # A scan's carry must keep its structure: the state after every micro-step is init's.
  (params, state), _ = jax.jit(lambda c: jax.lax.scan(micro_step, c, micro_batches))(
    (params, state)
  )
  assert int(optaccum.status(state).gradient_step) == WINDOWS
  assert_models_close(eqx.combine(params, static), large_batch_optax(model, xs, ys))


def test_microbatch_takes_the_module_whole_and_equals_large_batch_optax():
  model = make_net()
  xs, ys = make_batches()

  @eqx.filter_jit
  def step(model, opt_state, x, y):
    _, grads = optaccum.microbatch(grad_fn, EVERY_K)(model, x, y)
    updates, opt_state = OPTIMIZER.update(grads, opt_state, eqx.filter(model, eqx.is_array))
    return eqx.apply_updates(model, updates), opt_state

  split, opt_state = model, OPTIMIZER.init(eqx.filter(model, eqx.is_array))
  for x, y in zip(xs, ys):
    split, opt_state = step(split, opt_state, x, y)
  assert_models_close(split, large_batch_optax(model, xs, ys))


def test_flush_with_a_skip_policy_equals_large_batch_optax_on_the_partial_window():
  model = make_net()
  xs, ys = make_batches()
  params, static = eqx.partition(model, eqx.is_array)
  tx = optaccum.accumulate(OPTIMIZER, EVERY_K, skip=optaccum.skip.not_finite)
  state = tx.init(params)
  # Two micro-batches of a window of four, then a flush: one step on those two.
  for i in range(2):
    rows = slice(i * MICRO_BATCH, (i + 1) * MICRO_BATCH)
    _, grads = eqx.filter_jit(grad_fn)(model, xs[0, rows], ys[0, rows])
    updates, state = jax.jit(tx.update)(grads, state, params)
    params = eqx.apply_updates(params, updates)
  updates, state = jax.jit(lambda s, p: optaccum.flush(tx, s, p))(state, params)
  params = eqx.apply_updates(params, updates)
  assert int(optaccum.status(state).gradient_step) == 1
  reference = large_batch_optax(model, xs[:1, : 2 * MICRO_BATCH], ys[:1, : 2 * MICRO_BATCH])
  assert_models_close(eqx.combine(params, static), reference)


def test_microbatch_of_an_equinox_gradient_jits_with_filter_jit_without_warnings():
  # The split function keeps grad_fn's name but no `__wrapped__`, which Equinox's
  # filter_jit would warn about (the suite turns warnings into errors).
  model, (xs, ys) = make_net(), make_batches()
  value, grads = eqx.filter_jit(optaccum.microbatch(grad_fn, EVERY_K))(model, xs[0], ys[0])
  expected_value, expected_grads = grad_fn(model, xs[0], ys[0])
  assert jnp.allclose(value, expected_value, rtol=1e-5)
  for got, expected in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads)):
    assert jnp.allclose(got, expected, rtol=1e-4, atol=1e-6)
  assert optaccum.microbatch(grad_fn, EVERY_K).__name__ == grad_fn.__name__

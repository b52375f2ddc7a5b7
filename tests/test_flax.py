"""Flax train states with `optaccum.accumulate` as `tx`, against large-batch training."""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen, nnx
from flax.training.train_state import TrainState

import optaccum

EVERY_K = 4
MICRO_BATCH = 4
WINDOWS = 3
FEATURES = 5
CLASSES = 3


class LinenMlp(linen.Module):
  @linen.compact
  def __call__(self, x):
    return linen.Dense(CLASSES)(jax.nn.relu(linen.Dense(8)(x)))


class NnxMlp(nnx.Module):
  def __init__(self, rngs):
    self.hidden = nnx.Linear(FEATURES, 8, rngs=rngs)
    self.out = nnx.Linear(8, CLASSES, rngs=rngs)

  def __call__(self, x):
    return self.out(jax.nn.relu(self.hidden(x)))


def classification_windows(seed=0):
  """WINDOWS large batches of EVERY_K * MICRO_BATCH examples."""
  rng = np.random.default_rng(seed)
  size = WINDOWS * EVERY_K * MICRO_BATCH
  x = rng.normal(size=(size, FEATURES)).astype(np.float32)
  y = rng.integers(0, CLASSES, size=size)
  return x.reshape(WINDOWS, EVERY_K * MICRO_BATCH, FEATURES), y.reshape(WINDOWS, -1)


def micro_batches(batch):
  """Splits a large batch into EVERY_K consecutive micro-batches."""
  return np.split(batch, EVERY_K)


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def token_batches(seed=1):
  """Per-token regression data of variable lengths: (x, targets, mask) per window."""
  rng = np.random.default_rng(seed)
  size, length = WINDOWS * EVERY_K * MICRO_BATCH, 6
  x = rng.normal(size=(size, length, FEATURES)).astype(np.float32)
  targets = rng.normal(size=(size, length, CLASSES)).astype(np.float32)
  lengths = rng.integers(1, length + 1, size=size)
  mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.float32)
  shape = (WINDOWS, EVERY_K * MICRO_BATCH)
  return (
    x.reshape(*shape, length, FEATURES),
    targets.reshape(*shape, length, CLASSES),
    mask.reshape(*shape, length),
  )


def token_mean_loss(predictions, targets, mask):
  """Mean squared error over the valid (unmasked) tokens only."""
  per_token = jnp.mean(jnp.square(predictions - targets), axis=-1)
  return jnp.sum(per_token * mask) / jnp.sum(mask)


def test_linen_train_state_with_adamw_matches_large_batch_under_jit():
  # optax 0.2.8's adam computes `decay**count` with mixed dtypes, which strict
  # promotion rejects; that is optax's, not optaccum's, so relax it for adam only.
  with jax.numpy_dtype_promotion("standard"):
    model = LinenMlp()
    xs, ys = classification_windows()
    params = model.init(jax.random.key(0), xs[0, :1])

    @jax.jit
    def train_step(state, x, y):
      def loss_fn(params):
        return cross_entropy(state.apply_fn(params, x), y)

      return state.apply_gradients(grads=jax.grad(loss_fn)(state.params))

    inner = optax.adamw(0.01, weight_decay=0.1)
    large = TrainState.create(apply_fn=model.apply, params=params, tx=inner)
    accumulated = TrainState.create(
      apply_fn=model.apply, params=params, tx=optaccum.accumulate(inner, EVERY_K)
    )
    for x, y in zip(xs, ys):
      large = train_step(large, x, y)
      for x_micro, y_micro in zip(micro_batches(x), micro_batches(y)):
        accumulated = train_step(accumulated, x_micro, y_micro)

  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
    accumulated.params,
    large.params,
  )
  assert int(accumulated.step) == WINDOWS * EVERY_K
  assert int(optaccum.flax.gradient_step(accumulated)) == int(large.step) == WINDOWS


def test_apply_train_state_gradients_weighted_window_equals_token_mean_of_large_batch():
  model = linen.Dense(CLASSES)
  xs, targets, masks = token_batches()
  params = model.init(jax.random.key(0), xs[0, :1])

  def grads_of(state, x, target, mask):
    return jax.grad(lambda p: token_mean_loss(state.apply_fn(p, x), target, mask))(state.params)

  @jax.jit
  def large_step(state, x, target, mask):
    return state.apply_gradients(grads=grads_of(state, x, target, mask))

  @jax.jit
  def micro_step(state, x, target, mask):
    return optaccum.flax.apply_train_state_gradients(
      state, grads=grads_of(state, x, target, mask), weight=jnp.sum(mask)
    )

  large = TrainState.create(apply_fn=model.apply, params=params, tx=optax.sgd(0.5))
  accumulated = TrainState.create(
    apply_fn=model.apply, params=params, tx=optaccum.accumulate(optax.sgd(0.5), EVERY_K)
  )
  for x, target, mask in zip(xs, targets, masks):
    large = large_step(large, x, target, mask)
    for micro in zip(micro_batches(x), micro_batches(target), micro_batches(mask)):
      accumulated = micro_step(accumulated, *micro)

  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
    accumulated.params,
    large.params,
  )
  assert int(accumulated.step) == WINDOWS * EVERY_K


def test_nnx_optimizer_update_forwards_weight_and_matches_large_batch_under_nnx_jit():
  xs, targets, masks = token_batches()
  inner = optax.sgd(0.1, momentum=0.9)
  large_model = NnxMlp(nnx.Rngs(0))
  large = nnx.Optimizer(large_model, inner, wrt=nnx.Param)
  model = NnxMlp(nnx.Rngs(0))
  accumulated = nnx.Optimizer(model, optaccum.accumulate(inner, EVERY_K), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, x, target, mask):
    grads = nnx.grad(lambda model: token_mean_loss(model(x), target, mask))(model)
    optimizer.update(model, grads, weight=jnp.sum(mask))

  for x, target, mask in zip(xs, targets, masks):
    train_step(large_model, large, x, target, mask)
    for micro in zip(micro_batches(x), micro_batches(target), micro_batches(mask)):
      train_step(model, accumulated, *micro)

  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
    nnx.state(model, nnx.Param),
    nnx.state(large_model, nnx.Param),
  )
  assert int(accumulated.step[...]) == WINDOWS * EVERY_K
  assert int(optaccum.flax.gradient_step(accumulated)) == int(large.step[...]) == WINDOWS


def test_flax_gradient_step_reads_a_chained_accumulation_inside_nnx_jit():
  model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
  tx = optax.chain(optax.clip_by_global_norm(1.0), optaccum.accumulate(optax.sgd(0.1), 3))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer):
    grads = nnx.grad(lambda model: jnp.sum(model(jnp.ones((1, 2)))))(model)
    optimizer.update(model, grads)
    return optaccum.flax.gradient_step(optimizer)

  seen = [int(train_step(model, optimizer)) for _ in range(7)]
  assert seen == [0, 0, 1, 1, 1, 2, 2]


def test_flax_gradient_step_rejects_an_object_without_opt_state():
  with pytest.raises(TypeError, match=r"`flax.gradient_step\(state=...\)` must be a flax"):
    optaccum.flax.gradient_step({"params": jnp.zeros(2)})


def test_apply_train_state_gradients_rejects_an_nnx_optimizer():
  model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optaccum.accumulate(optax.sgd(0.1), 2), wrt=nnx.Param)
  with pytest.raises(TypeError, match=r"for nnx.Optimizer pass weight= to"):
    optaccum.flax.apply_train_state_gradients(optimizer, grads=nnx.state(model), weight=1.0)


def test_flax_gradient_step_falls_back_to_the_step_without_accumulation():
  from flax import nnx
  from flax.training.train_state import TrainState

  state = TrainState.create(apply_fn=None, params={"w": jnp.zeros(2)}, tx=optax.sgd(0.1))
  for _ in range(3):
    state = state.apply_gradients(grads={"w": jnp.ones(2)})
  assert int(optaccum.flax.gradient_step(state)) == 3
  model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
  grads = nnx.state(model, nnx.Param)
  optimizer.update(model, grads)
  optimizer.update(model, grads)
  step = nnx.jit(optaccum.flax.gradient_step)(optimizer)
  assert int(step) == 2 and step.dtype == jnp.int32


class _StatsState(TrainState):
  batch_stats: Any = None


def test_apply_train_state_gradients_replaces_fields_and_refuses_unknown_keywords():
  tx = optaccum.accumulate(optax.sgd(1.0), k=2)
  state = _StatsState.create(
    apply_fn=None, params={"w": jnp.zeros(1)}, tx=tx, batch_stats={"mean": jnp.zeros(1)}
  )
  state = optaccum.flax.apply_train_state_gradients(
    state, grads={"w": jnp.ones(1)}, weight=3.0, batch_stats={"mean": jnp.full(1, 7.0)}
  )
  assert float(state.batch_stats["mean"][0]) == 7.0 and int(state.step) == 1
  # The chain path replaces fields too, and passes weight.
  chained = _StatsState.create(
    apply_fn=None,
    params={"w": jnp.zeros(1)},
    tx=optax.chain(optax.scale(1.0), tx),
    batch_stats={"mean": jnp.zeros(1)},
  )
  chained = optaccum.flax.apply_train_state_gradients(
    chained, grads={"w": jnp.ones(1)}, weight=1.0, batch_stats={"mean": jnp.ones(1)}
  )
  assert float(chained.batch_stats["mean"][0]) == 1.0
  with pytest.raises(TypeError, match=r"apply_train_state_gradients\(wieght=...\)` names no field"):
    optaccum.flax.apply_train_state_gradients(state, grads={"w": jnp.ones(1)}, wieght=1.0)
  with pytest.raises(TypeError, match=r"apply_train_state_gradients\(params=...\)`: `params` is"):
    optaccum.flax.apply_train_state_gradients(state, grads={"w": jnp.ones(1)}, params={})
  with pytest.raises(TypeError, match=r"update_args=...\)` must be a dict"):
    optaccum.flax.apply_train_state_gradients(state, grads={"w": jnp.ones(1)}, update_args=[1])


def test_apply_train_state_gradients_passes_update_args_to_the_inner_optimizer():
  seen = []

  def record(updates, state, params=None, *, value):
    seen.append(value)
    return updates, state

  inner = optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), record)
  tx = optaccum.accumulate(inner, k=1)
  state = TrainState.create(apply_fn=None, params={"w": jnp.zeros(1)}, tx=tx)
  optaccum.flax.apply_train_state_gradients(
    state, grads={"w": jnp.ones(1)}, update_args={"value": jnp.float32(2.5)}
  )
  assert len(seen) == 1 and float(seen[0]) == 2.5


def test_apply_train_state_gradients_without_accumulation_is_flax_apply_gradients():
  # Accumulation switched off by configuration: the same call, no branch.
  params = {"w": jnp.arange(3.0)}
  state = TrainState.create(apply_fn=None, params=params, tx=optax.sgd(0.1, momentum=0.9))
  grads = {"w": jnp.array([1.0, -2.0, 3.0])}
  got = optaccum.flax.apply_train_state_gradients(state, grads=grads)
  expected = state.apply_gradients(grads=grads)
  assert jnp.array_equal(got.params["w"], expected.params["w"]) and int(got.step) == 1
  for name, value in (("weight", 2.0), ("flush", True)):
    with pytest.raises(TypeError, match=rf"`apply_train_state_gradients\({name}=...\)` needs an"):
      optaccum.flax.apply_train_state_gradients(state, grads=grads, **{name: value})

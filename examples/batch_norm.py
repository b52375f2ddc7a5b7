"""A small residual CNN with BatchNorm, trained with 4 accumulated micro-batches.

Run: python examples/batch_norm.py

In training mode, `linen.BatchNorm` normalizes each micro-batch by its own
statistics and advances its running statistics (used in evaluation) on every
call: accumulating 4 micro-batches naively advances them 4 times per
optimizer step, each from a quarter of the batch. `optaccum.flax.BatchStatsWindow`,
kept in the train state, collects the window's statistics and replaces the
running statistics once, when the optimizer steps, with those of the whole
batch. The example measures, on scikit-learn's bundled digits (no download):

* the running statistics against the large batch's, after one window and after
  training (from the same parameters): the naive way and the window;
* what cannot be equal: each micro-batch is still normalized by its own
  statistics ("ghost batch norm"), so the gradients, and the parameters after
  training, differ from large-batch training;
* the test accuracy of both trainings, and of the accumulated parameters with
  the naive running statistics.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen
from flax.training import train_state
from sklearn.datasets import load_digits

import optaccum

EVERY_K = 4
BATCH = 256  # examples per optimizer step: 4 micro-batches of 64
STEPS = 60  # optimizer steps
MOMENTUM = 0.9


class ResidualBlock(linen.Module):
  features: int

  @linen.compact
  def __call__(self, x, train):
    norm = functools.partial(linen.BatchNorm, use_running_average=not train, momentum=MOMENTUM)
    y = jax.nn.relu(norm()(linen.Conv(self.features, (3, 3))(x)))
    y = norm()(linen.Conv(self.features, (3, 3))(y))
    return jax.nn.relu(x + y)


class ResNet(linen.Module):
  @linen.compact
  def __call__(self, x, train):
    norm = functools.partial(linen.BatchNorm, use_running_average=not train, momentum=MOMENTUM)
    x = jax.nn.relu(norm()(linen.Conv(16, (3, 3))(x)))
    x = ResidualBlock(16)(x, train)
    x = ResidualBlock(16)(x, train)
    return linen.Dense(10)(jnp.mean(x, axis=(1, 2)))


class TrainState(train_state.TrainState):
  batch_stats: Any
  batch_stats_window: optaccum.flax.BatchStatsWindow


MODEL = ResNet()


def load_data():
  """scikit-learn's 8x8 digits, scaled to [0, 1]: 1438 to train, 359 held out."""
  images, labels = load_digits(return_X_y=True)
  order = np.random.default_rng(0).permutation(len(labels))
  images = (images[order] / 16.0).reshape(-1, 8, 8, 1).astype(np.float32)
  labels = labels[order].astype(np.int32)
  return images[359:], labels[359:], images[:359], labels[:359]


def loss_fn(params, batch_stats, x, y):
  """The training-mode loss; the aux is the `batch_stats` this batch would write."""
  logits, updates = MODEL.apply(
    {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
  )
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return loss, updates["batch_stats"]


grad_fn = jax.value_and_grad(loss_fn, has_aux=True)


@jax.jit
def new_batch_stats(params, batch_stats, x, y):
  """The running statistics after one training-mode apply on `x`."""
  return loss_fn(params, batch_stats, x, y)[1]


@jax.jit
def large_batch_step(state, x, y):
  (_, batch_stats), grads = grad_fn(state.params, state.batch_stats, x, y)
  return state.apply_gradients(grads=grads, batch_stats=batch_stats)


@jax.jit
def micro_step(state, x, y):
  """One micro-step: gradients into the accumulator, statistics into the window."""
  (_, batch_stats), grads = grad_fn(state.params, state.batch_stats, x, y)
  window = state.batch_stats_window.add(batch_stats)
  state = state.apply_gradients(grads=grads)
  # The optimizer stepped: the running statistics advance once, from the whole
  # window; a window the guard dropped (closed, no step) is reset unapplied.
  info = optaccum.status(state.opt_state)
  batch_stats, window = window.close(
    state.batch_stats, momentum=MOMENTUM, when=info.has_updated, reset=info.mini_step == 0
  )
  return state.replace(batch_stats=batch_stats, batch_stats_window=window)


@jax.jit
def accuracy(params, batch_stats, x, y):
  logits = MODEL.apply({"params": params, "batch_stats": batch_stats}, x, train=False)
  return jnp.mean(jnp.argmax(logits, axis=-1) == y)


def relative_error(actual, expected, name):
  """`|a - b| / |b|` over all BatchNorm layers' `name` ("mean" or "var") statistics."""
  is_layer = lambda x: isinstance(x, dict) and sorted(x) == ["mean", "var"]  # noqa: E731
  a = jnp.concatenate([layer[name] for layer in jax.tree.leaves(actual, is_leaf=is_layer)])
  b = jnp.concatenate([layer[name] for layer in jax.tree.leaves(expected, is_leaf=is_layer)])
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def report(label, actual, expected):
  errors = [relative_error(actual, expected, name) for name in ("mean", "var")]
  print(f"  {label}: mean {errors[0]:.1e}, var {errors[1]:.1e}")


def main():
  train_x, train_y, test_x, test_y = load_data()
  variables = MODEL.init(jax.random.key(0), train_x[:1], train=False)
  params, start_stats = variables["params"], variables["batch_stats"]
  inner = optax.adam(3e-3)
  large = TrainState.create(
    apply_fn=MODEL.apply,
    params=params,
    tx=inner,
    batch_stats=start_stats,
    batch_stats_window=optaccum.flax.BatchStatsWindow.create(start_stats),
  )
  accumulated = large.replace(tx=optaccum.accumulate(inner, EVERY_K))
  accumulated = accumulated.replace(opt_state=accumulated.tx.init(params))

  # The naive way keeps `batch_stats=` of every micro-step: the running statistics
  # advance EVERY_K times per window. Training-mode outputs do not read them, so
  # the parameters are those of `accumulated`; only the statistics differ.
  chained = start_stats
  # The large batch's statistics along the accumulated run's own parameters.
  reference = start_stats
  batches = np.random.default_rng(1).integers(0, len(train_x), size=(STEPS, BATCH))
  for step, rows in enumerate(batches):
    x, y = train_x[rows], train_y[rows]
    large = large_batch_step(large, x, y)
    reference = new_batch_stats(accumulated.params, reference, x, y)
    for i in range(EVERY_K):  # micro-batch i: rows i, i + 4, ..., as optaccum.microbatch cuts
      chained = new_batch_stats(accumulated.params, chained, x[i::EVERY_K], y[i::EVERY_K])
      accumulated = micro_step(accumulated, x[i::EVERY_K], y[i::EVERY_K])
    if step == 0:
      print("running statistics after one window, relative error against the large batch's:")
      report("naive (4 chained micro-batch updates)", chained, reference)
      report("BatchStatsWindow", accumulated.batch_stats, reference)
      # The first BatchNorm sees the large batch's inputs; deeper ones see inputs
      # normalized by micro-batch statistics, so theirs can only come close.
      first, first_reference = accumulated.batch_stats["BatchNorm_0"], reference["BatchNorm_0"]
      report("BatchStatsWindow, first BatchNorm layer", first, first_reference)

  print(f"after {STEPS} optimizer steps, same parameters and large-batch statistics:")
  report("naive (4 chained micro-batch updates)", chained, reference)
  report("BatchStatsWindow", accumulated.batch_stats, reference)
  difference = max(
    float(jnp.max(jnp.abs(a - b)))
    for a, b in zip(jax.tree.leaves(accumulated.params), jax.tree.leaves(large.params))
  )
  print(
    f"largest parameter difference from large-batch training (ghost batch norm): {difference:.1e}"
  )
  print(f"optimizer steps: {int(optaccum.flax.gradient_step(accumulated))}")
  print("test accuracy:")
  print(f"  large batch: {float(accuracy(large.params, large.batch_stats, test_x, test_y)):.4f}")
  for label, stats in (("BatchStatsWindow", accumulated.batch_stats), ("naive", chained)):
    value = float(accuracy(accumulated.params, stats, test_x, test_y))
    print(f"  accumulated, {label} statistics: {value:.4f}")


if __name__ == "__main__":
  main()

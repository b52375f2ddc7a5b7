"""An NNX model trained with `nnx.Optimizer(model, optaccum.accumulate(...))` under `nnx.jit`.

Run: python examples/nnx_model.py

`optimizer.step` counts `update` calls, that is micro-steps;
`optaccum.flax.gradient_step(optimizer)` counts optimizer steps (it works inside
`nnx.jit` too). A learning-rate schedule given to the inner optimizer advances
once per optimizer step, as in large-batch training; the loop logs the rate the
next step will use by reading the schedule at the gradient step.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import optaccum

EVERY_K = 3
MICRO_BATCH = 8
STEPS = 30  # optimizer steps
CLASSES = 4


class Classifier(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(6, 32, rngs=rngs)
    self.out = nnx.Linear(32, CLASSES, rngs=rngs)

  def __call__(self, x):
    return self.out(jax.nn.relu(self.hidden(x)))


def make_batches(rng):
  """STEPS large batches of 4 Gaussian blobs in 6 dimensions."""
  centers = rng.normal(scale=3.0, size=(CLASSES, 6))
  labels = rng.integers(0, CLASSES, size=(STEPS, EVERY_K * MICRO_BATCH))
  x = centers[labels] + rng.normal(size=labels.shape + (6,))
  return x.astype(np.float32), labels.astype(np.int32)


@nnx.jit
def train_step(model, optimizer, x, labels):
  def loss_fn(model):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), labels).mean()

  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)
  return loss


def new_optimizer(model, schedule, k=None):
  inner = optax.sgd(schedule, momentum=0.9)
  tx = inner if k is None else optaccum.accumulate(inner, k)
  return nnx.Optimizer(model, tx, wrt=nnx.Param)


def main():
  xs, labels = make_batches(np.random.default_rng(0))
  schedule = optax.linear_schedule(0.1, 0.01, transition_steps=STEPS)
  model = Classifier(nnx.Rngs(0))
  optimizer = new_optimizer(model, schedule, k=EVERY_K)

  for x, y in zip(xs, labels):
    losses = [
      train_step(model, optimizer, x_micro, y_micro)
      for x_micro, y_micro in zip(np.split(x, EVERY_K), np.split(y, EVERY_K))
    ]
    # A window has just closed: optimizer.step is EVERY_K times the gradient step.
    gradient_step = optaccum.flax.gradient_step(optimizer)
    if int(gradient_step) % 10 == 0:
      print(
        f"gradient step {int(gradient_step):3d} (optimizer.step {int(optimizer.step[...]):3d}): "
        f"loss {float(np.mean(losses)):.4f}, "
        f"next learning rate {float(schedule(gradient_step)):.4f}"
      )

  # The reference: same model and optimizer, one step per whole batch.
  reference = Classifier(nnx.Rngs(0))
  reference_optimizer = new_optimizer(reference, schedule)
  for x, y in zip(xs, labels):
    train_step(reference, reference_optimizer, x, y)
  difference = max(
    float(jnp.max(jnp.abs(a - b)))
    for a, b in zip(
      jax.tree.leaves(nnx.state(model, nnx.Param)),
      jax.tree.leaves(nnx.state(reference, nnx.Param)),
    )
  )
  accuracy = float(jnp.mean(jnp.argmax(model(xs[-1]), axis=-1) == labels[-1]))
  print(f"accuracy on the last batch: {accuracy:.0%}")
  print(f"largest difference from large-batch training: {difference:.1e}")
  assert difference < 1e-5, difference


if __name__ == "__main__":
  main()

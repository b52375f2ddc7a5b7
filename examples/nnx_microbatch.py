"""An NNX model with BatchNorm and Dropout: `microbatch` on the module, and the NNX fast path.

Run: python examples/nnx_microbatch.py

Each training step takes a batch, splits it with `optaccum.microbatch` into
SPLIT micro-batches run one at a time (the memory of one), and hands the batch's
gradient to `optaccum.flax.apply_nnx_gradients`, which accumulates EVERY_K steps
into one optimizer step and writes the parameters only when a window closes.
The module is passed to `microbatch` as it is: its BatchNorm statistics and
dropout rng state are carried from micro-batch to micro-batch and written back.

In evaluation mode (BatchNorm reads its running averages, no dropout) the model
is deterministic, and the run is compared with large-batch training; then the
same loop trains in training mode, where every micro-batch draws its own masks.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import optaccum

SPLIT = 2  # micro-batches per training step (microbatch)
EVERY_K = 3  # training steps per optimizer step (accumulate)
BATCH = 16  # examples per training step
STEPS = 20  # optimizer steps
CLASSES = 4


class Classifier(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(6, 64, rngs=rngs)
    self.norm = nnx.BatchNorm(64, rngs=rngs)
    self.dropout = nnx.Dropout(0.2, rngs=rngs)
    self.out = nnx.Linear(64, CLASSES, rngs=rngs)

  def __call__(self, x):
    return self.out(self.dropout(jax.nn.relu(self.norm(self.hidden(x)))))


def loss_fn(model, x, labels):
  return optax.softmax_cross_entropy_with_integer_labels(model(x), labels).mean()


def make_batches(rng):
  """STEPS large batches of EVERY_K * BATCH examples: 4 Gaussian blobs in 6 dimensions."""
  centers = rng.normal(scale=3.0, size=(CLASSES, 6))
  labels = rng.integers(0, CLASSES, size=(STEPS, EVERY_K * BATCH))
  x = centers[labels] + rng.normal(size=labels.shape + (6,))
  return x.astype(np.float32), labels.astype(np.int32)


@nnx.jit
def train_step(model, optimizer, x, labels):
  loss, grads = optaccum.microbatch(nnx.value_and_grad(loss_fn), SPLIT)(model, x, labels)
  optaccum.flax.apply_nnx_gradients(optimizer, model, grads)
  return loss


@nnx.jit
def large_batch_step(model, optimizer, x, labels):
  optimizer.update(model, nnx.grad(loss_fn)(model, x, labels))


def new_model(train):
  model = Classifier(nnx.Rngs(0))
  if train:
    model.train()
  else:
    model.eval()
  return model


def train(xs, labels, model):
  tx = optaccum.accumulate(optax.sgd(0.05, momentum=0.9), EVERY_K)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  for x, y in zip(xs, labels):
    for x_step, y_step in zip(np.split(x, EVERY_K), np.split(y, EVERY_K)):
      train_step(model, optimizer, x_step, y_step)
  return optimizer


def main():
  xs, labels = make_batches(np.random.default_rng(0))

  model = new_model(train=False)
  optimizer = train(xs, labels, model)
  print(
    f"optimizer.step {int(optimizer.step[...])}, "
    f"gradient step {int(optaccum.flax.gradient_step(optimizer))}"
  )
  reference = new_model(train=False)
  reference_optimizer = nnx.Optimizer(reference, optax.sgd(0.05, momentum=0.9), wrt=nnx.Param)
  for x, y in zip(xs, labels):
    large_batch_step(reference, reference_optimizer, x, y)
  difference = max(
    float(jnp.max(jnp.abs(a - b)))
    for a, b in zip(
      jax.tree.leaves(nnx.state(model, nnx.Param)),
      jax.tree.leaves(nnx.state(reference, nnx.Param)),
    )
  )
  print(f"evaluation mode: largest difference from large-batch training: {difference:.1e}")
  assert difference < 1e-5, difference

  model = new_model(train=True)
  count = int(model.dropout.rngs.count[...])
  train(xs, labels, model)
  draws = int(model.dropout.rngs.count[...]) - count
  model.eval()
  accuracy = float(jnp.mean(jnp.argmax(model(xs[-1]), axis=-1) == labels[-1]))
  print(f"training mode: {draws} dropout masks drawn in {STEPS * EVERY_K} training steps")
  print(f"training mode: accuracy on the last batch {accuracy:.0%}")
  assert draws == STEPS * EVERY_K * SPLIT, draws


if __name__ == "__main__":
  main()

"""A Flax-style train step, micro-batched with a one-line change; metrics as sums.

Run: python examples/closure_metrics.py

The Flax MNIST and ImageNet examples write the loss as a closure over the
batch, `loss_fn(params)`, and return the logits as aux to compute metrics
afterwards. `optaccum.microbatch` needs the batch as an argument to split it:
`optaccum.batch_as_argument(make_loss_fn)` turns a function of the batch that
returns the closure into `loss(params, batch)`. Returning the logits through
`microbatch` (`aux_reduction="concat"`) keeps every micro-batch's logits until
the end of the step; returning the metrics' sums instead (`aux_reduction="sum"`)
keeps two scalars in the scan's carry. The script compares the three steps'
temporaries from XLA's compiled memory analysis, then trains with the
sums-as-aux step and checks its metrics against the unsplit step's.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen
from flax.training.train_state import TrainState
from sklearn.datasets import load_digits

import optaccum

BATCH = 256
NUM_MICROBATCHES = 4
EPOCHS = 3


class Cnn(linen.Module):
  """The Flax MNIST example's CNN, sized for 8 x 8 digits."""

  @linen.compact
  def __call__(self, x):
    x = linen.relu(linen.Conv(16, (3, 3))(x))
    x = linen.relu(linen.Conv(32, (3, 3))(x))
    x = linen.avg_pool(x, (2, 2), strides=(2, 2))
    x = linen.relu(linen.Dense(64)(x.reshape(x.shape[0], -1)))
    return linen.Dense(10)(x)


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def unsplit_step(state, batch):
  """The Flax examples' step: the loss closes over the batch, the logits come back as aux."""

  def loss_fn(params):
    logits = state.apply_fn({"params": params}, batch["image"])
    return jnp.mean(cross_entropy(logits, batch["label"])), logits

  (_, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  return state.apply_gradients(grads=grads), metric_sums(logits, batch["label"])


def metric_sums(logits, labels):
  return {
    "loss_sum": jnp.sum(cross_entropy(logits, labels)),
    "correct": jnp.sum(jnp.argmax(logits, -1) == labels, dtype=jnp.int32),
  }


def logits_as_aux_step(state, batch):
  """The same closure, wrapped in a function of the batch; logits joined back ("concat")."""

  def make_loss(batch):
    def loss_fn(params):
      logits = state.apply_fn({"params": params}, batch["image"])
      return jnp.mean(cross_entropy(logits, batch["label"])), logits

    return loss_fn

  grad_fn = jax.value_and_grad(optaccum.batch_as_argument(make_loss), has_aux=True)
  split = optaccum.microbatch(grad_fn, NUM_MICROBATCHES, has_aux=True, aux_reduction="concat")
  (_, logits), grads = split(state.params, batch)
  return state.apply_gradients(grads=grads), metric_sums(logits, batch["label"])


def sums_as_aux_step(state, batch):
  """The closure returns the metrics' sums; each micro-batch's are added in the carry."""

  def make_loss(batch):
    def loss_fn(params):
      logits = state.apply_fn({"params": params}, batch["image"])
      return jnp.mean(cross_entropy(logits, batch["label"])), metric_sums(logits, batch["label"])

    return loss_fn

  grad_fn = jax.value_and_grad(optaccum.batch_as_argument(make_loss), has_aux=True)
  split = optaccum.microbatch(grad_fn, NUM_MICROBATCHES, has_aux=True, aux_reduction="sum")
  (_, sums), grads = split(state.params, batch)
  return state.apply_gradients(grads=grads), sums


def load_batches():
  """The bundled 8 x 8 digits, in batches of BATCH (the remainder dropped)."""
  digits = load_digits()
  images = (digits.images / 16.0).astype(np.float32)[..., None]
  labels = digits.target.astype(np.int32)
  order = np.random.default_rng(0).permutation(len(labels))
  count = len(labels) // BATCH
  return [
    {"image": images[rows], "label": labels[rows]}
    for rows in np.split(order[: count * BATCH], count)
  ]


def temporaries(step, state, batch):
  """The compiled step's scratch memory, from XLA's memory analysis, in bytes."""
  return jax.jit(step).lower(state, batch).compile().memory_analysis().temp_size_in_bytes


def main():
  batches = load_batches()
  model = Cnn()
  params = model.init(jax.random.key(0), batches[0]["image"])["params"]
  state = TrainState.create(apply_fn=model.apply, params=params, tx=optax.sgd(0.05, momentum=0.9))

  unsplit = temporaries(unsplit_step, state, batches[0])
  print(f"step temporaries, batch {BATCH}, k={NUM_MICROBATCHES} micro-batches:")
  print(f"  unsplit:          {unsplit / 2**20:6.2f} MiB")
  sizes = {}
  for name, step in [("logits as aux", logits_as_aux_step), ("sums as aux", sums_as_aux_step)]:
    size = temporaries(step, state, batches[0])
    print(f"  {name + ':':17} {size / 2**20:6.2f} MiB, {size / unsplit:.2f}x of unsplit")
    sizes[name] = size
  saved = (sizes["logits as aux"] - sizes["sums as aux"]) / 2**10
  logits = BATCH * 10 * 4 / 2**10
  print(f"sums as aux saves {saved:.1f} KiB; the batch's float32 logits are {logits:.1f} KiB")

  unsplit_jit, sums_jit = jax.jit(unsplit_step), jax.jit(sums_as_aux_step)
  reference, split = state, state
  largest_loss_difference, counts_equal = 0.0, True
  for epoch in range(1, EPOCHS + 1):
    loss_sum, correct = 0.0, 0
    for batch in batches:
      reference, expected = unsplit_jit(reference, batch)
      split, sums = sums_jit(split, batch)
      difference = abs(float(sums["loss_sum"]) - float(expected["loss_sum"]))
      largest_loss_difference = max(largest_loss_difference, difference / BATCH)
      counts_equal &= int(sums["correct"]) == int(expected["correct"])
      loss_sum, correct = loss_sum + float(sums["loss_sum"]), correct + int(sums["correct"])
    examples = len(batches) * BATCH
    print(f"epoch {epoch}: loss {loss_sum / examples:.4f}, accuracy {correct / examples:.2%}")
  print(f"correct counts equal to the unsplit step's: {counts_equal}")
  print(f"largest mean-loss difference from the unsplit step: {largest_loss_difference:.1e}")
  assert counts_equal and largest_loss_difference < 1e-5


if __name__ == "__main__":
  main()

"""A linen MLP trained through a `TrainState` whose `tx` accumulates 4 micro-batches.

Run: python examples/linen_mlp.py

`TrainState.step` counts micro-steps (calls to `apply_gradients`);
`optaccum.flax.gradient_step(state)` counts optimizer steps, the ones a
large-batch run would take. The loop logs once per optimizer step, and at the
end checks the parameters against large-batch training on the same data.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen
from flax.training.train_state import TrainState

import optaccum

EVERY_K = 4
MICRO_BATCH = 16
STEPS = 40  # optimizer steps


class Mlp(linen.Module):
  @linen.compact
  def __call__(self, x):
    x = jax.nn.gelu(linen.Dense(32)(x))
    return linen.Dense(1)(x)[..., 0]


def make_batches(rng):
  """STEPS large batches of a noisy regression: y = tanh(x @ w) + noise, x in R^8."""
  w = rng.normal(size=8)
  x = rng.normal(size=(STEPS, EVERY_K * MICRO_BATCH, 8))
  y = np.tanh(x @ w) + 0.05 * rng.normal(size=x.shape[:-1])
  return x.astype(np.float32), y.astype(np.float32)


@jax.jit
def train_step(state, x, y):
  def loss_fn(params):
    return jnp.mean(jnp.square(state.apply_fn(params, x) - y))

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  return state.apply_gradients(grads=grads), loss


def main():
  xs, ys = make_batches(np.random.default_rng(0))
  model = Mlp()
  params = model.init(jax.random.key(0), xs[0])
  inner = optax.adam(3e-2)
  state = TrainState.create(
    apply_fn=model.apply, params=params, tx=optaccum.accumulate(inner, EVERY_K)
  )

  window_losses = []
  for x, y in zip(xs, ys):
    for x_micro, y_micro in zip(np.split(x, EVERY_K), np.split(y, EVERY_K)):
      state, loss = train_step(state, x_micro, y_micro)
      window_losses.append(loss)
      # Log once per optimizer step, by the optimizer's own count.
      if optaccum.status(state.opt_state).has_updated:
        gradient_step = int(optaccum.flax.gradient_step(state))
        if gradient_step % 10 == 0:
          print(
            f"gradient step {gradient_step:3d} (micro-step {int(state.step):3d}): "
            f"loss {float(np.mean(window_losses)):.4f}"
          )
        window_losses = []

  # The reference: the same optimizer on the whole batches, one step per batch.
  reference = TrainState.create(apply_fn=model.apply, params=params, tx=inner)
  for x, y in zip(xs, ys):
    reference, _ = train_step(reference, x, y)
  difference = max(
    float(jnp.max(jnp.abs(a - b)))
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(reference.params))
  )
  print(f"largest difference from large-batch training: {difference:.1e}")
  assert difference < 1e-5, difference


if __name__ == "__main__":
  main()

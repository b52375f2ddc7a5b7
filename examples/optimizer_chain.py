"""An optimizer chain (clip + adamw + warmup-cosine schedule) wrapped by accumulation.

Run: python examples/optimizer_chain.py

Put the whole chain *inside* `optaccum.accumulate`: then it runs once per window,
on the window's mean gradient, exactly as on a large batch. Clipping bounds the
norm of that mean gradient, weight decay is applied once per optimizer step, and
the schedule counts optimizer steps. (`optax.chain(clip, accumulate(adamw))`
would clip each micro-batch instead, which no large-batch run does.)
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen
from flax.training.train_state import TrainState

import optaccum

EVERY_K = 4
MICRO_BATCH = 8
STEPS = 40  # optimizer steps
FEATURES = 10


def make_optimizer():
  # Counted in optimizer steps: 5 steps of warm-up, then cosine decay to step 40.
  schedule = optax.warmup_cosine_decay_schedule(
    init_value=0.0, peak_value=0.2, warmup_steps=5, decay_steps=STEPS, end_value=0.01
  )
  chain = optax.chain(
    optax.clip_by_global_norm(1.0),  # the early, large gradients get clipped
    optax.adamw(schedule, weight_decay=1e-2),
  )
  return chain, schedule


def make_batches(rng):
  """STEPS large batches of a noisy linear regression."""
  w = rng.normal(size=FEATURES)
  x = rng.normal(size=(STEPS, EVERY_K * MICRO_BATCH, FEATURES))
  y = x @ w + 0.1 * rng.normal(size=x.shape[:-1])
  return x.astype(np.float32), y.astype(np.float32)


@jax.jit
def train_step(state, x, y):
  def loss_fn(params):
    return jnp.mean(jnp.square(state.apply_fn(params, x)[..., 0] - y))

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  return state.apply_gradients(grads=grads), loss


def main():
  xs, ys = make_batches(np.random.default_rng(0))
  model = linen.Dense(1)
  params = model.init(jax.random.key(0), xs[0])
  chain, schedule = make_optimizer()
  state = TrainState.create(
    apply_fn=model.apply, params=params, tx=optaccum.accumulate(chain, EVERY_K)
  )

  for x, y in zip(xs, ys):
    losses = []
    for x_micro, y_micro in zip(np.split(x, EVERY_K), np.split(y, EVERY_K)):
      state, loss = train_step(state, x_micro, y_micro)
      losses.append(loss)
    gradient_step = optaccum.flax.gradient_step(state)
    if int(gradient_step) in (1, 5, 10, 20, 40):
      # The rate the window just used: the schedule at the step before it.
      used = float(schedule(gradient_step - 1))
      print(
        f"gradient step {int(gradient_step):2d}: learning rate used {used:.4f}, "
        f"window loss {float(np.mean(losses)):.3f}"
      )

  # The reference: the same chain, one step per whole batch.
  reference = TrainState.create(apply_fn=model.apply, params=params, tx=chain)
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

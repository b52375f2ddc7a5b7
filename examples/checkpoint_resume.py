"""Save a training state with Orbax in the middle of a window; resume it exactly.

Run: python examples/checkpoint_resume.py

The accumulator and its counters are part of the optimizer state, so a
checkpoint taken between two micro-steps of a window holds the window's partial
sum; resuming from it continues the window where it stopped and gives
bit-identical parameters. `optaccum.checkpoint.save` records the window length
too, so restoring with another `k` (or another model) fails with a
message rather than a shape error, or a silently different run.
"""

import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen
from flax.training.train_state import TrainState

import optaccum

EVERY_K = 4
MICRO_STEPS = 12
SAVE_AFTER = 6  # one window closed, two micro-batches into the second


def new_state(seed, k=EVERY_K):
  model = linen.Dense(3)
  params = model.init(jax.random.key(seed), jnp.zeros((1, 5)))
  tx = optaccum.accumulate(optax.adamw(1e-2), k)
  return TrainState.create(apply_fn=model.apply, params=params, tx=tx)


def micro_batch(micro_step):
  """The data of a micro-step, the same in every run (a seeded generator per step)."""
  rng = np.random.default_rng(micro_step)
  return rng.normal(size=(8, 5)).astype(np.float32), rng.normal(size=(8, 3)).astype(np.float32)


@jax.jit
def train_step(state, x, y):
  grads = jax.grad(lambda p: jnp.mean(jnp.square(state.apply_fn(p, x) - y)))(state.params)
  return state.apply_gradients(grads=grads)


def train(state, micro_steps):
  for micro_step in micro_steps:
    state = train_step(state, *micro_batch(micro_step))
  return state


def main():
  uninterrupted = train(new_state(seed=0), range(MICRO_STEPS))

  with tempfile.TemporaryDirectory() as directory:
    path = Path(directory) / f"micro_step_{SAVE_AFTER}"
    state = train(new_state(seed=0), range(SAVE_AFTER))
    optaccum.checkpoint.save(path, state, k=EVERY_K)
    print(f"saved at micro-step {int(state.step)}, mid-window")

    # As in a new process: a fresh state (other initial values) gives the form to restore.
    restored = optaccum.checkpoint.restore(path, new_state(seed=1), k=EVERY_K)
    accumulation = optaccum.status(restored.opt_state).state
    print(
      f"restored: gradient step {int(accumulation.gradient_step)}, "
      f"{int(accumulation.mini_step)} of {EVERY_K} micro-batches into the window"
    )
    resumed = train(restored, range(SAVE_AFTER, MICRO_STEPS))
    identical = all(
      np.array_equal(a, b)
      for a, b in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(uninterrupted.params))
    )
    print(f"resumed parameters bit-identical to the uninterrupted run: {identical}")
    assert identical

    try:
      optaccum.checkpoint.restore(path, new_state(seed=1, k=2), k=2)
    except ValueError as error:
      print(f"restoring with k=2 fails:\n  {error}")
    else:
      raise AssertionError("a checkpoint saved with k=4 restored with k=2")


if __name__ == "__main__":
  main()

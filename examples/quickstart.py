"""Quickstart: accumulate 4 micro-batches of 16 and match one batch of 64.

Run: python examples/quickstart.py
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optaccum


def loss(params, x, y):
  return jnp.mean(jnp.square(x @ params["w"] + params["b"] - y))


def main() -> None:
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(640, 8)), jnp.float32)
  y = jnp.asarray(x @ rng.normal(size=(8, 1)) + 0.1, jnp.float32)
  params = {"w": jnp.zeros((8, 1)), "b": jnp.zeros(1)}
  every_k, micro_batch = 4, 16

  # Large batch: one AdamW step per 64 examples.
  opt = optax.adamw(0.05)
  large, large_state = params, opt.init(params)
  # Accumulated: four micro-batches of 16 per AdamW step.
  tx = optaccum.accumulate(optax.adamw(0.05), every_k)
  small, small_state = params, tx.init(params)

  @jax.jit
  def large_step(params, state, xb, yb):
    updates, state = opt.update(jax.grad(loss)(params, xb, yb), state, params)
    return optax.apply_updates(params, updates), state

  @jax.jit
  def micro_step(params, state, xb, yb):
    grads = jax.grad(loss)(params, xb, yb)
    return optaccum.apply_gradients(tx, grads, state, params)

  for start in range(0, x.shape[0], micro_batch * every_k):
    end = start + micro_batch * every_k
    large, large_state = large_step(large, large_state, x[start:end], y[start:end])
    for micro in range(start, end, micro_batch):
      xb, yb = x[micro : micro + micro_batch], y[micro : micro + micro_batch]
      small, small_state = micro_step(small, small_state, xb, yb)

  difference = max(
    float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(large), jax.tree.leaves(small))
  )
  print(f"optimizer steps taken: {int(optaccum.status(small_state).gradient_step)}")
  print(f"loss, large batch of 64:       {float(loss(large, x, y)):.6f}")
  print(f"loss, 4 x 16 accumulated:      {float(loss(small, x, y)):.6f}")
  print(f"largest difference from large-batch training: {difference:.2e}")


if __name__ == "__main__":
  main()

"""An Equinox MLP trained three ways with optaccum, each equal to large-batch Optax.

Run: python examples/equinox_mlp.py

An Equinox model holds its parameters itself; `eqx.filter(model, eqx.is_array)`
is the tree Optax sees, with None where the model holds something else (the
MLP's activation functions), and `eqx.filter_value_and_grad` returns gradients
of that shape. optaccum takes these trees as they are:

1. `optaccum.accumulate`: `tx.update` once per micro-batch, then `eqx.apply_updates`;
2. `optaccum.apply_gradients`: the fast path, which writes the parameters only
   when a window closes;
3. `optaccum.microbatch`: the whole batch in one step, scanned a micro-batch at
   a time, with the model itself as the first argument.

Each trains on the same batches as plain Optax with one step per whole batch,
and ends at the same parameters up to float32 rounding.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import optaccum

EVERY_K = 4
MICRO_BATCH = 16
STEPS = 25  # optimizer steps
OPTIMIZER = optax.adam(1e-2)
TX = optaccum.accumulate(OPTIMIZER, EVERY_K)


def make_batches(rng):
  """STEPS large batches of a noisy regression: y = tanh(x @ w) + noise, x in R^8."""
  w = rng.normal(size=8)
  x = rng.normal(size=(STEPS, EVERY_K * MICRO_BATCH, 8))
  y = np.tanh(x @ w) + 0.05 * rng.normal(size=x.shape[:-1])
  return x.astype(np.float32), y.astype(np.float32)


def loss_fn(model, x, y):
  return jnp.mean(jnp.square(jax.vmap(model)(x)[:, 0] - y))


grad_fn = eqx.filter_value_and_grad(loss_fn)


@eqx.filter_jit
def optax_step(tx, model, opt_state, x, y):
  """The usual Equinox step; with `tx = TX` it is one accumulation micro-step."""
  _, grads = grad_fn(model, x, y)
  updates, opt_state = tx.update(grads, opt_state, eqx.filter(model, eqx.is_array))
  return eqx.apply_updates(model, updates), opt_state


@eqx.filter_jit
def fast_step(model, opt_state, x, y):
  """One micro-step of the fast path: no tree of zero updates, no parameter write."""
  _, grads = grad_fn(model, x, y)
  params, static = eqx.partition(model, eqx.is_array)
  params, opt_state = optaccum.apply_gradients(TX, grads, opt_state, params)
  return eqx.combine(params, static), opt_state


@eqx.filter_jit
def microbatch_step(model, opt_state, x, y):
  """One optimizer step on the whole batch, EVERY_K micro-batches at a time."""
  _, grads = optaccum.microbatch(grad_fn, EVERY_K)(model, x, y)
  updates, opt_state = OPTIMIZER.update(grads, opt_state, eqx.filter(model, eqx.is_array))
  return eqx.apply_updates(model, updates), opt_state


def largest_difference(model, reference):
  return max(
    float(jnp.max(jnp.abs(a - b)))
    for a, b in zip(
      jax.tree.leaves(eqx.filter(model, eqx.is_array)),
      jax.tree.leaves(eqx.filter(reference, eqx.is_array)),
    )
  )


def main():
  xs, ys = make_batches(np.random.default_rng(0))
  initial = eqx.nn.MLP(8, 1, width_size=64, depth=2, activation=jax.nn.gelu, key=jax.random.key(0))
  params = eqx.filter(initial, eqx.is_array)
  is_none = lambda x: x is None  # noqa: E731
  nones = sum(leaf is None for leaf in jax.tree.leaves(params, is_leaf=is_none))
  print(f"parameter tree: {len(jax.tree.leaves(params))} arrays, {nones} None (activations)")

  reference, opt_state = initial, OPTIMIZER.init(params)
  for x, y in zip(xs, ys):
    reference, opt_state = optax_step(OPTIMIZER, reference, opt_state, x, y)

  accumulated, accumulated_state = initial, TX.init(params)
  fast, fast_state = initial, TX.init(params)
  for x, y in zip(xs, ys):
    for x_micro, y_micro in zip(np.split(x, EVERY_K), np.split(y, EVERY_K)):
      accumulated, accumulated_state = optax_step(
        TX, accumulated, accumulated_state, x_micro, y_micro
      )
      fast, fast_state = fast_step(fast, fast_state, x_micro, y_micro)
  print(f"optimizer steps taken: {int(optaccum.status(fast_state).gradient_step)}")

  split, split_state = initial, OPTIMIZER.init(params)
  for x, y in zip(xs, ys):
    split, split_state = microbatch_step(split, split_state, x, y)

  for name, model in [
    ("accumulate", accumulated),
    ("apply_gradients", fast),
    ("microbatch", split),
  ]:
    difference = largest_difference(model, reference)
    print(f"largest difference from large batch, {name}: {difference:.1e}")
    assert difference < 1e-5, (name, difference)


if __name__ == "__main__":
  main()

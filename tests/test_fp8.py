"""Flax's fp8 "overwrite with gradient" statistics under accumulation, in both forms.

`flax.linen.Fp8DirectDotGeneralOp` keeps amax histories and scales whose "gradients"
are their new values. Within a step (`microbatch`) they must not be averaged:
each is the largest its micro-batches produced, which for the inputs' and the
kernels' is exactly what one forward over the whole batch records. Across steps
(`flax.apply_train_state_gradients`) they replace the old values on every
micro-step, as Flax's own `TrainState.apply_gradients` does. References: the
unsplit call, and Flax's `TrainState.apply_gradients`.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.linen.fp8_ops import OVERWRITE_WITH_GRADIENT as OWG
from flax.training.train_state import TrainState

import optaccum

K = 4


class Model(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Dense(32, dot_general_cls=nn.Fp8DirectDotGeneralOp)(x)
    return nn.Dense(4, dot_general_cls=nn.Fp8DirectDotGeneralOp)(jnp.tanh(h))


MODEL = Model()


def loss(variables, x, y):
  return jnp.mean((MODEL.apply(variables, x) - y) ** 2)


def data(rows=32, seed=0):
  key_x, key_y = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(key_x, (rows, 8)) * jnp.linspace(0.1, 3.0, rows)[:, None]
  return x, jax.random.normal(key_y, (rows, 4))


def test_microbatch_takes_the_largest_statistics_and_sums_only_the_parameters():
  x, y = data()
  variables = MODEL.init(jax.random.key(2), x)
  _, whole = jax.value_and_grad(loss)(variables, x, y)
  _, split = jax.jit(optaccum.microbatch(jax.value_and_grad(loss), K))(variables, x, y)
  for layer in ("Dense_0", "Dense_1"):
    op = "Fp8DirectDotGeneralOp_0"
    ours, theirs = split[OWG][layer][op], whole[OWG][layer][op]
    # The inputs' and kernels' amax over all rows: what one forward records.
    # (To float32 rounding: the split and unsplit programs compile apart.)
    for name in ("input_amax_history", "kernel_amax_history", "input_scale", "kernel_scale"):
      np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-6, atol=0)
    # The output gradients of a micro-batch's mean loss are k times the whole
    # batch's, row for row: the largest a micro-batch's backward pass saw.
    np.testing.assert_allclose(
      ours["output_grad_amax_history"][0], K * theirs["output_grad_amax_history"][0], rtol=1e-6
    )
    np.testing.assert_allclose(
      ours["output_grad_amax_history"][1:], theirs["output_grad_amax_history"][1:], rtol=1e-6
    )
  # The parameters' gradients are still the mean, to fp8's rounding of the output
  # gradients (e4m3: 3 mantissa bits), which differs for k times larger values.
  for a, b in zip(jax.tree.leaves(split["params"]), jax.tree.leaves(whole["params"])):
    assert float(jnp.max(jnp.abs(a - b))) <= 5e-3 * float(jnp.max(jnp.abs(b)))


def beside_flax(tx, seed, micro_steps, update_args=None):
  """`apply_train_state_gradients` and Flax's own `apply_gradients` from one state, step by step.

  Checks after every micro-step that the input's amax history starts with this
  micro-batch's largest magnitude (overwritten, not summed), and at the end
  that the two states' variables agree.
  """
  x, y = data(rows=8 * micro_steps)
  variables = MODEL.init(jax.random.key(seed), x[:8])
  ours = flax_own = TrainState.create(apply_fn=MODEL.apply, params=variables, tx=tx)

  @jax.jit
  def ours_step(state, x, y):
    grads = jax.grad(loss)(state.params, x, y)
    return optaccum.flax.apply_train_state_gradients(state, grads=grads, update_args=update_args)

  @jax.jit
  def flax_step(state, x, y):
    return state.apply_gradients(grads=jax.grad(loss)(state.params, x, y))

  for i in range(micro_steps):
    rows = slice(8 * i, 8 * i + 8)
    ours, flax_own = ours_step(ours, x[rows], y[rows]), flax_step(flax_own, x[rows], y[rows])
    np.testing.assert_array_equal(
      ours.params[OWG]["Dense_0"]["Fp8DirectDotGeneralOp_0"]["input_amax_history"][0],
      jnp.max(jnp.abs(x[rows])),
    )
  for a, b in zip(jax.tree.leaves(ours.params), jax.tree.leaves(flax_own.params)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  return ours


def test_train_state_helper_overwrites_the_statistics_and_accumulates_the_parameters():
  # Not Adam: optax's bias correction fails the suite's strict dtype promotion.
  tx = optaccum.accumulate(optax.sgd(0.05, momentum=0.9), K)
  # Flax's apply_gradients on the same accumulating state is the reference: the
  # statistics change on every micro-step, the parameters once per window.
  ours = beside_flax(tx, seed=2, micro_steps=2 * K)
  assert int(optaccum.flax.gradient_step(ours)) == 2


def test_train_state_helper_without_accumulation_overwrites_the_statistics_with_update_args():
  """Accumulation switched off and `update_args` given: Flax's fp8 step, not a sum of statistics."""
  # Takes `value=` (as reduce_on_plateau does) and ignores it.
  tx = optax.with_extra_args_support(optax.sgd(0.05, momentum=0.9))
  beside_flax(tx, seed=3, micro_steps=2, update_args={"value": jnp.float32(1.0)})

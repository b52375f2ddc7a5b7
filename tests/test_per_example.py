"""`microbatch(per_example=...)`: per-example gradient transforms (DP-SGD) and metrics.

References: per-example gradients from `jax.vmap(jax.grad(loss))` on single rows,
clipped and averaged in float64 NumPy; `optax.microbatching.micro_grad` for the
same computation's values and compiled temporaries.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax import microbatching

import optaccum

CLIP = 3.0


def mlp(params, x):
  return jnp.tanh(x @ params["w1"]) @ params["w2"]


def loss(params, x, y):
  return jnp.mean((mlp(params, x) - y) ** 2)


def clip(grads):
  """DP-SGD's per-example clipping to norm CLIP; the metric is the norm before clipping."""
  norm = optax.tree.norm(grads)
  scale = jnp.minimum(1.0, CLIP / norm)
  return jax.tree.map(lambda g: g * scale, grads), norm


def setup(rows, hidden=32, seed=0):
  rng = np.random.default_rng(seed)
  params = {
    "w1": jnp.asarray(rng.normal(size=(16, hidden)) / 4, jnp.float32),
    "w2": jnp.asarray(rng.normal(size=(hidden, 4)) / 6, jnp.float32),
  }
  x = jnp.asarray(rng.normal(size=(rows, 16)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(rows, 4)), jnp.float32)
  return params, x, y


def reference(params, x, y):
  """Per-example gradients (float64), their norms, and the mean of the clipped ones."""
  grad = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(params, x[:, None], y[:, None])
  grads = {name: np.asarray(g, np.float64) for name, g in grad.items()}
  norms = np.sqrt(sum(np.sum(g.reshape(len(x), -1) ** 2, axis=1) for g in grads.values()))
  scale = np.minimum(1.0, CLIP / norms)
  clipped = {
    name: np.mean(g * scale.reshape((-1,) + (1,) * (g.ndim - 1)), axis=0)
    for name, g in grads.items()
  }
  return clipped, norms


@pytest.mark.parametrize("rows, k", [(32, 4), (10, 4)])  # 10 rows: 3, 3, 3 and 1
def test_clipped_mean_and_per_example_norms_equal_the_numpy_reference(rows, k):
  params, x, y = setup(rows)
  split = jax.jit(optaccum.microbatch(jax.value_and_grad(loss), k, per_example=clip))
  (value, norms), grads = split(params, x, y)
  clipped, ref_norms = reference(params, x, y)
  for name in clipped:
    np.testing.assert_allclose(np.asarray(grads[name], np.float64), clipped[name], atol=2e-7)
  np.testing.assert_allclose(np.asarray(norms, np.float64), ref_norms, rtol=2e-6)  # batch order
  np.testing.assert_allclose(float(value), float(loss(params, x, y)), rtol=2e-6)
  assert np.any(ref_norms > CLIP) and np.any(ref_norms < CLIP)  # both sides of the clip


def test_a_leaf_of_100k_entries_matches_optax_micro_grad_with_no_more_temporaries():
  params, x, y = setup(32, hidden=4096)  # w1 holds 65 536 entries, w2 16 384: 81 920
  params["w1"] = jnp.tile(params["w1"], (2, 1))  # 131 072 entries
  x = jnp.tile(x, (1, 2))

  def norm(grads):
    return optax.tree.norm(grads)

  ours = jax.jit(
    optaccum.microbatch(jax.value_and_grad(loss), 8, per_example=lambda g: (clip(g)[0], norm(g)))
  )
  theirs = jax.jit(
    microbatching.micro_grad(
      loss,
      argnums=0,
      batch_argnums=(1, 2),
      microbatch_size=4,
      accumulator=microbatching.AccumulationType.MEAN,
      transform_fn=lambda g: clip(g)[0],
      metrics_fn=norm,
    )
  )
  (_, norms), grads = ours(params, x, y)
  their_grads, aux = theirs(params, x, y)
  for name in grads:
    np.testing.assert_allclose(grads[name], their_grads[name], rtol=1e-5, atol=1e-8)
  np.testing.assert_allclose(norms, aux.metrics, rtol=1e-6)
  ours_temp = ours.lower(params, x, y).compile().memory_analysis().temp_size_in_bytes
  theirs_temp = theirs.lower(params, x, y).compile().memory_analysis().temp_size_in_bytes
  assert ours_temp <= theirs_temp, (ours_temp, theirs_temp)


def test_a_dp_sgd_step_adds_its_noise_once_per_step():
  # The recipe of docs/distributed.md: clip per example, average, add Gaussian
  # noise of scale sigma * CLIP / B once, then the optimizer.
  params, x, y = setup(16)
  sigma, key = 0.5, jax.random.key(3)
  split = optaccum.microbatch(jax.value_and_grad(loss), 4, per_example=clip)

  @jax.jit
  def step(params, x, y, key):
    (_, _), grads = split(params, x, y)
    keys = dict(zip(sorted(grads), jax.random.split(key, len(grads))))
    noisy = {
      n: g + sigma * CLIP / len(x) * jax.random.normal(keys[n], g.shape) for n, g in grads.items()
    }
    return jax.tree.map(lambda p, g: p - 0.1 * g, params, noisy)

  new = step(params, x, y, key)
  clipped, _ = reference(params, x, y)
  keys = dict(zip(sorted(clipped), jax.random.split(key, len(clipped))))
  for name in clipped:
    noise = np.asarray(jax.random.normal(keys[name], clipped[name].shape), np.float64)
    expected = np.asarray(params[name], np.float64) - 0.1 * (
      clipped[name] + sigma * CLIP / 16 * noise
    )
    np.testing.assert_allclose(np.asarray(new[name], np.float64), expected, atol=1e-6)


def test_sum_reduction_sums_the_transformed_gradients():
  params, x, y = setup(8)
  split = optaccum.microbatch(jax.value_and_grad(loss), 2, per_example=clip, reduction="sum")
  (_, _), grads = split(params, x, y)
  clipped, _ = reference(params, x, y)
  for name in clipped:
    np.testing.assert_allclose(np.asarray(grads[name], np.float64), 8 * clipped[name], atol=2e-6)


@pytest.mark.parametrize(
  "kwargs, error, message",
  [
    (
      {"per_example": 3},
      TypeError,
      r"`microbatch\(per_example=\.\.\.\)` must be None or a callable",
    ),
    (
      {"per_example": clip, "has_aux": True},
      ValueError,
      r"`microbatch\(per_example=\.\.\.\)` returns each example's metrics .*got has_aux=True\.",
    ),
    (
      {"per_example": clip, "aux_reduction": "sum"},
      ValueError,
      r"takes neither an aux output of `fn` nor an aux reduction, got aux_reduction='sum'\.",
    ),
  ],
)
def test_bad_per_example_arguments_are_refused_naming_them(kwargs, error, message):
  with pytest.raises(error, match=message):
    optaccum.microbatch(jax.value_and_grad(loss), 2, **kwargs)


@pytest.mark.parametrize(
  "transform, error, message",
  [
    (lambda g: g, TypeError, r"must return `\(grads, metrics\)` for one example's gradients"),
    (
      lambda g: ({"w1": g["w1"]}, 0.0),
      ValueError,
      r"must return gradients of the structure it was given",
    ),
  ],
)
def test_a_transform_that_breaks_its_contract_is_named(transform, error, message):
  params, x, y = setup(4)
  split = optaccum.microbatch(jax.value_and_grad(loss), 2, per_example=transform)
  with pytest.raises(error, match=r"`microbatch\(per_example=\.\.\.\)` " + message):
    split(params, x, y)

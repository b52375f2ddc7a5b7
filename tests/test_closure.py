"""optaccum.batch_as_argument: a closure-style loss, split by microbatch, equals the closure's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optaccum
from tests.helpers import init_mlp, mlp


def make_loss(batch):
  """The Flax examples' shape: `loss_fn(params)` closes over the batch, returns (loss, aux)."""

  def loss_fn(params):
    logits = mlp(params, batch["x"])
    losses = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["label"][:, None], 1)[:, 0]
    correct = jnp.sum(jnp.argmax(logits, -1) == batch["label"], dtype=jnp.int32)
    return jnp.mean(losses), {"loss_sum": jnp.sum(losses), "correct": correct}

  return loss_fn


@pytest.fixture
def params():
  return init_mlp(jax.random.key(0), (6, 32, 4))


@pytest.fixture
def batch():
  kx, ky = jax.random.split(jax.random.key(1))
  return {"x": jax.random.normal(kx, (32, 6)), "label": jax.random.randint(ky, (32,), 0, 4)}


def assert_trees_close(actual, expected):
  jax.tree.map(
    lambda a, e: np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-5, atol=1e-6),
    actual,
    expected,
  )


@pytest.mark.parametrize("num_microbatches", [1, 4, 8])
def test_microbatched_closure_equals_the_closure_on_the_whole_batch(
  params, batch, num_microbatches
):
  grad_fn = jax.value_and_grad(optaccum.batch_as_argument(make_loss), has_aux=True)
  split = optaccum.microbatch(grad_fn, num_microbatches, has_aux=True, aux_reduction="sum")
  (loss, aux), grads = jax.jit(split)(params, batch)
  (expected_loss, expected_aux), expected_grads = jax.value_and_grad(
    make_loss(batch), has_aux=True
  )(params)
  assert_trees_close(
    (loss, grads, aux["loss_sum"]), (expected_loss, expected_grads, expected_aux["loss_sum"])
  )
  assert int(aux["correct"]) == int(expected_aux["correct"])
  assert 0 < int(aux["correct"]) < 32  # a count that could differ


def test_further_arguments_reach_make_loss_fn_and_the_key_splits(params, batch):
  def make_noisy_loss(batch, key, *, scale):
    def loss_fn(params):
      noise = scale * jax.random.normal(key, batch["x"].shape)
      return make_loss({"x": batch["x"] + noise, "label": batch["label"]})(params)[0]

    return loss_fn

  loss = optaccum.batch_as_argument(make_noisy_loss)
  key = jax.random.key(2)
  assert float(loss(params, batch, key, scale=0.5)) == float(
    make_noisy_loss(batch, key, scale=0.5)(params)
  )
  split = optaccum.microbatch(jax.value_and_grad(loss), 4, key_arg=2)
  value, grads = split(params, batch, key, scale=0.5)
  # Micro-batch i: rows i, i + 4, ... and the i-th of 4 keys split from `key`.
  keys = jax.random.split(key, 4)
  rows = lambda i: jax.tree.map(lambda x: x[i::4], batch)  # noqa: E731
  micro = [
    jax.value_and_grad(make_noisy_loss(rows(i), keys[i], scale=0.5))(params) for i in range(4)
  ]
  expected = jax.tree.map(lambda *xs: sum(xs) / 4, *micro)
  assert_trees_close((value, grads), expected)


def test_refuses_a_make_loss_fn_that_is_not_callable():
  with pytest.raises(
    TypeError, match=r"`batch_as_argument\(make_loss_fn=...\)` must be callable.*got make_loss_fn=3"
  ):
    optaccum.batch_as_argument(3)


def test_refuses_a_make_loss_fn_that_returns_no_function(params, batch):
  loss = optaccum.batch_as_argument(lambda batch: jnp.sum(batch["x"]))
  with pytest.raises(
    TypeError, match=r"must return the loss function `loss_fn\(params\)`.*returned ArrayImpl"
  ):
    loss(params, batch)

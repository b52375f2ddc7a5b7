"""Bad input at the Flax helpers: each message names the helper and its own argument.

`apply_train_state_gradients(state, grads=...)` and `apply_nnx_gradients(optimizer,
model, grads)` hand their arguments to the accumulation, whose own checks name
`apply_gradients(updates=...)` or `accumulate(...).update`: calls the user did
not write. The helpers check first, so the message names the call made.
"""

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training.train_state import TrainState

import optaccum

apply_train_state_gradients = optaccum.flax.apply_train_state_gradients
apply_nnx_gradients = optaccum.flax.apply_nnx_gradients
GRADS = {"w": jnp.ones(3)}


def train_state(tx=None):
  tx = optaccum.accumulate(optax.sgd(0.1), 2) if tx is None else tx
  return TrainState.create(apply_fn=None, params={"w": jnp.zeros(3)}, tx=tx)


CHAIN = optax.chain(optax.identity(), optaccum.accumulate(optax.sgd(0.1), 2))


@pytest.mark.parametrize("tx", [None, CHAIN], ids=["fast path", "chain"])
@pytest.mark.parametrize(
  "kwargs, error, message",
  [
    (
      {"weight": True},
      TypeError,
      "`apply_train_state_gradients(weight=...)` must be a number (real, not a bool), "
      "got weight=True.",
    ),
    (
      {"weight": "a"},
      TypeError,
      "`apply_train_state_gradients(weight=...)` must be a number (real, not a bool), "
      "got weight='a'.",
    ),
    (
      {"flush": None},
      TypeError,
      "`apply_train_state_gradients(flush=...)` must be a scalar bool, got flush=None.",
    ),
  ],
)
def test_train_state_weight_and_flush_are_named_as_the_helper_takes_them(
  tx, kwargs, error, message
):
  # Issue 21: named `apply_gradients(weight=...)` (or `accumulate(...).update`).
  with pytest.raises(error) as raised:
    apply_train_state_gradients(train_state(tx), grads=GRADS, **kwargs)
  assert str(raised.value) == message


def test_train_state_weight_of_another_shape_is_named_as_the_helper_takes_it():
  with pytest.raises(ValueError) as raised:
    apply_train_state_gradients(train_state(), grads=GRADS, weight=jnp.ones(2))
  assert str(raised.value) == (
    "`apply_train_state_gradients(weight=...)` must be a scalar, got an array of shape (2,)."
  )


@pytest.mark.parametrize(
  "grads, error, message",
  [
    (
      {"v": jnp.ones(3)},
      ValueError,
      "`apply_train_state_gradients(grads=...)` has a tree structure that does not match "
      "the accumulator built by tx.init(params).",
    ),
    (
      {"w": 1.0},
      TypeError,
      "`apply_train_state_gradients(grads=...)` must hold arrays, but the leaf at ['w'] "
      "is a float: 1.0.",
    ),
    (
      {"w": jnp.ones(4)},
      ValueError,
      "`apply_train_state_gradients(grads=...)` does not match the accumulator built by "
      "tx.init(params) at ['w']: grads has float32[4], the accumulator built by "
      "tx.init(params) has float32[3].",
    ),
    (
      {"w": jnp.ones(3, jnp.int32)},
      TypeError,
      "`apply_train_state_gradients(grads=...)` must hold floating-point arrays, but the "
      "leaf at ['w'] has dtype int32.",
    ),
  ],
)
def test_train_state_grads_unlike_the_accumulator_are_named_grads(grads, error, message):
  # Issue 21: named `apply_gradients(updates=...)`.
  with pytest.raises(error) as raised:
    apply_train_state_gradients(train_state(), grads=grads)
  assert str(raised.value).startswith(message)


class Model(nnx.Module):
  def __init__(self, size=3, name="w"):
    setattr(self, name, nnx.Param(jnp.zeros(size)))


def nnx_setup(tx=None):
  model = Model()
  tx = optaccum.accumulate(optax.sgd(0.1), 2) if tx is None else tx
  return nnx.Optimizer(model, tx, wrt=nnx.Param), model, nnx.state(Model(), nnx.Param)


@pytest.mark.parametrize("tx", [None, CHAIN], ids=["fast path", "chain"])
@pytest.mark.parametrize(
  "model, grads, message",
  [
    (
      None,
      "good",
      "`apply_nnx_gradients(model=...)` must be the NNX module that `optimizer` was made "
      "for, got model=None.",
    ),
    (
      {"w": jnp.zeros(3)},
      "good",
      "`apply_nnx_gradients(model=...)` must be the NNX module that `optimizer` was made "
      "for, got model={'w': Array([0., 0., 0.], dtype=float32)}.",
    ),
    (
      "good",
      None,
      "`apply_nnx_gradients(grads=...)` must be an nnx.State, as `nnx.grad` returns it, "
      "got grads=None.",
    ),
    (
      "good",
      {"w": 1},
      "`apply_nnx_gradients(grads=...)` must be an nnx.State, as `nnx.grad` returns it, "
      "got grads={'w': 1}.",
    ),
  ],
)
def test_nnx_model_and_grads_that_are_not_nnx_objects_are_named(tx, model, grads, message):
  # Issue 21: model=None failed with a raw "pytree structure error".
  optimizer, good_model, good_grads = nnx_setup(tx)
  with pytest.raises(TypeError) as raised:
    apply_nnx_gradients(
      optimizer,
      good_model if model == "good" else model,
      good_grads if grads == "good" else grads,
    )
  assert str(raised.value) == message


@pytest.mark.parametrize("tx", [None, CHAIN], ids=["fast path", "chain"])
@pytest.mark.parametrize(
  "kwargs, message",
  [
    (
      {"weight": "a"},
      "`apply_nnx_gradients(weight=...)` must be a number (real, not a bool), got weight='a'.",
    ),
    ({"flush": None}, "`apply_nnx_gradients(flush=...)` must be a scalar bool, got flush=None."),
  ],
)
def test_nnx_weight_and_flush_are_named_as_the_helper_takes_them(tx, kwargs, message):
  optimizer, model, grads = nnx_setup(tx)
  with pytest.raises(TypeError) as raised:
    apply_nnx_gradients(optimizer, model, grads, **kwargs)
  assert str(raised.value) == message


def test_nnx_grads_of_another_shape_are_named_grads():
  optimizer, model, _ = nnx_setup()
  with pytest.raises(ValueError) as raised:
    apply_nnx_gradients(optimizer, model, nnx.state(Model(4), nnx.Param))
  assert str(raised.value) == (
    "`apply_nnx_gradients(grads=...)` does not match the accumulator built by "
    "tx.init(params) at ['w']: grads has float32[4], the accumulator built by "
    "tx.init(params) has float32[3]."
  )


@pytest.mark.parametrize(
  "other, message",
  [
    (
      Model(4),
      "`apply_nnx_gradients(model=...)` does not match the accumulator in opt_state at "
      "['w']: model has shape (4,), the accumulator (3,).",
    ),
    (
      Model(name="v"),
      "`apply_nnx_gradients(model=...)` has a tree structure that does not match the "
      "accumulator in opt_state.\n  model: PyTreeDef(",
    ),
  ],
)
def test_nnx_a_model_other_than_the_optimizers_is_named(other, message):
  optimizer, _, grads = nnx_setup()
  with pytest.raises(ValueError) as raised:
    apply_nnx_gradients(optimizer, other, grads)
  assert str(raised.value).startswith(message)


@pytest.mark.parametrize("tx", [None, CHAIN], ids=["fast path", "chain"])
def test_nnx_valid_weighted_window_still_steps_on_both_paths(tx):
  # The checks refuse nothing good: a window of weights 3 and 1, sgd(0.1).
  optimizer, model, _ = nnx_setup(tx)
  first, second = np.array([1.0, 2.0, 3.0]), np.array([5.0, -1.0, 0.5])
  for grad, weight in ((first, 3.0), (second, 1.0)):
    state = nnx.State({"w": nnx.Param(jnp.asarray(grad, jnp.float32))})
    apply_nnx_gradients(optimizer, model, state, weight=weight)
  expected = -0.1 * (3 * first + 1 * second) / 4
  np.testing.assert_allclose(np.asarray(model.w[...], np.float64), expected, rtol=1e-6)


def test_without_accumulation_a_train_state_subclass_keeps_its_own_step():
  # A subclass that overrides apply_gradients (here: counting its calls) gets its own
  # step where the optimizer holds no accumulation and no update_args are given.
  from flax import struct

  class Counting(TrainState):
    calls: jnp.ndarray = struct.field(default_factory=lambda: jnp.zeros((), jnp.int32))

    def apply_gradients(self, *, grads, **kwargs):
      return super().apply_gradients(grads=grads, calls=self.calls + 1, **kwargs)

  state = Counting.create(apply_fn=None, params={"w": jnp.ones(2)}, tx=optax.sgd(0.5))
  state = optaccum.flax.apply_train_state_gradients(state, grads={"w": jnp.ones(2)})
  assert int(state.calls) == 1
  np.testing.assert_allclose(state.params["w"], [0.5, 0.5])

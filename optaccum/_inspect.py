"""Reading the accumulation state out of an optimizer state, chains included."""

from __future__ import annotations

from typing import Any

import jax

from optaccum._state import AccumulateState, locate_state


def accumulation_state(opt_state: Any) -> AccumulateState:
  """Returns the one `AccumulateState` inside `opt_state`.

  The state may sit at any depth: inside `optax.chain`, `optax.inject_hyperparams`,
  a Flax `TrainState` or any other pytree.

  Args:
    opt_state: an optimizer state that holds exactly one `AccumulateState`.

  Returns:
    The `AccumulateState`.

  Raises:
    ValueError: if `opt_state` holds none, or more than one.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optaccum
    >>> tx = optax.chain(optax.clip(1.0), optaccum.accumulate(optax.sgd(0.1), 4))
    >>> state = tx.init({"w": jnp.zeros(3)})
    >>> int(optaccum.accumulation_state(state).mini_step)
    0
  """
  leaves, _, position = locate_state("opt_state", opt_state)
  return leaves[position]


def has_updated(opt_state: Any) -> jax.Array:
  """Whether the last update call ran the inner optimizer (closed a window).

  Unlike optax's `MultiSteps.has_updated`, it stays exact after a skipped
  micro-batch and after a window of zero total weight.

  Args:
    opt_state: an optimizer state holding one `AccumulateState`.

  Returns:
    A scalar bool array.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optaccum
    >>> tx = optaccum.accumulate(optax.sgd(0.1), every_k=2)
    >>> params = {"w": jnp.zeros(3)}
    >>> state = tx.init(params)
    >>> _, state = tx.update({"w": jnp.ones(3)}, state, params)
    >>> bool(optaccum.has_updated(state))
    False
    >>> _, state = tx.update({"w": jnp.ones(3)}, state, params)
    >>> bool(optaccum.has_updated(state))
    True
  """
  return accumulation_state(opt_state).emitted


def gradient_step(opt_state: Any) -> jax.Array:
  """The number of optimizer (gradient) steps taken: windows emitted so far.

  A Flax `TrainState.step` counts micro-steps; this counts what the inner
  optimizer saw, so it is what to log against and schedule by.

  Args:
    opt_state: an optimizer state holding one `AccumulateState`.

  Returns:
    A scalar int32 array.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optaccum
    >>> tx = optaccum.accumulate(optax.sgd(0.1), every_k=2)
    >>> params = {"w": jnp.zeros(3)}
    >>> state = tx.init(params)
    >>> for _ in range(5):
    ...   _, state = tx.update({"w": jnp.ones(3)}, state, params)
    >>> int(optaccum.gradient_step(state))
    2
  """
  return accumulation_state(opt_state).gradient_step


def num_skipped(opt_state: Any) -> jax.Array:
  """Micro-batches dropped so far: by the skip policy, or for a bad weight.

  A weight that is NaN, infinite or negative drops its micro-batch; so does a
  `skip=` policy such as `optaccum.skip_not_finite`.

  Args:
    opt_state: an optimizer state holding one `AccumulateState`.

  Returns:
    A scalar int32 array (it saturates at 2**31 - 1).

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optaccum
    >>> tx = optaccum.accumulate(optax.sgd(0.1), every_k=2)
    >>> params = {"w": jnp.zeros(3)}
    >>> _, state = tx.update({"w": jnp.ones(3)}, tx.init(params), params, weight=-1.0)
    >>> int(optaccum.num_skipped(state))
    1
  """
  return accumulation_state(opt_state).num_skipped


def num_skipped_windows(opt_state: Any) -> jax.Array:
  """Windows dropped whole by the window guard: their gradient held a NaN or inf.

  Such a window ran no optimizer step: the parameters, the inner state and
  `gradient_step` stayed as they were.

  Args:
    opt_state: an optimizer state holding one `AccumulateState`.

  Returns:
    A scalar int32 array (it saturates at 2**31 - 1).

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optaccum
    >>> tx = optaccum.accumulate(optax.sgd(0.1), every_k=2)
    >>> params = {"w": jnp.zeros(3)}
    >>> state = tx.init(params)
    >>> _, state = tx.update({"w": jnp.array([1.0, jnp.nan, 1.0])}, state, params)
    >>> updates, state = tx.update({"w": jnp.ones(3)}, state, params)
    >>> updates["w"], int(optaccum.num_skipped_windows(state))
    (Array([0., 0., 0.], dtype=float32), 1)
  """
  return accumulation_state(opt_state).num_skipped_windows


def num_empty_windows(opt_state: Any) -> jax.Array:
  """Windows that closed with zero total weight and so emitted zeros.

  A `flush` of a window that held no micro-batch is not counted.

  Args:
    opt_state: an optimizer state holding one `AccumulateState`.

  Returns:
    A scalar int32 array (it saturates at 2**31 - 1).

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optaccum
    >>> tx = optaccum.accumulate(optax.sgd(0.1), every_k=1)
    >>> params = {"w": jnp.zeros(3)}
    >>> _, state = tx.update({"w": jnp.ones(3)}, tx.init(params), params, weight=0.0)
    >>> int(optaccum.num_empty_windows(state))
    1
  """
  return accumulation_state(opt_state).num_empty_windows

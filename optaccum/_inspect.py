"""Reading the accumulation state out of an optimizer state, chains included."""

from __future__ import annotations

from typing import Any

import jax

from optaccum._accumulate import AccumulateState


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
  found = [
    leaf
    for leaf in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, AccumulateState))
    if isinstance(leaf, AccumulateState)
  ]
  if len(found) != 1:
    raise ValueError(
      "`opt_state` must hold exactly one optaccum AccumulateState (from "
      f"`optaccum.accumulate` or `optaccum.MultiSteps`), found {len(found)} in a "
      f"state of type {type(opt_state).__name__}."
    )
  return found[0]


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

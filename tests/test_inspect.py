"""Finding the accumulation state inside chains and other pytrees."""

from __future__ import annotations

import jax.numpy as jnp
import optax
import pytest

import optaccum


def test_gradient_step_and_has_updated_inside_nested_chain():
  params = {"w": jnp.zeros(2)}
  tx = optax.chain(
    optax.clip(1.0),
    optax.chain(optax.identity(), optaccum.accumulate(optax.sgd(0.1), k=2)),
  )
  state = tx.init(params)
  flags = []
  for _ in range(4):
    _, state = tx.update({"w": jnp.ones(2)}, state, params)
    flags.append(bool(optaccum.status(state).has_updated))
  assert flags == [False, True, False, True]
  assert int(optaccum.status(state).gradient_step) == 2


def test_has_updated_is_false_after_a_skipped_micro_batch():
  params = {"w": jnp.zeros(2)}
  tx = optaccum.accumulate(optax.sgd(0.1), k=1)
  state = tx.init(params)
  _, state = tx.update({"w": jnp.ones(2)}, state, params)
  assert bool(optaccum.status(state).has_updated)
  _, state = tx.update({"w": jnp.full(2, jnp.nan)}, state, params)
  assert not bool(optaccum.status(state).has_updated)  # optax.MultiSteps would say True here


def test_state_without_accumulation_is_rejected():
  state = optax.sgd(0.1).init({"w": jnp.zeros(2)})
  with pytest.raises(ValueError, match=r"exactly one optaccum AccumulateState.*found 0"):
    optaccum.status(state).gradient_step


def test_state_with_two_accumulations_is_rejected():
  params = {"w": jnp.zeros(2)}
  tx = optax.chain(optaccum.accumulate(optax.sgd(0.1), 2), optaccum.accumulate(optax.sgd(0.1), 2))
  with pytest.raises(ValueError, match=r"found 2"):
    optaccum.status(tx.init(params)).has_updated

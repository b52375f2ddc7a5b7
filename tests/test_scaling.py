"""Learning-rate rules for a k-times larger effective batch."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optaccum


@pytest.mark.parametrize(("rule", "factor"), [("linear", 8.0), ("sqrt", math.sqrt(8.0))])
def test_constant_rate_is_scaled_by_rule(rule, factor):
  assert optaccum.planning.scale_learning_rate(0.01, 8, rule=rule) == pytest.approx(0.01 * factor)


def test_schedules_of_rate_and_k_scale_per_step():
  base = optax.linear_schedule(1.0, 0.0, transition_steps=10)
  scaled = optaccum.planning.scale_learning_rate(base, lambda step: 1 + step, rule="sqrt")
  for step in (0, 3, 8):
    expected = float(base(step)) * math.sqrt(1 + step)
    np.testing.assert_allclose(float(scaled(jnp.int32(step))), expected, rtol=1e-6)


def test_scaled_schedule_drives_an_optax_optimizer():
  lr = optaccum.planning.scale_learning_rate(optax.constant_schedule(0.5), 4)
  tx = optaccum.accumulate(optax.sgd(lr), k=4)
  params = {"w": jnp.zeros(1)}
  state = tx.init(params)
  for _ in range(4):
    updates, state = tx.update({"w": jnp.ones(1)}, state, params)
  np.testing.assert_allclose(updates["w"], [-2.0])


@pytest.mark.parametrize("learning_rate", [0.0, -1.0, "0.1", None])
def test_bad_learning_rate_is_rejected(learning_rate):
  with pytest.raises(ValueError, match=r"`scale_learning_rate\(learning_rate=...\)` must be a"):
    optaccum.planning.scale_learning_rate(learning_rate, 2)


def test_bad_rule_is_rejected():
  with pytest.raises(ValueError, match=r"`scale_learning_rate\(rule=...\)` must be one of"):
    optaccum.planning.scale_learning_rate(0.1, 2, rule="cubic")


def test_bad_every_k_is_rejected():
  with pytest.raises(ValueError, match=r"`scale_learning_rate\(k=...\)`"):
    optaccum.planning.scale_learning_rate(0.1, 0)

"""Property test: `accumulate` against a plain NumPy model of windows.

Random trees, window lengths (schedules), weights (zeros included) and skip
patterns (NaN micro-batches); the inner optimizer is the identity, so each
emitted update is the window's gradient itself.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from hypothesis import given, settings
from hypothesis import strategies as st

import optaccum

shapes = st.lists(st.integers(1, 3), min_size=0, max_size=2).map(tuple)


@st.composite
def scenarios(draw):
  leaf_shapes = draw(st.lists(shapes, min_size=1, max_size=3))
  num_steps = draw(st.integers(1, 12))
  window_lengths = draw(st.lists(st.integers(-1, 4), min_size=1, max_size=4))
  weighted = draw(st.booleans())
  weights = draw(
    st.lists(st.sampled_from([0.0, 0.5, 1.0, 3.0, 7.0]), min_size=num_steps, max_size=num_steps)
  )
  skipped = draw(st.lists(st.booleans(), min_size=num_steps, max_size=num_steps))
  reduction = draw(st.sampled_from(["mean", "sum"]))
  seed = draw(st.integers(0, 2**16))
  return leaf_shapes, num_steps, window_lengths, weighted, weights, skipped, reduction, seed


def numpy_reference(grads, weights, skipped, window_lengths, reduction):
  """Windows by hand: skipped micro-batches vanish, k < 1 means 1."""
  acc = [np.zeros_like(g) for g in grads[0]]
  total_weight, count, gradient_step = 0.0, 0, 0
  emitted = []
  for micro_grads, weight, skip in zip(grads, weights, skipped):
    zeros = [np.zeros_like(g) for g in micro_grads]
    if skip:
      emitted.append(zeros)
      continue
    acc = [a + weight * g for a, g in zip(acc, micro_grads)]
    total_weight += weight
    count += 1
    k = max(1, window_lengths[gradient_step % len(window_lengths)])
    if count < k:
      emitted.append(zeros)
      continue
    if total_weight > 0:
      emitted.append([a / total_weight if reduction == "mean" else a for a in acc])
      gradient_step += 1
    else:
      emitted.append(zeros)
    acc = [np.zeros_like(a) for a in acc]
    total_weight, count = 0.0, 0
  return emitted, gradient_step


@settings(max_examples=30, deadline=None)
@given(scenarios())
def test_accumulate_matches_numpy_windows(scenario):
  leaf_shapes, num_steps, window_lengths, weighted, weights, skipped, reduction, seed = scenario
  rng = np.random.default_rng(seed)
  grads = [
    [rng.normal(size=shape).astype(np.float32) for shape in leaf_shapes] for _ in range(num_steps)
  ]
  if not weighted:
    weights = [1.0] * num_steps
  lengths = jnp.asarray(window_lengths, jnp.int32)
  tx = optaccum.accumulate(
    optax.identity(),
    k=lambda step: lengths[step % len(window_lengths)],
    reduction=reduction,
    skip=optaccum.skip.not_finite,
  )
  params = [jnp.zeros(shape, jnp.float32) for shape in leaf_shapes]
  state = tx.init(params)
  # Compiled once per example, as a training step runs it: op by op, each call
  # compiled its branches anew (a second or more per example).
  update = jax.jit(tx.update)
  expected, expected_steps = numpy_reference(grads, weights, skipped, window_lengths, reduction)
  for micro_grads, weight, skip, want in zip(grads, weights, skipped, expected):
    fed = [jnp.asarray(g) for g in micro_grads]
    if skip:
      fed[0] = fed[0].at[...].set(jnp.nan)
    kwargs = {"weight": jnp.float32(weight)} if weighted else {}
    updates, state = update(fed, state, params, **kwargs)
    for got, ref in zip(updates, want):
      np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-6)
  assert int(state.gradient_step) == expected_steps
  assert int(state.num_skipped) == sum(skipped)

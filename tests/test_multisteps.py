"""`optaccum.compat.MultiSteps` runs code written for `optax.MultiSteps` unchanged."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optaccum
from tests import helpers


def _train(opt, params, x, y, micro_batch=4):
  state = opt.init(params)
  flags = []
  for start in range(0, x.shape[0], micro_batch):
    grads = helpers.grad(params, x[start : start + micro_batch], y[start : start + micro_batch])
    updates, state = opt.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    flags.append(bool(opt.has_updated(state)))
  return params, state, flags


@pytest.mark.parametrize("use_grad_mean", [True, False])
def test_same_results_and_fields_as_optax_multisteps(use_grad_mean):
  params = helpers.init_params()
  x, y = helpers.make_data(4 * 9)
  ours = optaccum.compat.MultiSteps(optax.sgd(0.05, momentum=0.9), 3, use_grad_mean=use_grad_mean)
  theirs = optax.MultiSteps(optax.sgd(0.05, momentum=0.9), 3, use_grad_mean=use_grad_mean)
  our_params, our_state, our_flags = _train(ours, params, x, y)
  # optax.MultiSteps itself multiplies a bool by an int32, which strict promotion
  # rejects; only the reference runs under standard promotion.
  with jax.numpy_dtype_promotion("standard"):
    their_params, their_state, their_flags = _train(theirs, params, x, y)
  helpers.assert_trees_close(our_params, their_params, rtol=2e-5, atol=1e-7)
  assert our_flags == their_flags == [False, False, True] * 3
  for field in optax.MultiStepsState._fields:
    assert hasattr(our_state, field)
  assert int(our_state.mini_step) == int(their_state.mini_step)
  assert int(our_state.gradient_step) == int(their_state.gradient_step) == 3


def test_gradient_transformation_and_inner_opt_work_in_a_chain():
  params = {"w": jnp.zeros(2)}
  multi = optaccum.compat.MultiSteps(optax.sgd(1.0), every_k_schedule=2)
  assert isinstance(multi.inner_opt, optax.GradientTransformationExtraArgs)
  tx = optax.chain(optax.scale(2.0), multi.gradient_transformation())
  state = tx.init(params)
  _, state = tx.update({"w": jnp.ones(2)}, state, params)
  updates, state = tx.update({"w": jnp.ones(2)}, state, params)
  np.testing.assert_allclose(updates["w"], [-2.0, -2.0])
  assert bool(optaccum.status(state).has_updated)


def test_skip_function_is_used_and_its_state_kept():
  params = {"w": jnp.zeros(2)}
  multi = optaccum.compat.MultiSteps(
    optax.sgd(1.0), 2, should_skip_update_fn=optaccum.skip.not_finite
  )
  state = multi.init(params)
  _, state = multi.update({"w": jnp.array([jnp.nan, 0.0])}, state, params)
  assert int(state.skip_state["num_not_finite"]) == 1
  assert int(state.mini_step) == 0


def test_bfloat16_grads_pass_strict_promotion():
  params = helpers.init_params(dtype=jnp.bfloat16)
  multi = optaccum.compat.MultiSteps(optax.sgd(0.1, momentum=0.9), 2)
  x, y = helpers.make_data(8)
  new_params, state, _ = _train(multi, params, x, y)
  assert int(state.gradient_step) == 1
  assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(new_params))


@pytest.mark.parametrize("every_k_schedule", [0, -2, 1.5, False])
def test_non_positive_k_is_rejected(every_k_schedule):
  with pytest.raises(ValueError, match=r"`MultiSteps\(every_k_schedule=...\)` must be a positive"):
    optaccum.compat.MultiSteps(optax.sgd(0.1), every_k_schedule)


def test_non_bool_use_grad_mean_is_rejected():
  with pytest.raises(TypeError, match=r"`MultiSteps\(use_grad_mean=...\)` must be a bool"):
    optaccum.compat.MultiSteps(optax.sgd(0.1), 2, use_grad_mean="yes")


def test_bad_should_skip_update_fn_is_rejected():
  with pytest.raises(TypeError, match=r"`MultiSteps\(should_skip_update_fn=...\)` must be None"):
    optaccum.compat.MultiSteps(optax.sgd(0.1), 2, should_skip_update_fn=3)


def test_optax_multisteps_state_converts_and_resumes_mid_window():
  params = {"w": jnp.asarray([0.5, -1.0, 2.0]), "b": jnp.zeros(2)}
  rng = np.random.default_rng(0)
  grads = [
    {
      "w": jnp.asarray(rng.normal(size=3), jnp.float32),
      "b": jnp.asarray(rng.normal(size=2), jnp.float32),
    }
    for _ in range(6)
  ]
  theirs = optax.MultiSteps(optax.adam(0.1), every_k_schedule=3)
  ours = optaccum.compat.MultiSteps(optax.adam(0.1), every_k_schedule=3)
  with jax.numpy_dtype_promotion("standard"):  # optax.MultiSteps fails strict promotion
    ref_params, ref_state = params, theirs.init(params)
    for g in grads:
      updates, ref_state = theirs.update(g, ref_state, ref_params)
      ref_params = optax.apply_updates(ref_params, updates)
    # optax for four micro-steps (one window and one into the next), then optaccum.
    p, s = params, theirs.init(params)
    for g in grads[:4]:
      updates, s = theirs.update(g, s, p)
      p = optax.apply_updates(p, updates)
    s = ours.from_optax_state(s)
    assert int(s.mini_step) == 1 and float(s.acc_weight) == 1.0
    for g in grads[4:]:
      updates, s = ours.update(g, s, p)
      p = optax.apply_updates(p, updates)
  helpers.assert_trees_close(p, ref_params, rtol=1e-6, atol=1e-7)
  assert int(s.gradient_step) == 2


def test_from_optax_state_refuses_other_states():
  ours = optaccum.compat.MultiSteps(optax.sgd(0.1), every_k_schedule=3)
  with pytest.raises(TypeError, match=r"from_optax_state\(state=...\)` must be an optax"):
    ours.from_optax_state(optax.sgd(0.1).init({"w": jnp.zeros(2)}))

"""`optaccum.compat.MultiSteps` runs code written for `optax.MultiSteps` unchanged."""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optaccum
from tests import helpers


def _optax_update(opt):
  """`opt.update` of an `optax.MultiSteps`, compiled under standard promotion.

  optax.MultiSteps multiplies a bool by an int32, which strict promotion
  rejects: only the reference runs under standard promotion.
  """
  compiled = jax.jit(opt.update)

  def update(*args):
    with jax.numpy_dtype_promotion("standard"):
      return compiled(*args)

  return update


def _train(opt, update, params, x, y, micro_batch=4):
  state = opt.init(params)
  flags = []
  for start in range(0, x.shape[0], micro_batch):
    grads = helpers.grad(params, x[start : start + micro_batch], y[start : start + micro_batch])
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    flags.append(bool(opt.has_updated(state)))
  return params, state, flags


def _random_trees(shapes, count, dtype, seed=0):
  rng = np.random.default_rng(seed)
  return [
    {name: jnp.asarray(rng.normal(size=shape), dtype) for name, shape in shapes.items()}
    for _ in range(count)
  ]


def _dtype(x):
  return jnp.dtype(x.dtype)


SHAPES = {"w": (4, 3), "b": (3,)}
# optax.adam fails strict promotion itself; a momentum SGD has a state and passes.
MOMENTUM = lambda: optax.sgd(0.1, momentum=0.9)  # noqa: E731


@pytest.mark.parametrize("use_grad_mean", [True, False])
def test_same_results_and_fields_as_optax_multisteps(use_grad_mean):
  params = helpers.init_params()
  x, y = helpers.make_data(4 * 9)
  ours = optaccum.compat.MultiSteps(optax.sgd(0.05, momentum=0.9), 3, use_grad_mean=use_grad_mean)
  theirs = optax.MultiSteps(optax.sgd(0.05, momentum=0.9), 3, use_grad_mean=use_grad_mean)
  our_params, our_state, our_flags = _train(ours, jax.jit(ours.update), params, x, y)
  their_params, their_state, their_flags = _train(theirs, _optax_update(theirs), params, x, y)
  helpers.assert_trees_close(our_params, their_params, rtol=2e-5, atol=1e-7)
  assert our_flags == their_flags == [False, False, True] * 3
  assert optaccum.compat.MultiStepsState._fields[:5] == optax.MultiStepsState._fields
  for field in optax.MultiStepsState._fields:
    helpers.assert_trees_close(getattr(our_state, field), getattr(their_state, field), rtol=2e-5)


def test_constructor_takes_optax_arguments_in_optax_order():
  ours = inspect.signature(optaccum.compat.MultiSteps).parameters
  theirs = inspect.signature(optax.MultiSteps).parameters
  assert list(ours)[: len(theirs)] == list(theirs)
  for name, parameter in theirs.items():
    assert ours[name].kind == parameter.kind, name
    if name != "accumulator_dtype":  # None: float32 for 16- and 32-bit parameters
      assert ours[name].default == parameter.default, name
  extras = [name for name, parameter in ours.items() if name not in theirs]
  assert extras == ["window_guard"]
  assert all(ours[name].kind == inspect.Parameter.KEYWORD_ONLY for name in extras)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("use_grad_mean", [True, False])
def test_acc_grads_equal_optax_after_each_micro_step(dtype, use_grad_mean):
  params = _random_trees(SHAPES, 1, dtype, seed=1)[0]
  grads = _random_trees(SHAPES, 8, dtype)
  ours = optaccum.compat.MultiSteps(MOMENTUM(), 3, use_grad_mean=use_grad_mean)
  theirs = optax.MultiSteps(MOMENTUM(), 3, use_grad_mean=use_grad_mean)
  our_update, their_update = jax.jit(ours.update), _optax_update(theirs)
  our_params, our_state = params, ours.init(params)
  their_params, their_state = params, theirs.init(params)
  helpers.assert_trees_equal(our_state.acc_grads, their_state.acc_grads)
  for g in grads:
    our_updates, our_state = our_update(g, our_state, our_params)
    their_updates, their_state = their_update(g, their_state, their_params)
    assert int(our_state.mini_step) == int(their_state.mini_step)
    assert jax.tree.map(_dtype, our_state.acc_grads) == {"w": jnp.float32, "b": jnp.float32}
    helpers.assert_trees_close(our_state.acc_grads, their_state.acc_grads, rtol=1e-6, atol=1e-7)
    assert jax.tree.map(_dtype, our_updates) == jax.tree.map(_dtype, their_updates)
    our_params = optax.apply_updates(our_params, our_updates)
    their_params = optax.apply_updates(their_params, their_updates)
  # bfloat16: one rounding step apart at most where the two means round differently.
  tolerance = 1e-6 if dtype == jnp.float32 else 1e-2
  helpers.assert_trees_close(our_params, their_params, rtol=tolerance, atol=tolerance)


def test_logged_acc_grads_norms_equal_optax():
  params = _random_trees(SHAPES, 1, jnp.float32, seed=1)[0]
  ours = optaccum.compat.MultiSteps(MOMENTUM(), every_k_schedule=4)
  theirs = optax.MultiSteps(MOMENTUM(), every_k_schedule=4)

  def norms(opt, update):
    state, logged = opt.init(params), []
    for g in _random_trees(SHAPES, 10, jnp.float32):
      _, state = update(g, state, params)
      logged.append(float(optax.tree.norm(state.acc_grads)))
    return logged

  our_norms = norms(ours, jax.jit(ours.update))
  their_norms = norms(theirs, _optax_update(theirs))
  np.testing.assert_allclose(our_norms, their_norms, rtol=1e-6)
  assert our_norms[3] == our_norms[7] == 0.0 and our_norms[0] > 0.0


def _marked_sgd(calls):
  """SGD whose update is recognisable in a jaxpr (erf_inv) and counts its runs."""

  def update(updates, state, params=None):
    del params
    jax.debug.callback(lambda: calls.append(1))
    return jax.tree.map(lambda g: -jax.lax.erf_inv(jnp.tanh(g) * 0.5), updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _places(jaxpr, primitive, enclosing=()):
  """The primitives enclosing each `primitive` equation in `jaxpr`, nested jaxprs included."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == primitive:
      found.append(enclosing)
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's Jaxpr
        if hasattr(sub, "eqns"):
          found += _places(sub, primitive, (*enclosing, eqn.primitive.name))
  return found


def test_inner_optimizer_is_traced_once_and_runs_once_per_window():
  params = {"w": jnp.zeros(3), "b": jnp.zeros(2)}
  grads = _random_trees({"w": (3,), "b": (2,)}, 6, jnp.float32)
  our_calls, their_calls = [], []
  ours = optaccum.compat.MultiSteps(_marked_sgd(our_calls), every_k_schedule=3)
  theirs = optax.MultiSteps(_marked_sgd(their_calls), every_k_schedule=3)

  state = ours.init(params)
  places = _places(jax.make_jaxpr(ours.update)(grads[0], state, params).jaxpr, "erf_inv")
  assert len(places) == 2  # one per leaf: the inner update is in the program once
  assert all("cond" in enclosing for enclosing in places)

  update = jax.jit(ours.update)
  for g in grads:
    _, state = update(g, state, params)
  jax.effects_barrier()
  assert len(our_calls) == 2  # two windows of three micro-batches

  update = _optax_update(theirs)
  state = theirs.init(params)
  for g in grads:
    _, state = update(g, state, params)
  jax.effects_barrier()
  assert len(their_calls) == 6  # optax runs it on every micro-step


def test_eager_update_equals_jitted_update():
  params = _random_trees(SHAPES, 1, jnp.float32, seed=1)[0]
  opt = optaccum.compat.MultiSteps(MOMENTUM(), every_k_schedule=2)
  eager, traced = opt.init(params), opt.init(params)
  update = jax.jit(opt.update)
  for g in _random_trees(SHAPES, 3, jnp.float32):
    eager_updates, eager = opt.update(g, eager, params)
    traced_updates, traced = update(g, traced, params)
    helpers.assert_trees_close(eager_updates, traced_updates, rtol=1e-6)
    helpers.assert_trees_close(eager, traced, rtol=1e-6)


def test_python_weight_and_flush_reach_the_core():
  params = {"w": jnp.zeros(2)}
  opt = optaccum.compat.MultiSteps(optax.sgd(1.0), every_k_schedule=4)
  state = opt.init(params)
  _, state = opt.update({"w": jnp.array([1.0, 1.0])}, state, params, weight=3.0)
  _, state = opt.update({"w": jnp.array([5.0, 9.0])}, state, params, weight=jnp.float32(1.0))
  np.testing.assert_allclose(state.acc_grads["w"], [2.0, 3.0])  # the weighted mean
  assert float(state.acc_weight) == 4.0
  updates, state = opt.update({"w": jnp.zeros(2)}, state, params, weight=0.0, flush=True)
  np.testing.assert_allclose(updates["w"], [-2.0, -3.0])
  assert bool(opt.has_updated(state)) and int(state.gradient_step) == 1


def test_gradient_transformation_and_inner_opt_work_in_a_chain():
  params = {"w": jnp.zeros(2)}
  multi = optaccum.compat.MultiSteps(optax.sgd(1.0), every_k_schedule=2)
  assert isinstance(multi.inner_opt, optax.GradientTransformationExtraArgs)
  tx = optax.chain(optax.scale(2.0), multi.gradient_transformation())
  state = tx.init(params)
  _, state = tx.update({"w": jnp.ones(2)}, state, params)
  assert not bool(multi.has_updated(state))
  updates, state = tx.update({"w": jnp.ones(2)}, state, params)
  np.testing.assert_allclose(updates["w"], [-2.0, -2.0])
  assert bool(multi.has_updated(state))


def test_has_updated_refuses_a_state_without_multisteps_state():
  multi = optaccum.compat.MultiSteps(optax.sgd(1.0), every_k_schedule=2)
  state = optax.sgd(1.0).init({"w": jnp.zeros(2)})
  with pytest.raises(ValueError, match=r"`MultiSteps.has_updated\(state=...\)` must hold exactly"):
    multi.has_updated(state)


def test_update_refuses_an_optax_state():
  params = {"w": jnp.zeros(2)}
  multi = optaccum.compat.MultiSteps(optax.sgd(1.0), every_k_schedule=2)
  state = optax.MultiSteps(optax.sgd(1.0), every_k_schedule=2).init(params)
  with pytest.raises(TypeError, match=r"`MultiSteps.update\(state=...\)` must be the optaccum"):
    multi.update({"w": jnp.ones(2)}, state, params)


def test_skip_function_is_used_and_its_state_kept():
  params = {"w": jnp.zeros(2)}
  multi = optaccum.compat.MultiSteps(
    optax.sgd(1.0), 2, should_skip_update_fn=optaccum.skip.not_finite
  )
  state = multi.init(params)
  _, state = multi.update({"w": jnp.array([jnp.nan, 0.0])}, state, params)
  assert int(state.skip_state["num_not_finite"]) == 1
  assert int(state.mini_step) == 0
  np.testing.assert_array_equal(state.acc_grads["w"], [0.0, 0.0])


@pytest.mark.parametrize("window_guard", [True, False])
def test_window_guard_keeps_a_nan_window_from_the_parameters(window_guard):
  params = {"w": jnp.zeros(2)}
  multi = optaccum.compat.MultiSteps(optax.sgd(1.0), 2, window_guard=window_guard)
  state = multi.init(params)
  _, state = multi.update({"w": jnp.array([jnp.nan, 0.0])}, state, params)
  updates, state = multi.update({"w": jnp.ones(2)}, state, params)
  assert bool(jnp.isnan(updates["w"][0])) != window_guard
  assert int(state.gradient_step) == (0 if window_guard else 1)
  np.testing.assert_array_equal(state.acc_grads["w"], [0.0, 0.0])


def test_bfloat16_grads_pass_strict_promotion():
  params = helpers.init_params(dtype=jnp.bfloat16)
  multi = optaccum.compat.MultiSteps(optax.sgd(0.1, momentum=0.9), 2)
  x, y = helpers.make_data(8)
  new_params, state, _ = _train(multi, multi.update, params, x, y)
  assert int(state.gradient_step) == 1
  assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(new_params))
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.acc_grads))


@pytest.mark.parametrize(
  ("param_dtype", "accumulator_dtype"),
  [(jnp.bfloat16, jnp.float32), (jnp.float32, jnp.bfloat16), (jnp.bfloat16, None)],
)
def test_accumulator_dtype_sets_the_dtype_of_acc_grads(param_dtype, accumulator_dtype):
  params = {"w": jnp.zeros(3, param_dtype)}
  multi = optaccum.compat.MultiSteps(optax.sgd(1.0), 3, accumulator_dtype=accumulator_dtype)
  their = optax.MultiSteps(optax.sgd(1.0), 3, accumulator_dtype=accumulator_dtype or jnp.float32)
  state = multi.init(params)
  _, state = multi.update({"w": jnp.ones(3, param_dtype)}, state, params)
  expected = their.init(params).acc_grads["w"].dtype
  assert state.acc_grads["w"].dtype == expected == (accumulator_dtype or jnp.float32)


@pytest.mark.parametrize("accumulator_dtype", [jnp.int32, "not a dtype", object()])
def test_non_floating_accumulator_dtype_is_rejected(accumulator_dtype):
  with pytest.raises(TypeError, match=r"`MultiSteps\(accumulator_dtype=...\)` must be None or"):
    optaccum.compat.MultiSteps(optax.sgd(0.1), 2, accumulator_dtype=accumulator_dtype)


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


def test_state_carries_every_field_of_the_core_that_multisteps_uses():
  # The core's rounding key and statistics are () for MultiSteps, which sets
  # neither a stochastic accumulator nor statistics; any other field of the
  # core's state must be carried, or the compat state would silently reset it.
  core = set(optaccum.AccumulateState._fields)
  assert core - set(optaccum.compat.MultiStepsState._fields) == {"rounding_key", "statistics"}
  assert set(optaccum.compat.MultiStepsState._fields) <= core


@pytest.mark.parametrize("use_grad_mean", [True, False])
def test_optax_multisteps_state_converts_and_resumes_mid_window(use_grad_mean):
  params = {"w": jnp.asarray([0.5, -1.0, 2.0]), "b": jnp.zeros(2)}
  grads = _random_trees({"w": (3,), "b": (2,)}, 6, jnp.float32)
  theirs = optax.MultiSteps(MOMENTUM(), every_k_schedule=3, use_grad_mean=use_grad_mean)
  ours = optaccum.compat.MultiSteps(MOMENTUM(), every_k_schedule=3, use_grad_mean=use_grad_mean)
  their_update = _optax_update(theirs)
  ref_params, ref_state = params, theirs.init(params)
  for g in grads:
    updates, ref_state = their_update(g, ref_state, ref_params)
    ref_params = optax.apply_updates(ref_params, updates)
  # optax for four micro-steps (one window and one into the next), then optaccum.
  p, s = params, theirs.init(params)
  for g in grads[:4]:
    updates, s = their_update(g, s, p)
    p = optax.apply_updates(p, updates)
  converted = ours.from_optax_state(s, params=p)
  assert int(converted.mini_step) == 1 and float(converted.acc_weight) == 1.0
  helpers.assert_trees_equal(converted.acc_grads, s.acc_grads)
  helpers.assert_trees_equal(ours.from_optax_state(s), converted)  # params only check
  s = converted
  for g in grads[4:]:
    updates, s = ours.update(g, s, p)
    p = optax.apply_updates(p, updates)
  helpers.assert_trees_close(p, ref_params, rtol=1e-6, atol=1e-7)
  assert int(s.gradient_step) == 2


def test_from_optax_state_right_after_a_window_says_it_has_updated():
  params = {"w": jnp.zeros(2)}
  theirs = optax.MultiSteps(optax.sgd(1.0), every_k_schedule=1)
  ours = optaccum.compat.MultiSteps(optax.sgd(1.0), every_k_schedule=1)
  _, state = _optax_update(theirs)({"w": jnp.ones(2)}, theirs.init(params), params)
  assert bool(ours.has_updated(ours.from_optax_state(state))) == bool(theirs.has_updated(state))


def test_from_optax_state_refuses_other_states():
  ours = optaccum.compat.MultiSteps(optax.sgd(0.1), every_k_schedule=3)
  with pytest.raises(TypeError, match=r"from_optax_state\(state=...\)` must be an optax"):
    ours.from_optax_state(optax.sgd(0.1).init({"w": jnp.zeros(2)}))


@pytest.mark.parametrize("form", ["accumulate", "compat"])
def test_from_optax_state_refuses_an_optaccum_state(form):
  params = {"w": jnp.zeros(2)}
  ours = optaccum.compat.MultiSteps(optax.sgd(0.1), every_k_schedule=3)
  tx = ours if form == "compat" else optaccum.accumulate(optax.sgd(0.1), 3)
  _, state = tx.update({"w": jnp.ones(2)}, tx.init(params), params)  # mid-window
  with pytest.raises(TypeError, match=r"from_optax_state\(state=...\)` must be an optax.*own"):
    ours.from_optax_state(state)


def test_from_optax_state_refuses_another_inner_optimizer_state():
  params = {"w": jnp.zeros(2)}
  ours = optaccum.compat.MultiSteps(optax.adam(0.1), every_k_schedule=3)
  state = optax.MultiSteps(optax.sgd(0.1), every_k_schedule=3).init(params)
  with pytest.raises(
    ValueError,
    match=r"(?s)from_optax_state\(state=...\)` holds an inner_opt_state.*ScaleByAdamState",
  ):
    ours.from_optax_state(state)


def test_from_optax_state_refuses_acc_grads_unlike_the_params():
  params = {"w": jnp.zeros(2)}
  ours = optaccum.compat.MultiSteps(optax.sgd(0.1), every_k_schedule=3)
  state = optax.MultiSteps(optax.sgd(0.1), every_k_schedule=3).init({"w": jnp.zeros(5)})
  with pytest.raises(
    ValueError,
    match=r"(?s)from_optax_state\(state=...\)` holds acc_grads .*float32\[5\].*float32\[2\]",
  ):
    ours.from_optax_state(state, params=params)


@pytest.mark.parametrize(
  "mini_step", ["1", jnp.float32(1.5), jnp.zeros(3, jnp.int32), jnp.int32(-1)]
)
def test_from_optax_state_refuses_a_counter_that_is_no_count(mini_step):
  params = {"w": jnp.zeros(2)}
  ours = optaccum.compat.MultiSteps(optax.sgd(0.1), every_k_schedule=3)
  state = optax.MultiSteps(optax.sgd(0.1), every_k_schedule=3).init(params)
  with pytest.raises(
    ValueError,
    match=r"from_optax_state\(state=...\)` must hold a non-negative int scalar in mini_step, "
    r"got mini_step=",
  ):
    ours.from_optax_state(state._replace(mini_step=mini_step))


def test_from_optax_state_refuses_params_that_are_no_arrays():
  params = {"w": jnp.zeros(2)}
  ours = optaccum.compat.MultiSteps(optax.sgd(0.1), every_k_schedule=3)
  state = optax.MultiSteps(optax.sgd(0.1), every_k_schedule=3).init(params)
  with pytest.raises(
    TypeError,
    match=r"from_optax_state\(params=...\)` must be None or a tree of arrays, got params='w'",
  ):
    ours.from_optax_state(state, params="w")


def test_update_errors_name_multisteps_update():
  params = {"w": jnp.zeros(2)}
  ours = optaccum.compat.MultiSteps(optax.sgd(0.1), every_k_schedule=3)
  with pytest.raises(ValueError, match=r"^`MultiSteps.update\(updates=...\)` does not match"):
    ours.update({"w": jnp.ones(5)}, ours.init(params), params)


@pytest.mark.parametrize("policy", [None, optaccum.skip.not_finite])
def test_from_optax_state_keeps_a_skip_state_of_this_policy_form(policy):
  params = {"w": jnp.zeros(2)}
  theirs = optax.MultiSteps(optax.sgd(1.0), 2, should_skip_update_fn=optax.skip_not_finite)
  _, state = _optax_update(theirs)({"w": jnp.array([jnp.nan, 0.0])}, theirs.init(params), params)
  ours = optaccum.compat.MultiSteps(optax.sgd(1.0), 2, should_skip_update_fn=policy)
  converted = ours.from_optax_state(state)
  if policy is None:
    assert converted.skip_state == ()
  else:
    assert int(converted.skip_state["num_not_finite"]) == 1
  _, after = ours.update({"w": jnp.ones(2)}, converted, params)
  assert jax.tree.structure(after) == jax.tree.structure(converted)  # a stable loop carry

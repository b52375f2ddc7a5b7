"""Behaviour of `optaccum.accumulate`: weights, schedules, skips, flush, dtypes, errors."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optaccum
from tests import helpers


def _run(tx, grads_sequence, params, **update_kwargs_per_step):
  state = tx.init(params)
  outputs = []
  for i, grads in enumerate(grads_sequence):
    kwargs = {key: values[i] for key, values in update_kwargs_per_step.items()}
    updates, state = tx.update(grads, state, params, **kwargs)
    outputs.append(updates)
  return outputs, state


# --- Token-weighted windows -------------------------------------------------------


def _token_loss(params, tokens, mask):
  """Mean over valid tokens of a per-token squared error."""
  per_token = jnp.square(tokens @ params["w"] - 1.0)
  return jnp.sum(per_token * mask) / jnp.sum(mask)


def test_weighted_window_equals_token_mean_of_whole_window():
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=3), jnp.float32)}
  lengths = [7, 2, 5]  # micro-batches of very different valid lengths
  max_len = 8
  micro_batches = []
  for length in lengths:
    tokens = jnp.asarray(rng.normal(size=(max_len, 3)), jnp.float32)
    mask = jnp.asarray(np.arange(max_len) < length, jnp.float32)
    micro_batches.append((tokens, mask))

  tx = optaccum.accumulate(optax.sgd(1.0), k=len(lengths))
  grads = [jax.grad(_token_loss)(params, t, m) for t, m in micro_batches]
  weights = [jnp.sum(m) for _, m in micro_batches]
  outputs, _ = _run(tx, grads, params, weight=weights)

  all_tokens = jnp.concatenate([t for t, _ in micro_batches])
  all_mask = jnp.concatenate([m for _, m in micro_batches])
  token_mean_grad = jax.grad(_token_loss)(params, all_tokens, all_mask)
  np.testing.assert_allclose(outputs[-1]["w"], -token_mean_grad["w"], rtol=1e-6)
  # The unweighted mean of per-micro-batch means is not the token mean (the bug).
  naive = sum(g["w"] for g in grads) / len(grads)
  assert not np.allclose(naive, token_mean_grad["w"], rtol=1e-3)


def test_zero_weight_window_emits_zeros_and_keeps_inner_state():
  params = {"w": jnp.ones(2)}
  tx = optaccum.accumulate(optax.sgd(1.0, momentum=0.9), k=2)
  grads = [{"w": jnp.array([1.0, 2.0])}] * 4
  weights = [jnp.float32(1.0), jnp.float32(1.0), jnp.float32(0.0), jnp.float32(0.0)]
  outputs, state = _run(tx, grads, params, weight=weights)
  np.testing.assert_array_equal(outputs[3]["w"], [0.0, 0.0])
  assert np.all(np.isfinite(outputs[3]["w"]))
  assert int(state.gradient_step) == 1
  assert not bool(state.emitted)
  np.testing.assert_allclose(state.inner_opt_state[0].trace["w"], [1.0, 2.0])


def test_weighted_sum_reduction_emits_weighted_sum():
  params = {"w": jnp.zeros(2)}
  tx = optaccum.accumulate(optax.sgd(1.0), k=2, reduction="sum")
  grads = [{"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([3.0, 4.0])}]
  outputs, _ = _run(tx, grads, params, weight=[jnp.float32(2.0), jnp.float32(1.0)])
  np.testing.assert_allclose(outputs[1]["w"], [-5.0, -8.0])


def test_sum_reduction_emits_sum_of_window():
  params = {"w": jnp.zeros(2)}
  tx = optaccum.accumulate(optax.sgd(1.0), k=3, reduction="sum")
  grads = [{"w": jnp.array([1.0, 2.0]) * i} for i in (1, 2, 3)]
  outputs, _ = _run(tx, grads, params)
  np.testing.assert_allclose(outputs[2]["w"], [-6.0, -12.0])


# --- Schedules ----------------------------------------------------------------------


def test_every_k_schedule_grows_the_window():
  params = {"w": jnp.zeros(1)}
  tx = optaccum.accumulate(optax.sgd(1.0), k=lambda step: 1 + step)
  grads = [{"w": jnp.array([float(i)])} for i in range(6)]
  outputs, state = _run(tx, grads, params)
  emitted = [float(u["w"][0]) for u in outputs]
  # Windows of 1, 2, 3 micro-steps: [0], [1, 2], [3, 4, 5].
  assert emitted == [-0.0, 0.0, -1.5, 0.0, 0.0, -4.0]
  assert int(state.gradient_step) == 3


def test_schedule_below_one_is_clamped_to_every_micro_step():
  params = {"w": jnp.zeros(1)}
  tx = optaccum.accumulate(optax.sgd(1.0), k=lambda step: 0)
  outputs, state = _run(tx, [{"w": jnp.array([2.0])}] * 3, params)
  assert [float(u["w"][0]) for u in outputs] == [-2.0, -2.0, -2.0]
  assert int(state.gradient_step) == 3
  assert int(optaccum.status(state).num_clamped_windows) == 3


def _two_then(value: float):
  """A schedule of k = 2 at gradient step 0 that returns `value` from step 1 on."""
  return lambda step: jnp.where(step >= 1, jnp.float32(value), jnp.float32(2.0))


@pytest.mark.parametrize("later", [float("nan"), float("inf"), float("-inf"), 0.5, -3.0])
@pytest.mark.parametrize("form", ["update", "apply_gradients", "MultiSteps"])
def test_schedule_turning_bad_mid_training_runs_windows_of_one_and_counts_them(later, form):
  # k = 2 for the first window, then a NaN / infinite / below-1 value: each
  # later window is one micro-step long, and each such window is counted.
  grads = np.arange(1.0, 8.0, dtype=np.float32)  # one gradient per micro-step
  params = jnp.zeros(1, jnp.float32)
  if form == "MultiSteps":
    tx = optaccum.compat.MultiSteps(optax.sgd(1.0), every_k_schedule=_two_then(later))
  else:
    tx = optaccum.accumulate(optax.sgd(1.0), k=_two_then(later))
  state = tx.init(params)
  apply = jax.jit(functools.partial(optaccum.apply_gradients, tx))
  update = jax.jit(tx.update)
  for g in grads:
    g = jnp.full((1,), g, jnp.float32)
    if form == "apply_gradients":
      params, state = apply(g, state, params)
    else:
      updates, state = update(g, state, params)
      params = optax.apply_updates(params, updates)
  # NumPy: a window of 2 (mean of 1 and 2), then five windows of 1.
  expected = -(np.mean(grads[:2]) + np.sum(grads[2:]))
  np.testing.assert_allclose(np.asarray(params), [expected], rtol=1e-6)
  assert int(state.gradient_step) == 6
  assert int(state.num_clamped_windows) == 5
  if form != "MultiSteps":
    assert int(optaccum.status(state).num_clamped_windows) == 5


def test_schedule_of_good_values_counts_no_clamped_window():
  tx = optaccum.accumulate(optax.sgd(1.0), k=lambda step: 1 + step)
  _, state = _run(tx, [{"w": jnp.ones(1)}] * 6, {"w": jnp.zeros(1)})
  assert int(optaccum.status(state).num_clamped_windows) == 0


# --- Non-finite micro-batches -------------------------------------------------------


def test_skip_not_finite_drops_nan_micro_batch_without_touching_window():
  params = {"w": jnp.zeros(2)}
  tx = optaccum.accumulate(optax.sgd(1.0), k=2, skip=optaccum.skip.not_finite)
  grads = [
    {"w": jnp.array([1.0, 1.0])},
    {"w": jnp.array([jnp.nan, 1.0])},
    {"w": jnp.array([3.0, 3.0])},
  ]
  outputs, state = _run(tx, grads, params)
  np.testing.assert_array_equal(outputs[1]["w"], [0.0, 0.0])
  np.testing.assert_allclose(outputs[2]["w"], [-2.0, -2.0])
  assert int(state.num_skipped) == 1
  assert int(state.skip_state["num_not_finite"]) == 0


def test_without_policy_nan_never_leaves_a_non_emitting_step():
  params = {"w": jnp.zeros(2)}
  tx = optaccum.accumulate(optax.sgd(1.0), k=3, skip=None)
  outputs, _ = _run(tx, [{"w": jnp.array([jnp.nan, jnp.inf])}] * 2, params)
  for updates in outputs:
    np.testing.assert_array_equal(updates["w"], [0.0, 0.0])


def test_without_policy_window_after_a_nan_window_starts_clean():
  # The closed window's accumulator is cleared by the next micro-step's add: a
  # NaN it held must not leak into the next window.
  params = {"w": jnp.zeros(2)}
  tx = optaccum.accumulate(optax.sgd(1.0), k=2, window_guard=False)
  grads = [{"w": jnp.array([jnp.nan, 1.0])}, {"w": jnp.ones(2)}]
  grads += [{"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([3.0, 4.0])}]
  outputs, state = _run(tx, grads, params)
  assert np.isnan(outputs[1]["w"][0])
  np.testing.assert_array_equal(outputs[3]["w"], [-2.0, -3.0])
  assert int(state.mini_step) == 0


def test_skip_large_updates_drops_micro_batch_with_large_norm():
  params = {"w": jnp.zeros(2)}
  policy = functools.partial(optaccum.skip.large_updates, max_squared_norm=10.0)
  tx = optaccum.accumulate(optax.sgd(1.0), k=2, skip=policy)
  grads = [{"w": jnp.array([1.0, 0.0])}, {"w": jnp.array([3.0, 4.0])}, {"w": jnp.array([0.0, 1.0])}]
  outputs, state = _run(tx, grads, params)
  np.testing.assert_allclose(outputs[2]["w"], [-0.5, -0.5])
  assert int(state.num_skipped) == 1
  np.testing.assert_allclose(state.skip_state["norm_squared"], 1.0)


# --- Flush --------------------------------------------------------------------------


def test_flush_applies_mean_of_partial_window_inside_chain():
  params = {"w": jnp.zeros(2)}
  tx = optax.chain(optax.clip(100.0), optaccum.accumulate(optax.sgd(1.0), k=5))
  grads = [{"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([3.0, 4.0])}]
  _, state = _run(tx, grads, params)
  updates, state = optaccum.flush(tx, state, params)
  np.testing.assert_allclose(updates["w"], [-2.0, -3.0])
  assert int(optaccum.status(state).gradient_step) == 1
  assert bool(optaccum.status(state).has_updated)
  assert int(optaccum.status(state).mini_step) == 0


def test_flush_of_weighted_window_is_weighted_mean():
  params = {"w": jnp.zeros(1)}
  tx = optaccum.accumulate(optax.sgd(1.0), k=8)
  grads = [{"w": jnp.array([1.0])}, {"w": jnp.array([4.0])}]
  _, state = _run(tx, grads, params, weight=[jnp.float32(3.0), jnp.float32(1.0)])
  updates, _ = optaccum.flush(tx, state, params)
  np.testing.assert_allclose(updates["w"], [-7.0 / 4.0])


def test_flush_of_empty_window_emits_zeros_and_keeps_step():
  params = {"w": jnp.zeros(1)}
  tx = optaccum.accumulate(optax.sgd(1.0), k=2)
  state = tx.init(params)
  updates, state = optaccum.flush(tx, state, params)
  np.testing.assert_array_equal(updates["w"], [0.0])
  assert int(state.gradient_step) == 0
  assert not bool(optaccum.status(state).has_updated)


# --- Chains, None leaves, counters --------------------------------------------------


def test_transform_after_accumulation_in_chain_sees_window_update():
  params = {"w": jnp.zeros(1)}
  tx = optax.chain(optaccum.accumulate(optax.sgd(1.0), k=2), optax.scale(3.0))
  outputs, _ = _run(tx, [{"w": jnp.array([1.0])}, {"w": jnp.array([3.0])}], params)
  assert [float(u["w"][0]) for u in outputs] == [0.0, -6.0]


def test_none_gradient_leaves_pass_through():
  params = {"w": jnp.zeros(2), "frozen": None}
  tx = optaccum.accumulate(optax.sgd(1.0, momentum=0.5), k=2)
  grads = [{"w": jnp.ones(2), "frozen": None}] * 2
  outputs, state = _run(tx, grads, params)
  assert outputs[1]["frozen"] is None and state.acc_grads["frozen"] is None
  np.testing.assert_allclose(outputs[1]["w"], [-1.0, -1.0])


def test_inner_updates_of_another_dtype_are_zero_until_the_window_closes():
  # Updates of another dtype than the gradients cannot be written into the
  # gradients' buffers; they are carried in a tree of zeros instead.
  upcast = optax.stateless(lambda g, p: jax.tree.map(lambda x: x.astype(jnp.float32), g))
  params = {"w": jnp.zeros(2, jnp.bfloat16)}
  tx = optaccum.accumulate(upcast, k=2)
  grads = [{"w": jnp.array([1.0, 2.0], jnp.bfloat16)}, {"w": jnp.array([3.0, 4.0], jnp.bfloat16)}]
  outputs, _ = _run(tx, grads, params)
  assert outputs[0]["w"].dtype == outputs[1]["w"].dtype == jnp.float32
  np.testing.assert_array_equal(outputs[0]["w"], [0.0, 0.0])
  np.testing.assert_array_equal(outputs[1]["w"], [2.0, 3.0])


def test_counters_saturate_instead_of_overflowing():
  params = {"w": jnp.zeros(1)}
  tx = optaccum.accumulate(optax.sgd(1.0), k=1)
  int_max = jnp.iinfo(jnp.int32).max
  state = tx.init(params)._replace(gradient_step=jnp.int32(int_max))
  _, state = tx.update({"w": jnp.ones(1)}, state, params)
  assert int(state.gradient_step) == int_max


# --- Dtypes, jit, scan --------------------------------------------------------------


@pytest.mark.parametrize("accumulator", [jnp.float32, None])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize(
  "make_inner", [lambda: optax.sgd(0.1, momentum=0.9), lambda: optax.lion(0.01)]
)
def test_low_precision_grads_under_strict_promotion(dtype, accumulator, make_inner):
  params = helpers.init_params(dtype=dtype)
  inner = make_inner()
  tx = optaccum.accumulate(inner, k=2, accumulator=accumulator)
  state = tx.init(params)
  for leaf in jax.tree.leaves(state.acc_grads):
    assert leaf.dtype == (accumulator or jnp.float32)  # None widens to 32 bits
  x, y = helpers.make_data(4)
  step = jax.jit(lambda p, s: tx.update(helpers.grad(p, x, y), s, p))
  expected_dtypes = jax.tree.map(
    lambda u: u.dtype,
    jax.eval_shape(inner.update, helpers.grad(params, x, y), inner.init(params), params)[0],
  )
  for _ in range(2):
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
  assert jax.tree.map(lambda u: u.dtype, updates) == expected_dtypes
  assert all(leaf.dtype == dtype for leaf in jax.tree.leaves(params))
  assert int(state.gradient_step) == 1


def test_weighted_bfloat16_accumulator_passes_strict_promotion():
  tx = optaccum.accumulate(optax.identity(), k=2, accumulator=jnp.bfloat16)
  params = {"w": jnp.zeros(2)}
  grads = [{"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([4.0, 8.0])}]
  outputs, _ = _run(tx, grads, params, weight=[jnp.float32(3), jnp.float32(1)])
  np.testing.assert_array_equal(outputs[-1]["w"], [1.75, 3.5])  # (3 g1 + g2) / 4


def test_inside_lax_scan_without_dtype_drift():
  params = helpers.init_params(dtype=jnp.bfloat16)
  tx = optaccum.accumulate(optax.sgd(0.1, momentum=0.9), k=3)
  x, y = helpers.make_data(4 * 6)
  xs, ys = x.reshape(6, 4, -1), y.reshape(6, 4, -1)

  def body(carry, batch):
    params, state = carry
    updates, state = tx.update(helpers.grad(params, *batch), state, params)
    return (optax.apply_updates(params, updates), state), None

  # scan rejects a carry whose dtypes change between iterations.
  (scanned, state), _ = jax.lax.scan(body, (params, tx.init(params)), (xs, ys))
  looped, loop_state = params, tx.init(params)
  for i in range(6):
    (looped, loop_state), _ = body((looped, loop_state), (xs[i], ys[i]))
  # Compiled and eager bfloat16 arithmetic may round differently (XLA keeps some
  # fused intermediates in float32): they agree to bfloat16's resolution at each
  # leaf's scale.
  for a, b in zip(jax.tree.leaves(scanned), jax.tree.leaves(looped)):
    assert a.dtype == b.dtype == jnp.bfloat16
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    resolution = float(jnp.finfo(jnp.bfloat16).eps) * float(np.max(np.abs(b)))
    np.testing.assert_allclose(a, b, rtol=1e-2, atol=resolution)
  assert int(state.gradient_step) == 2


def test_jitted_update_traces_once_across_windows():
  traces = []
  params = helpers.init_params()
  tx = optaccum.accumulate(optax.sgd(0.1), k=lambda step: 2 + step % 2)
  x, y = helpers.make_data(4)

  @jax.jit
  def step(params, state, weight):
    traces.append(1)
    updates, state = tx.update(helpers.grad(params, x, y), state, params, weight=weight)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for i in range(7):
    params, state = step(params, state, jnp.float32(i + 1))
  assert len(traces) == 1
  assert int(state.gradient_step) == 3  # windows of 2, 3 and 2 micro-steps


# --- Bad input ----------------------------------------------------------------------


@pytest.mark.parametrize("every_k", [0, -1, 2.5, True, "4", None])
def test_bad_every_k_fails_at_construction(every_k):
  with pytest.raises(ValueError, match=r"`accumulate\(k=...\)` must be a positive int"):
    optaccum.accumulate(optax.sgd(0.1), every_k)


def test_bad_inner_fails_at_construction():
  with pytest.raises(TypeError, match=r"`accumulate\(inner=...\)` must be an optax"):
    optaccum.accumulate(lambda g: g, 2)


def test_bad_reduction_fails_at_construction():
  with pytest.raises(ValueError, match=r"`accumulate\(reduction=...\)` must be one of"):
    optaccum.accumulate(optax.sgd(0.1), 2, reduction="max")


def test_bad_accumulator_fails_at_construction():
  with pytest.raises(TypeError, match=r"accumulator=<class 'jax.numpy.int32'>"):
    optaccum.accumulate(optax.sgd(0.1), 2, accumulator=jnp.int32)


def test_bad_skip_fails_at_construction():
  with pytest.raises(TypeError, match=r"`accumulate\(skip=...\)` must be None or a callable"):
    optaccum.accumulate(optax.sgd(0.1), 2, skip="nan")


def test_unhashable_axis_name_fails_at_construction():
  with pytest.raises(TypeError, match=r"`accumulate\(axis_name=...\)` must be hashable"):
    optaccum.accumulate(optax.sgd(0.1), 2, axis_name=["data"])


def _tx_and_state():
  params = {"a": jnp.zeros(3), "b": jnp.zeros((2, 2))}
  tx = optaccum.accumulate(optax.sgd(0.1), 2)
  return tx, tx.init(params), params


def test_gradient_tree_structure_mismatch_names_both_sides():
  tx, state, params = _tx_and_state()
  with pytest.raises(ValueError, match=r"tree structure.*\n  updates: .*'a'.*\n  the accumulator"):
    tx.update({"a": jnp.zeros(3)}, state, params)


def test_gradient_shape_mismatch_names_path_and_both_shapes():
  tx, state, params = _tx_and_state()
  with pytest.raises(
    ValueError, match=r"at \['b'\]: updates has float32\[2, 3\], .* float32\[2, 2\]"
  ):
    tx.update({"a": jnp.zeros(3), "b": jnp.zeros((2, 3))}, state, params)


def test_integer_gradients_are_rejected_naming_the_leaf():
  tx, state, params = _tx_and_state()
  with pytest.raises(TypeError, match=r"leaf at \['a'\] has dtype int32"):
    tx.update({"a": jnp.zeros(3, jnp.int32), "b": jnp.zeros((2, 2))}, state, params)


def test_none_gradient_where_parameter_exists_is_rejected():
  tx, state, params = _tx_and_state()
  with pytest.raises(ValueError, match=r"at \['a'\]: updates has None"):
    tx.update({"a": None, "b": jnp.zeros((2, 2))}, state, params)


def test_non_scalar_weight_is_rejected():
  tx, state, params = _tx_and_state()
  grads = {"a": jnp.zeros(3), "b": jnp.zeros((2, 2))}
  with pytest.raises(
    ValueError, match=r"`accumulate\(...\).update\(weight=...\)` must be a scalar"
  ):
    tx.update(grads, state, params, weight=jnp.ones(2))


def test_bool_weight_is_rejected():
  tx, state, params = _tx_and_state()
  grads = {"a": jnp.zeros(3), "b": jnp.zeros((2, 2))}
  with pytest.raises(TypeError, match=r"update\(weight=...\)` must be a number"):
    tx.update(grads, state, params, weight=True)


@pytest.mark.parametrize("weight", ["8", 1 + 2j])
def test_non_real_weight_is_rejected(weight):
  tx, state, params = _tx_and_state()
  grads = {"a": jnp.zeros(3), "b": jnp.zeros((2, 2))}
  with pytest.raises(
    TypeError, match=r"update\(weight=...\)` must be a number \(real, not a bool\)"
  ):
    tx.update(grads, state, params, weight=weight)


def test_string_flush_is_rejected():
  tx, state, params = _tx_and_state()
  grads = {"a": jnp.zeros(3), "b": jnp.zeros((2, 2))}
  with pytest.raises(
    TypeError, match=r"update\(flush=...\)` must be a scalar bool, got flush='yes'"
  ):
    tx.update(grads, state, params, flush="yes")


def test_python_float_gradient_for_an_array_parameter_is_rejected():
  tx, state, params = _tx_and_state()
  grads = {"a": 1.0, "b": jnp.zeros((2, 2))}
  with pytest.raises(TypeError, match=r"must hold arrays, but the leaf at \['a'\] is a float"):
    tx.update(grads, state, params)


def test_state_of_another_inner_optimizer_is_rejected():
  params = {"w": jnp.zeros(3)}
  tx = optaccum.accumulate(optax.adam(0.1), 1)
  state = optaccum.accumulate(optax.sgd(0.1), 1).init(params)
  with pytest.raises(
    ValueError,
    match=r"(?s)`accumulate\(...\).update\(state=...\)` holds an inner_opt_state that is not "
    r"the state of this accumulation's inner optimizer.*ScaleByAdamState",
  ):
    tx.update({"w": jnp.ones(3)}, state, params)


def test_state_of_another_inner_optimizer_is_rejected_by_the_fast_path_too():
  params = {"w": jnp.zeros(3)}
  tx = optaccum.accumulate(optax.adam(0.1), 1)
  state = optaccum.accumulate(optax.sgd(0.1), 1).init(params)
  with pytest.raises(
    ValueError,
    match=r"(?s)`apply_gradients\(state=...\)` holds an inner_opt_state that is not "
    r"the state of this accumulation's inner optimizer.*ScaleByAdamState",
  ):
    optaccum.apply_gradients(tx, {"w": jnp.ones(3)}, state, params)


def test_empty_axis_name_fails_at_construction():
  with pytest.raises(
    ValueError, match=r"`accumulate\(axis_name=...\)` must name an axis or a non-empty.*=\(\)"
  ):
    optaccum.accumulate(optax.sgd(0.1), 2, axis_name=())


def test_non_bool_flush_is_rejected():
  tx, state, params = _tx_and_state()
  grads = {"a": jnp.zeros(3), "b": jnp.zeros((2, 2))}
  with pytest.raises(TypeError, match=r"update\(flush=...\)` must be a scalar bool, got flush=1"):
    tx.update(grads, state, params, flush=1)


def test_skip_policy_returning_non_bool_is_rejected():
  params = {"a": jnp.zeros(3)}
  tx = optaccum.accumulate(optax.sgd(0.1), 2, skip=lambda u, s, p: (jnp.float32(0), ()))
  with pytest.raises(ValueError, match=r"skip policy must return a scalar bool.*float32"):
    tx.update({"a": jnp.zeros(3)}, tx.init(params), params)


def test_schedule_returning_non_scalar_is_rejected():
  params = {"a": jnp.zeros(3)}
  del params
  with pytest.raises(ValueError, match=r"accumulate\(k=...\)` must return a real scalar"):
    optaccum.accumulate(optax.sgd(0.1), k=lambda step: jnp.ones(2, jnp.int32))


# --- flush and errors at the call that caused them --------------------------------


def test_flush_refuses_a_transformation_with_no_accumulation():
  tx = optax.sgd(1.0, momentum=0.9)
  params = {"w": jnp.ones(3)}
  with pytest.raises(ValueError, match=r"flush\(opt_state=...\)` must hold exactly one"):
    optaccum.flush(tx, tx.init(params), params)


def test_flush_refuses_params_of_another_structure():
  tx = optaccum.accumulate(optax.sgd(1.0), k=4)
  state = tx.init({"w": jnp.zeros(3)})
  with pytest.raises(
    ValueError,
    match=r"`flush\(params=...\)` has a tree structure that does not match the accumulator"
    r".*\n  params: .*'v'.*\n  the accumulator in opt_state: .*'w'",
  ):
    optaccum.flush(tx, state, {"v": jnp.zeros(3)})


def test_flush_refuses_params_of_another_shape():
  tx = optaccum.accumulate(optax.sgd(1.0), k=4)
  state = tx.init({"w": jnp.zeros(3)})
  with pytest.raises(
    ValueError,
    match=r"`flush\(params=...\)` does not match the accumulator in opt_state at \['w'\]: "
    r"params has shape \(4,\), the accumulator \(3,\)",
  ):
    optaccum.flush(tx, state, {"w": jnp.zeros(4)})


def test_flush_leaves_transforms_before_the_accumulation_as_they_were():
  tx = optax.chain(optax.scale_by_rms(), optaccum.accumulate(optax.sgd(1.0), k=4))
  params = {"w": jnp.zeros(3)}
  state = tx.init(params)
  g = {"w": jnp.array([1.0, 2.0, 4.0])}
  scaled, _ = optax.scale_by_rms().update(g, optax.scale_by_rms().init(params))
  _, state = tx.update(g, state, params)
  rms_before = state[0]
  updates, state = optaccum.flush(tx, state, params)
  jax.tree.map(np.testing.assert_array_equal, state[0], rms_before)
  np.testing.assert_allclose(updates["w"], -scaled["w"], rtol=1e-6)
  assert int(optaccum.status(state).gradient_step) == 1


def test_state_of_another_optimizer_is_refused_by_name():
  tx = optaccum.accumulate(optax.sgd(1.0), k=2)
  params = {"w": jnp.zeros(3)}
  other = optax.adam(1.0).init(params)
  with pytest.raises(TypeError, match=r"update\(opt_state=...\)` must be the AccumulateState"):
    tx.update({"w": jnp.ones(3)}, other, params)
  with pytest.raises(TypeError, match=r"apply_gradients\(opt_state=...\)` must be the Accum"):
    optaccum.apply_gradients(tx, {"w": jnp.ones(3)}, other, params)


def test_python_float_gradient_leaves_are_refused_by_path():
  tx = optaccum.accumulate(optax.sgd(1.0), k=2)
  params = {"w": jnp.zeros(())}
  with pytest.raises(TypeError, match=r"must hold arrays, but the leaf at \['w'\] is a float"):
    tx.update({"w": 1.0}, tx.init(params), params)


def test_every_k_beyond_int32_is_refused_and_the_largest_accepted():
  with pytest.raises(ValueError, match=r"k=2147483648"):
    optaccum.accumulate(optax.sgd(1.0), k=2**31)
  optaccum.accumulate(optax.sgd(1.0), k=2**31 - 1)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_schedule_returning_nan_or_inf_is_refused_at_construction(value):
  with pytest.raises(ValueError, match=r"must return a finite number of micro-steps"):
    optaccum.accumulate(optax.sgd(1.0), k=lambda step: jnp.float32(value))


def test_float_schedule_is_floored_not_rounded_up():
  params = {"w": jnp.zeros(1)}
  tx = optaccum.accumulate(optax.sgd(1.0), k=lambda step: jnp.float32(2.9))
  outputs, _ = _run(tx, [{"w": jnp.array([2.0])}] * 4, params)
  assert [float(u["w"][0]) for u in outputs] == [0.0, -2.0, 0.0, -2.0]


def test_multisteps_names_its_own_argument():
  with pytest.raises(TypeError, match=r"MultiSteps\(opt=...\)` must be an optax"):
    optaccum.compat.MultiSteps(object(), every_k_schedule=2)


def test_skip_large_updates_takes_its_threshold_by_position_as_optax_does():
  grads = {"w": jnp.array([3.0, 4.0])}
  assert bool(optaccum.skip.large_updates(grads, 0, None, 24.0)[0])
  assert not bool(optaccum.skip.large_updates(grads, 0, None, 26.0)[0])
  with pytest.raises(TypeError, match=r"`skip.large_updates\(max_squared_norm=...\)` is required"):
    optaccum.skip.large_updates(grads, 0)


def test_weighted_product_and_mean_are_formed_in_float32_for_bfloat16_gradients():
  # 1 + 2**-9 is not a bfloat16: a product or mean formed in bfloat16 would drop it.
  tx = optaccum.accumulate(optax.identity(), k=2, reduction="sum")
  params = {"w": jnp.zeros(1, jnp.float32)}
  state = tx.init(params)
  g = {"w": jnp.ones(1, jnp.bfloat16)}
  _, state = tx.update(g, state, params, weight=jnp.float32(1 + 2**-9))
  assert float(state.acc_grads["w"][0]) == 1 + 2**-9
  mean_tx = optaccum.accumulate(optax.identity(), k=3)
  state = mean_tx.init(params)
  sums = []
  for w in (1.0, 1.0, 1.0):
    updates, state = mean_tx.update(
      {"w": jnp.full(1, 3.0, jnp.bfloat16)}, state, params, weight=jnp.float32(w)
    )
    sums.append(float(state.acc_grads["w"][0]))
  # Once the window closes its accumulator holds what it emitted (the next
  # micro-step clears it).
  assert sums == [3.0, 6.0, 3.0] and float(updates["w"][0]) == 3.0


def _counting(inner):
  """`inner`, and a list whose length is how often its `update` was traced."""
  calls = []

  def update(updates, state, params=None):
    calls.append(None)
    return inner.update(updates, state, params)

  return optax.GradientTransformation(inner.init, update), calls


@pytest.mark.parametrize("form", ["transformation", "apply_gradients"])
@pytest.mark.parametrize("strategy", ["loop", "cond", "select"])
def test_inner_optimizer_is_traced_once_per_step(strategy, form):
  # Tracing an optimizer over a large model takes seconds: one trace per step,
  # not one per conditional (the first version traced it five times).
  inner, calls = _counting(optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1, 0.9)))
  tx = optaccum.accumulate(inner, k=4, strategy=strategy)
  params = helpers.init_params()

  def step(params, state, grads):
    if form == "apply_gradients":
      return optaccum.apply_gradients(tx, grads, state, params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  jax.jit(step).lower(params, tx.init(params), params)
  assert len(calls) == 1


def test_updates_of_other_dtypes_than_the_gradients_cost_one_more_trace():
  # bfloat16 gradients of float32 parameters: sgd's momentum makes float32
  # updates, which the gradients' buffers cannot hold.
  inner, calls = _counting(optax.sgd(0.1, momentum=0.9))
  tx = optaccum.accumulate(inner, k=2)
  params = helpers.init_params()
  grads = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
  with jax.numpy_dtype_promotion("standard"):
    shapes, _ = jax.eval_shape(tx.update, grads, tx.init(params), params)
  assert len(calls) == 2
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(shapes))

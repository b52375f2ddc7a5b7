"""Mixed precision, complex and float64: dtypes stay what the inner optimizer makes them.

Optax creates moments in the parameters' dtype and returns them promoted after an
update with wider gradients. The accumulation runs the inner update inside a loop
or conditional, whose carry keeps its types, so the inner state is cast back to
its own dtypes (as `optax.MultiSteps` does); the emitted updates keep the dtypes
the inner optimizer gives them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optaccum

OPTIMIZERS = {
  "sgd_momentum": lambda: optax.sgd(0.1, momentum=0.9),
  "adam": lambda: optax.adam(1e-2),
  "adamw": lambda: optax.adamw(1e-2),
  "adagrad": lambda: optax.adagrad(1e-2),
  "rmsprop_centered": lambda: optax.rmsprop(1e-2, centered=True),
  "lamb": lambda: optax.lamb(1e-2),
  "lars": lambda: optax.lars(1e-2),
  "lion": lambda: optax.lion(1e-3),
  "sm3": lambda: optax.sm3(1e-2),
  "rprop": lambda: optax.rprop(1e-2),
  "muon": lambda: optax.contrib.muon(1e-2),
  "prodigy": lambda: optax.contrib.prodigy(),
  "schedule_free_adamw": lambda: optax.contrib.schedule_free_adamw(1e-2),
  "inject_hyperparams": lambda: optax.inject_hyperparams(optax.adam)(learning_rate=1e-2),
  "masked": lambda: optax.masked(optax.adam(1e-2), {"w": True, "b": False}),
  "clip_chain": lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2)),
}
DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16, "f16": jnp.float16}


def _params(dtype):
  rng = np.random.default_rng(0)
  return {
    "w": jnp.asarray(rng.normal(size=(8, 6)), dtype),
    "b": jnp.asarray(rng.normal(size=6), dtype),
  }


def _grads(step, dtype):
  rng = np.random.default_rng(10 + step)
  return {
    "w": jnp.asarray(rng.normal(size=(8, 6)), dtype),
    "b": jnp.asarray(rng.normal(size=6), dtype),
  }


def _dtypes(tree):
  return jax.tree.map(lambda x: jnp.dtype(x.dtype), tree)


def _two_windows(tx, form, params, grad_dtype):
  """Two windows of k = 2: the last emitted updates (None on the fast path), state, params."""
  state = tx.init(params)
  updates = None
  for i in range(4):
    grads = _grads(i, grad_dtype)
    if form == "apply_gradients":
      params, state = optaccum.apply_gradients(tx, grads, state, params)
    else:
      updates, state = tx.update(grads, state, params)
      params = optax.apply_updates(params, updates)
  return updates, state, params


def _check_forms(make, param_dtype, grad_dtype, forms, *, run=True):
  """Each form's updates, inner state and parameters keep the inner optimizer's dtypes.

  With `run=False` the two windows are traced (`jax.eval_shape`), not compiled
  and run: a dtype that changes anywhere fails the trace or the comparison the
  same way, in a fraction of the time (the grid below has 160 cells).
  """
  params = _params(param_dtype)
  # Optax itself promotes here (bfloat16 moments meet float32 gradients).
  with jax.numpy_dtype_promotion("standard"):
    own_updates, _ = jax.eval_shape(
      make().update, _grads(0, grad_dtype), make().init(params), params
    )
    init_state = _dtypes(make().init(params))
    for form in forms:
      if form == "multisteps":
        tx = optaccum.compat.MultiSteps(make(), every_k_schedule=2).gradient_transformation()
      else:
        strategy = "cond" if form == "apply_gradients" else form
        tx = optaccum.accumulate(make(), k=2, strategy=strategy)
      windows = lambda p, tx=tx, form=form: _two_windows(tx, form, p, grad_dtype)  # noqa: E731
      updates, state, new_params = (
        jax.jit(windows)(params) if run else jax.eval_shape(windows, params)
      )
      if updates is not None:
        assert _dtypes(updates) == _dtypes(own_updates), form
      assert _dtypes(state.inner_opt_state) == init_state, form
      assert _dtypes(new_params) == _dtypes(params), form
      if run:
        assert int(state.gradient_step) == 2, form


# Every pair but float32 with float32, which has nothing to promote.
PAIRS = [
  (p, g) for p in ("f32", "bf16", "f16") for g in ("f32", "bf16") if (p, g) != ("f32", "f32")
]


@pytest.mark.parametrize(("param_dtype", "grad_dtype"), PAIRS)
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_mixed_precision_grid_keeps_the_inner_optimizers_dtypes(name, param_dtype, grad_dtype):
  _check_forms(
    OPTIMIZERS[name],
    DTYPES[param_dtype],
    DTYPES[grad_dtype],
    ("cond", "apply_gradients"),
    run=False,
  )


@pytest.mark.parametrize("name", ["adam", "sgd_momentum", "lion", "clip_chain"])
def test_mixed_precision_in_every_strategy_and_multisteps(name):
  forms = ("loop", "cond", "select", "multisteps")
  _check_forms(OPTIMIZERS[name], jnp.bfloat16, jnp.float32, forms)


@pytest.mark.parametrize("param_dtype", ["f32", "bf16"])
def test_mixed_precision_window_equals_inner_step_on_the_mean(param_dtype):
  # Reference by hand: the inner optimizer on the window's mean gradient, its
  # state cast back to its initial dtypes, as a large batch would train.
  params = _params(DTYPES[param_dtype])
  tx = optaccum.accumulate(optax.adam(1e-2), k=2)
  with jax.numpy_dtype_promotion("standard"):
    _, state, ours = jax.jit(lambda p: _two_windows(tx, "apply_gradients", p, jnp.float32))(params)
    inner = optax.adam(1e-2)
    ref_state, ref = inner.init(params), params
    for window in range(2):
      mean = jax.tree.map(
        lambda a, b: (a + b) / 2,
        _grads(2 * window, jnp.float32),
        _grads(2 * window + 1, jnp.float32),
      )
      updates, new_state = inner.update(mean, ref_state, ref)
      ref_state = jax.tree.map(lambda n, o: n.astype(o.dtype), new_state, ref_state)
      ref = optax.apply_updates(ref, updates)
  # Jitted against eager: the last bit of float32 may differ, hence one ulp
  # of the parameters' dtype.
  rtol = 1e-6 if param_dtype == "f32" else 2.0**-7
  for name in ("w", "b"):
    np.testing.assert_allclose(
      np.asarray(ours[name], np.float32), np.asarray(ref[name], np.float32), rtol=rtol, atol=1e-7
    )


def test_lbfgs_with_bfloat16_gradients_of_float32_parameters():
  params = _params(jnp.float32)
  tx = optaccum.accumulate(optax.lbfgs(), k=2)
  init_dtypes = _dtypes(tx.init(params).inner_opt_state)

  def two_windows(params):
    state = tx.init(params)
    for i in range(4):
      grads = _grads(i, jnp.bfloat16)
      _, state = tx.update(
        grads,
        state,
        params,
        value=jnp.float32(1.0),
        grad=grads,
        value_fn=lambda p: jnp.float32(1.0),
      )
    return state

  with jax.numpy_dtype_promotion("standard"):
    state = jax.jit(two_windows)(params)
  assert _dtypes(state.inner_opt_state) == init_dtypes
  assert int(state.gradient_step) == 2


# --- Complex ----------------------------------------------------------------------


@pytest.mark.parametrize("accumulator", [None, jnp.float32, jnp.complex64, jnp.bfloat16])
def test_complex_gradients_keep_their_imaginary_part(accumulator):
  rng = np.random.default_rng(0)
  shape = (300, 400)
  grads = [
    (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(np.complex64) for _ in range(3)
  ]
  params = {"z": jnp.zeros(shape, jnp.complex64), "r": jnp.zeros(5, jnp.float32)}
  tx = optaccum.accumulate(optax.sgd(1.0), k=3, accumulator=accumulator)
  state = tx.init(params)
  assert state.acc_grads["z"].dtype == jnp.complex64
  assert state.acc_grads["r"].dtype == (
    jnp.bfloat16 if accumulator == jnp.bfloat16 else jnp.float32
  )
  for g in grads:
    updates, state = tx.update({"z": jnp.asarray(g), "r": jnp.ones(5, jnp.float32)}, state, params)
  expected = -np.mean(np.stack(grads).astype(np.complex128), axis=0)
  np.testing.assert_allclose(np.asarray(updates["z"]), expected, rtol=1e-5, atol=1e-6)
  assert np.abs(np.imag(np.asarray(updates["z"]))).max() > 0.1


def test_complex_gradient_into_a_real_parameter_is_refused():
  params = {"w": jnp.zeros(3, jnp.float32)}
  tx = optaccum.accumulate(optax.sgd(1.0), k=2)
  with pytest.raises(TypeError, match=r"complex leaf at \['w'\].*imaginary part would be lost"):
    tx.update({"w": jnp.ones(3, jnp.complex64)}, tx.init(params), params)


def test_complex_microbatch_gradients_keep_their_imaginary_part():
  def loss(z, x):
    return jnp.sum(jnp.abs(z * x) ** 2)

  z = jnp.asarray([1.0 + 2.0j, -0.5 + 0.25j], jnp.complex64)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 2)), jnp.complex64)
  whole = jax.grad(loss)(z, x)
  _, split = optaccum.microbatch(jax.value_and_grad(loss), 4, reduction="sum")(z, x)
  np.testing.assert_allclose(np.asarray(split), np.asarray(whole), rtol=1e-5)


# --- float64 ----------------------------------------------------------------------


def _float64_mean(form, grads):
  """The mean of `grads` through `form`, with 64-bit types on (as `JAX_ENABLE_X64=1`)."""
  with jax.enable_x64(True):
    params = {"w": jnp.zeros(grads[0].shape, jnp.float64)}
    if form == "transformation":
      tx = optaccum.accumulate(optax.sgd(1.0), k=len(grads))
      state = tx.init(params)
      assert state.acc_grads["w"].dtype == jnp.float64
      for g in grads:
        updates, state = tx.update({"w": jnp.asarray(g)}, state, params)
      return -np.asarray(updates["w"])
    split = optaccum.microbatch(lambda p, g: (jnp.sum(g[0]), g[0]), len(grads))
    return np.asarray(split(params["w"], jnp.asarray(np.stack(grads)))[1])


def test_float64_gradients_accumulate_in_float64():
  rng = np.random.default_rng(0)
  grads = [rng.normal(size=100_000) * 10.0 ** rng.integers(-8, 8, 100_000) for _ in range(8)]
  expected = np.mean(np.stack(grads), axis=0)
  # Relative to the magnitudes summed: cancellation makes some means tiny.
  scale = np.mean(np.abs(np.stack(grads)), axis=0)
  for form in ("transformation", "microbatch"):
    got = _float64_mean(form, grads)
    assert got.dtype == np.float64, form
    # A float32 accumulator gives 3.0e-7 on this measure; float64 rounding ~1e-15.
    error = float(np.max(np.abs(got - expected) / scale))
    assert error < 1e-12, (form, error)

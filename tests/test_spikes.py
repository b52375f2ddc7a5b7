"""`skip.spikes`: its decisions and history against a float64 NumPy reference, in every form."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optaccum
from tests import hlo
from tests.helpers import assert_trees_equal

K = 2  # micro-batches per window
NUM_SIGMAS, HISTORY, MIN_HISTORY = 3.0, 8, 4
SHAPES = {"w": (3,), "big": (100_000,)}  # one leaf of 100k entries
# The windows: a slowly varying gradient norm and loss, and what is injected.
NUM_WINDOWS = 24
EARLY_SPIKE = 2  # before min_history: accepted, and recorded
NAN_GRADIENT = 10  # the window guard drops it inside accumulate; spikes sees it after microbatch
# Between the bands of the sample and the population standard deviation: accepted.
BORDERLINE = 12
NORM_SPIKES = (14, 19, 20)  # two in a row: the first does not widen the band for the second
LOSS_SPIKE = 18
NAN_LOSS = NUM_WINDOWS - 1  # the last window


def inner_optimizer():
  # Momentum makes a skipped window visible in every later step if its state advanced.
  return optax.sgd(0.1, momentum=0.9)


def window_norms_and_losses() -> tuple[np.ndarray, np.ndarray]:
  """The target norm and loss of each window's mean."""
  j = np.arange(NUM_WINDOWS)
  norms = 1.0 + 0.02 * ((j * 7) % 5)
  losses = 2.0 + 0.03 * ((j * 3) % 4)
  norms[EARLY_SPIKE] = 4.0
  norms[list(NORM_SPIKES)] = 5.0
  losses[LOSS_SPIKE] = 9.0
  losses[NAN_LOSS] = np.nan
  # No window before it is skipped (the test below checks it): its history is known.
  past = np.delete(norms[:BORDERLINE], NAN_GRADIENT)[-HISTORY:]
  sample, population = (past.mean() + NUM_SIGMAS * past.std(ddof=d) for d in (1, 0))
  norms[BORDERLINE] = (sample + population) / 2
  return norms, losses


def make_windows(shapes=SHAPES, dtype=np.float32) -> list[tuple[list[dict], list[float]]]:
  """Each window's micro-batch gradients and losses, whose means have the target norm and loss."""
  rng = np.random.default_rng(0)
  norms, losses = window_norms_and_losses()
  windows = []
  for j in range(NUM_WINDOWS):
    direction = {name: rng.normal(size=shape) for name, shape in shapes.items()}
    length = np.sqrt(sum(np.sum(d**2) for d in direction.values()))
    grads = []
    for i in range(K):
      sign = 1.0 if i % 2 == 0 else -1.0  # micro-batch noise that cancels in the mean
      grads.append(
        {
          name: (norms[j] * d / length + sign * 0.3 * d / length).astype(dtype)
          for name, d in direction.items()
        }
      )
    if j == NAN_GRADIENT:
      grads[1]["w"][0] = np.nan
    micro_losses = [losses[j] - 0.01, losses[j] + 0.01]
    windows.append((grads, micro_losses))
  return windows


def mean_gradient(grads: list[dict]) -> dict[str, np.ndarray]:
  return {name: np.mean([np.float64(g[name]) for g in grads], axis=0) for name in grads[0]}


def reference(norms, values, *, guarded: bool) -> dict:
  """What `spikes` decides, window by window, in float64 (readable, no ring buffer).

  A window is skipped where its norm or value is not finite, or, once
  MIN_HISTORY accepted windows are recorded, exceeds the mean of the last
  HISTORY accepted ones by more than NUM_SIGMAS sample standard deviations.
  Skipped windows are not recorded. `guarded`: a window whose gradient is not
  finite never reaches `spikes` (accumulate's window guard drops it).
  """
  accepted = {"norm": [], "value": []}
  skipped, margins = [], []
  for window, (norm, value) in enumerate(zip(norms, values)):
    if guarded and not np.isfinite(norm):
      continue
    spike = not (np.isfinite(norm) and np.isfinite(value))
    for name, x in (("norm", norm), ("value", value)):
      past = np.array(accepted[name][-HISTORY:])
      if len(past) >= MIN_HISTORY and np.isfinite(x):
        band = past.mean() + NUM_SIGMAS * past.std(ddof=1)
        spike |= x > band
        margins.append(abs(x - band) / band)
    if spike:
      skipped.append(window)
    else:
      accepted["norm"].append(norm)
      accepted["value"].append(value)
  rings = {}
  for name, values_in_order in accepted.items():
    ring = np.zeros(HISTORY)
    for n, x in enumerate(values_in_order):
      ring[n % HISTORY] = x
    rings[name] = ring
  return {
    "skipped": skipped,
    "rings": rings,
    "num_accepted": len(accepted["norm"]),
    "min_margin": min(margins),
  }


def reference_params(windows, skipped, params):
  """The inner optimizer (optax, eagerly) stepped on each window's mean gradient but the skipped."""
  inner = inner_optimizer()
  state = inner.init(params)
  for j, (grads, _) in enumerate(windows):
    if j in skipped or j == NAN_GRADIENT:
      continue
    mean = {name: jnp.asarray(g, jnp.float32) for name, g in mean_gradient(grads).items()}
    updates, state = inner.update(mean, state, params)
    params = optax.apply_updates(params, updates)
  return params


def init_params(shapes=SHAPES, dtype=jnp.float32):
  return {name: jnp.full(shape, 0.5, dtype) for name, shape in shapes.items()}


# --- The forms ------------------------------------------------------------------------


def spikes():
  return optaccum.skip.spikes(
    inner_optimizer(), num_sigmas=NUM_SIGMAS, history=HISTORY, min_history=MIN_HISTORY
  )


def run_accumulate(windows, params):
  tx = optaccum.accumulate(spikes(), K)

  @jax.jit
  def step(params, state, grads, value):
    updates, state = tx.update(grads, state, params, value=value)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for grads, losses in windows:
    for g in grads:
      params, state = step(params, state, g, np.float32(np.mean(losses)))
  return params, state


def run_apply_gradients(windows, params):
  tx = optaccum.accumulate(spikes(), K)
  step = jax.jit(lambda p, s, g, v: optaccum.apply_gradients(tx, g, s, p, value=v))
  state = tx.init(params)
  for grads, losses in windows:
    for g in grads:
      params, state = step(params, state, g, np.float32(np.mean(losses)))
  return params, state


def run_multisteps(windows, params):
  opt = optaccum.compat.MultiSteps(spikes(), every_k_schedule=K)
  state = opt.init(params)
  apply = jax.jit(optax.apply_updates)
  for grads, losses in windows:
    for g in grads:
      updates, state = opt.update(g, state, params, value=np.float32(np.mean(losses)))
      params = apply(params, updates)
  return params, state


def run_microbatch(windows, params):
  tx = spikes()

  def loss_and_grads(params, grads, losses):  # each micro-batch's rows hold one micro-batch
    return jnp.mean(losses), jax.tree.map(lambda g: jnp.mean(g, axis=0), grads)

  split = optaccum.microbatch(loss_and_grads, K)

  @jax.jit
  def step(params, state, grads, losses):
    loss, grads = split(params, grads, losses)
    updates, state = tx.update(grads, state, params, value=loss)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for grads, losses in windows:
    rows = {name: np.stack([g[name] for g in grads]) for name in grads[0]}
    params, state = step(params, state, rows, np.asarray(losses, np.float32))
  return params, state


FORMS = {
  "accumulate": (run_accumulate, True),
  "apply_gradients": (run_apply_gradients, True),
  "MultiSteps": (run_multisteps, True),
  "microbatch": (run_microbatch, False),
}


def spike_state(opt_state) -> optaccum.skip.SpikeState:
  """The one SpikeState inside `opt_state`."""
  is_spike = lambda x: isinstance(x, optaccum.skip.SpikeState)  # noqa: E731
  (found,) = [x for x in jax.tree.leaves(opt_state, is_leaf=is_spike) if is_spike(x)]
  return found


@pytest.fixture(scope="module")
def windows():
  return make_windows()


def reference_for(windows, guarded):
  norms = [
    np.sqrt(sum(np.sum(g**2) for g in mean_gradient(grads).values())) for grads, _ in windows
  ]
  values = [np.mean(np.float64(losses)) for _, losses in windows]
  return reference(norms, values, guarded=guarded)


def test_the_reference_skips_the_injected_windows_with_room_for_float32(windows):
  expected = reference_for(windows, guarded=True)
  assert expected["skipped"] == [*NORM_SPIKES[:1], LOSS_SPIKE, *NORM_SPIKES[1:], NAN_LOSS]
  # The early spike was accepted and recorded: no window before min_history is skipped.
  assert EARLY_SPIKE not in expected["skipped"]
  assert BORDERLINE not in expected["skipped"]
  # No decision lies within 0.1% of its band: float32 and float64 decide alike.
  assert expected["min_margin"] > 1e-3
  unguarded = reference_for(windows, guarded=False)
  assert unguarded["skipped"] == sorted([NAN_GRADIENT, *expected["skipped"]])


@pytest.mark.parametrize("form", list(FORMS))
def test_decisions_history_and_parameters_match_the_float64_reference(form, windows):
  run, guarded = FORMS[form]
  params, opt_state = run(windows, init_params())
  expected = reference_for(windows, guarded)
  state = spike_state(opt_state)
  assert int(state.num_spikes) == len(expected["skipped"])
  assert int(state.num_norms) == int(state.num_values) == expected["num_accepted"]
  assert bool(state.skipped)  # the last window's loss was NaN
  np.testing.assert_allclose(state.norm_history, expected["rings"]["norm"], rtol=1e-5)
  np.testing.assert_allclose(state.value_history, expected["rings"]["value"], rtol=1e-6)
  wanted = reference_params(windows, expected["skipped"], init_params())
  for name in SHAPES:
    np.testing.assert_allclose(params[name], wanted[name], rtol=1e-5, atol=1e-7, err_msg=name)
  if form != "microbatch" and form != "MultiSteps":
    info = optaccum.status(opt_state)
    assert int(info.num_spike_windows) == len(expected["skipped"])
    # The guard dropped the NaN window before spikes saw it; spikes counts its own.
    assert int(info.num_skipped_windows) == 1
    assert int(info.gradient_step) == NUM_WINDOWS - 1


def test_a_skipped_window_leaves_the_inner_state_bit_identical():
  tx = spikes()
  params = {"w": jnp.ones(3)}
  state = tx.init(params)
  for _ in range(MIN_HISTORY):
    _, state = tx.update({"w": jnp.ones(3)}, state, params)
  updates, after = tx.update({"w": jnp.full(3, 100.0)}, state, params)
  assert_trees_equal(after.inner_opt_state, state.inner_opt_state)
  assert_trees_equal(after.norm_history, state.norm_history)
  np.testing.assert_array_equal(updates["w"], np.zeros(3, np.float32))
  assert (int(after.num_spikes), int(after.num_norms), bool(after.skipped)) == (
    1,
    MIN_HISTORY,
    True,
  )


def test_value_and_other_extra_arguments_reach_the_inner_optimizer():
  seen = []

  def update(updates, state, params=None, *, value=None, scale=None, **extra):
    seen.append((float(value), scale))
    return updates, state

  tx = optaccum.skip.spikes(optax.GradientTransformationExtraArgs(lambda p: (), update))
  tx.update({"w": jnp.ones(2)}, tx.init({"w": jnp.ones(2)}), value=jnp.float32(2.5), scale=3)
  assert seen == [(2.5, 3)]


def test_bfloat16_params_with_float32_grads_skip_like_feeding_only_the_accepted_windows():
  shapes = {"w": (3,), "v": (5,)}
  windows = make_windows(shapes)
  params = init_params(shapes, jnp.bfloat16)
  expected = reference_for(windows, guarded=True)
  # Optax's momentum itself promotes here (a bfloat16 trace meets float32 gradients).
  with jax.numpy_dtype_promotion("standard"):
    got, opt_state = run_accumulate(windows, params)
    # The same accumulation without spikes, fed only the windows spikes accepted.
    accepted = [w for j, w in enumerate(windows) if j not in expected["skipped"]]
    tx = optaccum.accumulate(inner_optimizer(), K)
    step = jax.jit(lambda p, s, g: optaccum.apply_gradients(tx, g, s, p))
    state, plain = tx.init(params), params
    for grads, _ in accepted:
      for g in grads:
        plain, state = step(plain, state, g)
  assert int(spike_state(opt_state).num_spikes) == len(expected["skipped"])
  assert_trees_equal(got, plain)
  assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(got))
  trace = spike_state(opt_state).inner_opt_state[0].trace
  assert trace["w"].dtype == jnp.bfloat16  # the inner state keeps init's dtypes


def test_bfloat16_gradients_are_normed_in_float32_under_strict_promotion():
  tx = optaccum.skip.spikes(optax.sgd(1.0), history=4, min_history=2)
  params = {"w": jnp.zeros(300, jnp.bfloat16)}
  state = tx.init(params)
  for scale in (1.0, 1.01, 1.0, 50.0):
    grads = {"w": jnp.full(300, scale, jnp.bfloat16)}
    updates, state = tx.update(grads, state, params)
  assert updates["w"].dtype == jnp.bfloat16 and not np.any(np.asarray(updates["w"], np.float32))
  # In bfloat16 the sum of squares would have lost about 1% (its 8-bit mantissa).
  exact = [np.sqrt(300 * np.float64(jnp.bfloat16(s)) ** 2) for s in (1.0, 1.01, 1.0)]
  np.testing.assert_allclose(state.norm_history[:3], exact, rtol=1e-6)
  assert (int(state.num_spikes), int(state.num_norms)) == (1, 3)


def test_resumed_from_a_checkpoint_mid_window_is_bit_identical(tmp_path):
  shapes = {"w": (3,), "v": (5,)}
  windows = make_windows(shapes)
  tx = optaccum.accumulate(spikes(), K)

  @jax.jit
  def step(train_state, grads, value):
    params, state = train_state
    updates, state = tx.update(grads, state, params, value=value)
    return optax.apply_updates(params, updates), state

  micro_steps = [(g, np.float32(np.mean(losses))) for grads, losses in windows for g in grads]
  save_at = 2 * (NORM_SPIKES[0] + 1) + 1  # after the first norm spike, mid-window
  fresh = (init_params(shapes), tx.init(init_params(shapes)))
  train_state = fresh
  for g, v in micro_steps[:save_at]:
    train_state = step(train_state, g, v)
  assert int(spike_state(train_state).num_spikes) == 1
  optaccum.checkpoint.save(tmp_path / "mid", train_state, k=K)
  uninterrupted = train_state
  for g, v in micro_steps[save_at:]:
    uninterrupted = step(uninterrupted, g, v)
  resumed = optaccum.checkpoint.restore(tmp_path / "mid", fresh, k=K)
  assert_trees_equal(resumed, train_state)
  for g, v in micro_steps[save_at:]:
    resumed = step(resumed, g, v)
  assert_trees_equal(resumed, uninterrupted)
  assert int(spike_state(resumed).num_spikes) == 5


def test_status_counts_spike_windows_wherever_the_state_sits_and_zero_without():
  params = {"a": jnp.zeros(2), "b": jnp.zeros(2)}
  two = optax.multi_transform(
    {"a": optaccum.skip.spikes(optax.sgd(1.0)), "b": optaccum.skip.spikes(optax.sgd(1.0))},
    {"a": "a", "b": "b"},
  )
  tx = optax.chain(optax.identity(), optaccum.accumulate(two, k=1))
  state = tx.init(params)
  _, state = tx.update(params, state, params, value=jnp.float32(np.nan))  # both skip
  assert int(optaccum.status(state).num_spike_windows) == 2
  plain = optaccum.accumulate(optax.sgd(1.0), k=1)
  count = optaccum.status(plain.init(params)).num_spike_windows
  assert (count.dtype, count.shape, int(count)) == (jnp.int32, (), 0)


def test_the_norm_is_taken_in_the_closing_step_only():
  params = {"w": jnp.zeros(1000), "b": jnp.zeros(10)}
  grads = jax.tree.map(jnp.ones_like, params)
  counts = []
  for inner in (inner_optimizer(), spikes()):
    tx = optaccum.accumulate(inner, k=4)
    lowered = jax.jit(tx.update).lower(grads, tx.init(params), params, value=jnp.float32(1))
    counts.append(hlo.summary(lowered.compile().as_text(), "reduce"))
  plain, with_spikes = counts
  # A micro-step that closes no window runs no reduction more than without spikes.
  assert with_spikes["executed"] == plain["executed"]
  assert with_spikes["in_branches"] > plain["in_branches"]


# --- Bad input ------------------------------------------------------------------------


SPIKES = "`skip.spikes"
UPDATE = "`skip.spikes(...).update"


@pytest.mark.parametrize(
  "kwargs, message",
  [
    (
      {"num_sigmas": 0.0},
      f"{SPIKES}(num_sigmas=...)` must be a finite positive number, got num_sigmas=0.0.",
    ),
    ({"num_sigmas": -1}, "got num_sigmas=-1."),
    ({"num_sigmas": float("nan")}, "got num_sigmas=nan."),
    ({"num_sigmas": float("inf")}, "got num_sigmas=inf."),
    ({"num_sigmas": "6"}, "got num_sigmas='6'."),
    ({"num_sigmas": True}, "got num_sigmas=True."),
    (
      {"history": 1},
      f"{SPIKES}(history=...)` must be an int >= 2 (a spread needs two windows), got history=1.",
    ),
    ({"history": 8.0}, "got history=8.0."),
    (
      {"min_history": 1},
      f"{SPIKES}(min_history=...)` must be an int from 2 to history=100, got min_history=1.",
    ),
    ({"history": 8, "min_history": 9}, "must be an int from 2 to history=8, got min_history=9."),
    ({"min_history": True}, "got min_history=True."),
  ],
)
def test_bad_settings_are_refused_naming_the_argument_and_value(kwargs, message):
  with pytest.raises(ValueError) as error:
    optaccum.skip.spikes(optax.sgd(1.0), **kwargs)
  assert message in str(error.value)


def test_an_inner_that_is_no_transformation_is_refused():
  with pytest.raises(TypeError) as error:
    optaccum.skip.spikes(3)
  assert str(error.value) == (
    "`skip.spikes(inner=...)` must be an optax.GradientTransformation, got inner=3."
  )


@pytest.mark.parametrize(
  "value, kind, message",
  [
    (jnp.ones(3), ValueError, f"{UPDATE}(value=...)` must be a scalar, got an array of shape (3,)"),
    (
      "1.0",
      TypeError,
      f"{UPDATE}(value=...)` must be a number (real, not a bool), got value='1.0'",
    ),
    (True, TypeError, "got value=True."),
    (jnp.complex64(1), TypeError, "must be a number (real, not a bool)"),
  ],
)
def test_a_value_that_is_no_real_scalar_is_refused_naming_the_call(value, kind, message):
  tx = optaccum.skip.spikes(optax.sgd(1.0))
  params = {"w": jnp.zeros(2)}
  with pytest.raises(kind) as error:
    tx.update(params, tx.init(params), params, value=value)
  assert message in str(error.value)


def test_a_foreign_state_or_another_history_is_refused_naming_the_call():
  params = {"w": jnp.zeros(2)}
  tx = optaccum.skip.spikes(optax.sgd(1.0), history=10, min_history=2)
  with pytest.raises(TypeError) as error:
    tx.update(params, optax.sgd(1.0).init(params), params)
  assert str(error.value).startswith(
    "`skip.spikes(...).update(state=...)` must be the SpikeState that this `skip.spikes` init "
    "built, got a tuple"
  )
  other = optaccum.skip.spikes(optax.sgd(1.0), history=20).init(params)
  with pytest.raises(ValueError) as error:
    tx.update(params, other, params)
  assert str(error.value) == (
    "`skip.spikes(...).update(state=...)` holds a history of shape (20,), but this "
    "`skip.spikes` keeps history=10 windows (a state built with another history?)."
  )

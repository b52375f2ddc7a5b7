"""One contract, every form: what a window of micro-batches does, whoever runs it.

One table of behaviours (`ROWS`) runs through every form of accumulation, and
each result is compared with a reference written from the definitions in NumPy
float64 (complex128 for complex parameters), never with optaccum itself:

* a micro-batch's weight `w_i` is 1 when none is given; a NaN, infinite or
  negative weight skips its micro-batch (it adds nothing, not even its own
  NaN, and the stateful forms count it in `num_skipped`; a skipped
  micro-batch does not count towards the window's length);
* a weight of 0 adds nothing but counts towards the window's length;
* a window's gradient is `sum(w_i g_i) / sum(w_i)` (mean) or `sum(w_i g_i)`
  (sum); a window whose weights sum to zero emits zeros and takes no inner
  step;
* the window guard drops a window whose gradient is not finite whole (no
  step, parameters unchanged, `num_skipped_windows`); a skip policy drops
  only the micro-batch it rejects (`num_skipped`);
* the inner optimizer is SGD, so the parameters after a window that runs are
  `params - LEARNING_RATE * gradient`, and after one that does not, unchanged.

Forms: `accumulate(...)` with `tx.update` and `optax.apply_updates`, and the
fast path `apply_gradients`, each in a jitted micro-step as training runs them
(eagerly, `tx.update` compiles its conditionals anew on every call, about
0.1 s, which a table this size cannot afford; the other test files run it
eagerly); `compat.MultiSteps(...).update`, which compiles itself (only its
parameters and `has_updated` are read); `microbatch` over one window's
micro-batches followed by one SGD step, eagerly and under `jax.jit`. A row
that needs what a form does not have (the window guard, a skip policy,
statistics or flush for `microbatch`; statistics or stochastic rounding for
`MultiSteps`, which takes optax's arguments; stochastic rounding for
`microbatch`, which refuses it, see `test_microbatch_refuses_stochastic_rounding`)
is skipped for that form, with the reason. Jitted steps are compiled once per
configuration and shared by the rows that have it.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optaccum

LEARNING_RATE = 0.5
# A large leaf (131 072 entries: XLA:CPU vectorizes its reductions) and small ones.
SHAPES = {"large": (512, 256), "small": (3,), "scalar": ()}
POISONED = ("large", (7, 11))  # where a NaN or inf gradient entry goes
# skip.large_updates' threshold: a micro-batch gradient of mean 1 and unit noise
# has a squared norm of about 2.6e5; one scaled by 1e3 about 2.6e11.
MAX_SQUARED_NORM = 1e6
SKIP_POLICIES = {
  "not_finite": optaccum.skip.not_finite,
  "large_updates": functools.partial(
    optaccum.skip.large_updates, max_squared_norm=MAX_SQUARED_NORM
  ),
}
NAN, INF = float("nan"), float("inf")


@dataclasses.dataclass(frozen=True)
class MicroBatch:
  """One micro-batch: its gradient's seed, its weight (None: unweighted), what is wrong with it."""

  seed: int
  weight: float | None = None
  poison: float | None = None  # NaN or inf, written into one entry of the large leaf
  scale: float = 1.0  # 1e3: a gradient that skip.large_updates rejects


@dataclasses.dataclass(frozen=True)
class Row:
  """A behaviour: the windows fed, and the settings they are fed with.

  `k` is the stateful forms' window length, the micro-batches that count
  (skipped ones do not); `microbatch` runs each window's micro-batches in one
  call. With `flush`, the last window holds fewer than k micro-batches and is
  closed by a flush.
  """

  windows: tuple[tuple[MicroBatch, ...], ...]
  k: int = 3
  reduction: str = "mean"
  skip: str | None = None
  accumulator: str | None = None  # "float32", "float64", "stochastic_bfloat16"
  params: str = "float32"
  grads: str | None = None  # None: the parameters' dtype
  statistics: bool = False
  flush: bool = False


def m(seed, weight=None, *, poison=None, scale=1.0):
  return MicroBatch(seed, weight, poison, scale)


def weighted(*weights):
  """One window of micro-batches 0, 1, ... with these weights."""
  return (tuple(m(i, w) for i, w in enumerate(weights)),)


PLAIN = ((m(0), m(1), m(2)),)
WEIGHTS = weighted(1.0, 2.5, 0.5)
ROWS = {
  "mean": Row(PLAIN),
  "sum": Row(PLAIN, reduction="sum"),
  "weighted_mean": Row(WEIGHTS),
  "weighted_sum": Row(WEIGHTS, reduction="sum"),
  "nan_weight": Row(weighted(1.0, NAN, 2.0, 0.5)),
  "inf_weight": Row(weighted(1.0, INF, 2.0, 0.5)),
  "negative_weight": Row(weighted(1.0, -1.0, 2.0, 0.5)),
  "negative_weight_sum": Row(weighted(1.0, -1.0, 2.0, 0.5), reduction="sum"),
  "nan_weight_of_a_nan_gradient": Row(((m(0, 1.0), m(1, NAN, poison=NAN), m(2, 2.0), m(3, 0.5)),)),
  "zero_weight": Row(weighted(1.0, 0.0, 2.0)),
  "zero_weight_of_a_nan_gradient": Row(((m(0, 1.0), m(1, 0.0, poison=NAN), m(2, 2.0)),)),
  "all_zero_window": Row(WEIGHTS + ((m(3, 0.0), m(4, 0.0), m(5, 0.0)),)),
  "guard_drops_a_nan_window": Row(((m(0), m(1, poison=NAN), m(2)), (m(3), m(4), m(5)))),
  "guard_drops_an_inf_window": Row(((m(0, 1.0), m(1, 2.0, poison=INF), m(2, 1.0)),)),
  "skip_not_finite": Row(((m(0), m(1, poison=NAN), m(2), m(3)),), skip="not_finite"),
  "skip_large_updates": Row(((m(0), m(1, scale=1e3), m(2), m(3)),), skip="large_updates"),
  "statistics": Row(WEIGHTS, statistics=True),
  "statistics_complex64": Row(WEIGHTS, params="complex64", statistics=True),
  "complex64": Row(weighted(1.0, NAN, 2.0, 0.5), params="complex64"),
  "bfloat16_params_float32_grads": Row(WEIGHTS, params="bfloat16", grads="float32"),
  "bfloat16_params_float32_accumulator": Row(
    WEIGHTS, params="bfloat16", grads="float32", accumulator="float32"
  ),
  "float64_accumulator_x64": Row(weighted(1.0, 3.0, 7.0), params="float64", accumulator="float64"),
  "stochastic_bfloat16": Row(WEIGHTS, accumulator="stochastic_bfloat16"),
  "flush_of_a_partial_window": Row(((m(0), m(1)),), k=4, flush=True),
}
FORMS = ["update_jit", "apply_gradients_jit", "multisteps", "microbatch", "microbatch_jit"]


# --- The data --------------------------------------------------------------------------


def _wide(dtype):
  """The reference's dtype for values of `dtype`: float64, or complex128 for complex."""
  return np.complex128 if np.issubdtype(np.dtype(dtype), np.complexfloating) else np.float64


def _normal(rng, shape, dtype):
  values = rng.normal(size=shape)
  if np.issubdtype(np.dtype(dtype), np.complexfloating):
    values = values + 1j * rng.normal(size=shape)
  return values


def initial_params(row):
  """The parameters, as NumPy arrays of the row's dtype (bfloat16 by ml_dtypes)."""
  rng = np.random.default_rng(100)
  dtype = jnp.dtype(row.params)
  return {name: _normal(rng, shape, dtype).astype(dtype) for name, shape in SHAPES.items()}


def gradient(row, micro_batch):
  """A micro-batch's gradient: mean 1 (1 + 1j), unit noise, in the gradients' dtype."""
  dtype = jnp.dtype(row.grads or row.params)
  rng = np.random.default_rng(micro_batch.seed)
  signal = 1 + 1j if np.issubdtype(dtype, np.complexfloating) else 1.0
  grads = {
    name: ((signal + _normal(rng, shape, dtype)) * micro_batch.scale).astype(dtype)
    for name, shape in SHAPES.items()
  }
  if micro_batch.poison is not None:
    name, index = POISONED
    grads[name][index] = micro_batch.poison
  return grads


# --- The reference ---------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
  """What a form left: parameters, and, where the form tells, flags, counters, statistics."""

  params: dict
  has_updated: list | None = None  # after each window
  counters: dict | None = None
  statistics: dict | None = None


def _flat(tree, dtype):
  return np.concatenate([np.ravel(tree[name]).astype(dtype) for name in SHAPES])


def reference_statistics(kept, total):
  """The window statistics by their definitions, from its micro-batches of positive weight."""
  weights = np.array([w for w, _ in kept])
  grads = np.stack([_flat(g, _wide(g["large"].dtype)) for _, g in kept])
  count = len(kept)
  mean = (weights[:, None] * grads).sum(axis=0) / total
  squares = (weights * np.sum(np.abs(grads) ** 2, axis=1)).sum() / total
  spread = (weights * np.sum(np.abs(grads - mean) ** 2, axis=1)).sum() / total
  trace = total * spread / (count - 1)
  squared_norm = np.sum(np.abs(mean) ** 2) - trace / total
  return {
    "window_norm": np.linalg.norm(mean),
    "micro_batch_squared_norm": squares,
    "gradient_squared_norm": squared_norm,
    "trace_covariance": trace,
    "noise_scale": trace / squared_norm,
    "batch_size": total,
    "num_micro_batches": count,
  }


def _policy_skips(row, grads):
  if row.skip == "not_finite":
    return not all(np.isfinite(g).all() for g in grads.values())
  if row.skip == "large_updates":
    squared_norm = sum(np.sum(np.abs(g) ** 2) for g in grads.values())
    return not squared_norm < MAX_SQUARED_NORM
  return False


def _weight_skips(micro_batch):
  w = micro_batch.weight
  return w is not None and not (math.isfinite(w) and w >= 0)


@functools.cache
def reference(name):
  """The outcome the definitions give for row `name`, in float64 (complex128)."""
  row = ROWS[name]
  wide = _wide(jnp.dtype(row.params))
  params = {n: p.astype(wide) for n, p in initial_params(row).items()}
  counters = dict(gradient_step=0, num_skipped=0, num_skipped_windows=0, num_empty_windows=0)
  has_updated, statistics = [], None
  for window in row.windows:
    kept, total = [], 0.0
    for micro_batch in window:
      grads = {n: g.astype(wide) for n, g in gradient(row, micro_batch).items()}
      if _weight_skips(micro_batch) or _policy_skips(row, grads):
        counters["num_skipped"] += 1
        continue
      weight = 1.0 if micro_batch.weight is None else micro_batch.weight
      total += weight
      if weight > 0:  # a weight of 0 adds nothing
        kept.append((weight, grads))
    if total == 0:
      counters["num_empty_windows"] += 1
      has_updated.append(False)
      continue
    divisor = total if row.reduction == "mean" else 1.0
    value = {n: sum(w * g[n] for w, g in kept) / divisor for n in SHAPES}
    if not all(np.isfinite(v).all() for v in value.values()):
      counters["num_skipped_windows"] += 1
      has_updated.append(False)
      continue
    params = {n: params[n] - LEARNING_RATE * value[n] for n in SHAPES}
    counters["gradient_step"] += 1
    has_updated.append(True)
    statistics = reference_statistics(kept, total) if row.statistics else None
  return Outcome(params, has_updated, counters, statistics)


# --- The forms -------------------------------------------------------------------------


def _accumulator(name):
  """`accumulator=` for a row's name of one (None, a dtype, or "stochastic_bfloat16")."""
  if name == "stochastic_bfloat16":
    return optaccum.stochastic_bfloat16(key=0)
  return None if name is None else jnp.dtype(name)


def _config(row):
  """What a transformation depends on; rows with equal configurations share compiled steps."""
  return (row.k, row.reduction, row.skip, row.accumulator, row.statistics, row.params == "float64")


@functools.cache
def transformation(config):
  k, reduction, skip, accumulator, statistics, _ = config
  return optaccum.accumulate(
    optax.sgd(LEARNING_RATE),
    k,
    reduction=reduction,
    skip=SKIP_POLICIES.get(skip),
    accumulator=_accumulator(accumulator),
    statistics=statistics,
  )


@functools.cache
def multisteps(config):
  k, reduction, skip, accumulator, _, _ = config
  return optaccum.compat.MultiSteps(
    optax.sgd(LEARNING_RATE),
    every_k_schedule=k,
    use_grad_mean=reduction == "mean",
    should_skip_update_fn=SKIP_POLICIES.get(skip),
    accumulator_dtype=_accumulator(accumulator),
  )


def apply_updates(params, updates):
  """`optax.apply_updates`, which adds float32 updates to bfloat16 parameters by
  implicit promotion: strict promotion refuses that inside optax, the caller's code."""
  with jax.numpy_dtype_promotion("standard"):
    return optax.apply_updates(params, updates)


@functools.cache
def micro_step(form, config):
  """`(grads, state, params, weight) -> (params, state)` for a stateful form."""
  if form == "multisteps":
    opt = multisteps(config)

    def step(grads, state, params, weight):
      updates, state = opt.update(grads, state, params, weight=weight)
      return apply_updates(params, updates), state

    return step  # `MultiSteps.update` compiles itself

  elif form == "apply_gradients_jit":
    tx = transformation(config)

    def step(grads, state, params, weight):
      return optaccum.apply_gradients(tx, grads, state, params, weight=weight)

  else:
    tx = transformation(config)

    def step(grads, state, params, weight):
      updates, state = tx.update(grads, state, params, weight=weight)
      return apply_updates(params, updates), state

  return jax.jit(step)


@functools.cache
def flush_step(form, config):
  """`(grads, state, params) -> (params, state)`: closes a partial window now."""
  if form == "multisteps":
    opt = multisteps(config)

    def flush(grads, state, params):
      # `MultiSteps.update` takes `accumulate`'s flush: zero gradients of weight 0.
      zeros = jax.tree.map(jnp.zeros_like, grads)
      weight, now = jnp.float32(0), jnp.array(True)
      updates, state = opt.update(zeros, state, params, weight=weight, flush=now)
      return apply_updates(params, updates), state

    return flush
  tx = transformation(config)

  def flush(grads, state, params):
    if form == "apply_gradients_jit":
      zeros = jax.tree.map(jnp.zeros_like, grads)
      return optaccum.apply_gradients(tx, zeros, state, params, weight=0.0, flush=True)
    updates, state = optaccum.flush(tx, state, params)
    return apply_updates(params, updates), state

  return jax.jit(flush)


def run_stateful(name, form):
  row = ROWS[name]
  config = _config(row)
  params = jax.tree.map(jnp.asarray, initial_params(row))
  opt = multisteps(config) if form == "multisteps" else transformation(config)
  state = opt.init(params)
  step, has_updated = micro_step(form, config), []
  for index, window in enumerate(row.windows):
    for micro_batch in window:
      grads = jax.tree.map(jnp.asarray, gradient(row, micro_batch))
      weight = None if micro_batch.weight is None else jnp.float32(micro_batch.weight)
      params, state = step(grads, state, params, weight)
    if row.flush and index == len(row.windows) - 1:
      params, state = flush_step(form, config)(grads, state, params)
    if form == "multisteps":
      has_updated.append(bool(opt.has_updated(state)))
    else:
      has_updated.append(bool(optaccum.status(state).has_updated))
  if form == "multisteps":  # its state is another engineer's: flags and parameters only
    return Outcome(params, has_updated)
  info = optaccum.status(state)
  counters = {field: int(getattr(info, field)) for field in reference(name).counters}
  statistics = info.statistics._asdict() if row.statistics else None
  return Outcome(params, has_updated, counters, statistics)


def _per_micro_batch_gradient(params, batch):
  """`fn` for `microbatch`: the micro-batch's gradient is its (one-row) batch."""
  del params
  return jnp.zeros((), jnp.float32), jax.tree.map(lambda leaf: leaf[0], batch["grads"])


@functools.cache
def split_function(form, k, reduction, accumulator, is_weighted):
  split = optaccum.microbatch(
    _per_micro_batch_gradient,
    k,
    reduction=reduction,
    weight_fn=(lambda params, batch: batch["weight"][0]) if is_weighted else None,
    accumulator=_accumulator(accumulator),
  )
  return jax.jit(split) if form == "microbatch_jit" else split


def run_microbatch(name, form):
  """One `microbatch` call per window, then one step of the same SGD."""
  row = ROWS[name]
  inner = optax.sgd(LEARNING_RATE)
  params = jax.tree.map(jnp.asarray, initial_params(row))
  state = inner.init(params)
  for window in row.windows:
    is_weighted = window[0].weight is not None
    batch = {
      "grads": {
        name: jnp.stack([jnp.asarray(gradient(row, mb)[name]) for mb in window]) for name in SHAPES
      },
    }
    if is_weighted:
      batch["weight"] = jnp.asarray([mb.weight for mb in window], jnp.float32)
    split = split_function(form, len(window), row.reduction, row.accumulator, is_weighted)
    _, grads = split(params, batch)
    updates, state = inner.update(grads, state, params)
    params = apply_updates(params, updates)
  return Outcome(params)


def not_applicable(row, form):
  """Why `form` cannot run `row`, or None where it can."""
  if form.startswith("microbatch"):
    if row.skip or row.statistics or row.flush:
      return "microbatch has no skip policy, statistics or flush: its window is one call"
    if row.accumulator == "stochastic_bfloat16":
      return "microbatch refuses stochastic rounding (tested on its own)"
    for window in row.windows:
      for micro_batch in window:
        weight = 1.0 if micro_batch.weight is None else micro_batch.weight
        adds = not _weight_skips(micro_batch) and weight > 0
        if adds and micro_batch.poison is not None:
          return "microbatch has no window guard: a NaN gradient it adds reaches the step"
  if form == "multisteps" and (row.statistics or row.accumulator == "stochastic_bfloat16"):
    return "MultiSteps takes optax's arguments: no statistics, a dtype as accumulator_dtype"
  return None


# --- The comparison --------------------------------------------------------------------


def tolerance(row):
  """`(rtol, atol)` for the parameters, from the rounding of the row's dtypes."""
  if row.params == "float64":
    return 1e-12, 1e-12
  if row.accumulator == "stochastic_bfloat16":
    # Three stochastic roundings into bfloat16 of sums up to ~16 (a gap of
    # 2**-3), averaged and scaled by the learning rate: under 0.05.
    return 0.0, 0.05
  if row.params == "bfloat16":
    return 2.0**-7, 1e-6  # one rounding of the parameters into bfloat16
  return 1e-5, 1e-6


def _describe(actual, expected):
  """Where `actual` and `expected` differ most (or where `actual` is not finite), in words."""
  bad = ~np.isfinite(actual)
  if bad.any():
    index = tuple(int(i) for i in np.argwhere(bad)[0])
    return f"{int(bad.sum())} non-finite entries, e.g. {actual[index]} at {index}"
  difference = np.abs(actual - expected)
  index = tuple(int(i) for i in np.unravel_index(np.argmax(difference), actual.shape))
  return (
    f"largest difference {difference[index]:.3g} at {index}: "
    f"{actual[index]:.6g} != {expected[index]:.6g}"
  )


def compare(row, actual, expected):
  """The mismatches between two outcomes, as readable lines."""
  problems = []
  if actual.has_updated is not None and actual.has_updated != expected.has_updated:
    problems.append(f"has_updated per window {actual.has_updated} != {expected.has_updated}")
  if actual.counters is not None and actual.counters != expected.counters:
    problems.append(f"counters {actual.counters} != {expected.counters}")
  rtol, atol = tolerance(row)
  wide = _wide(jnp.dtype(row.params))
  for name in SHAPES:
    value = np.asarray(actual.params[name]).astype(wide)
    if not np.allclose(value, expected.params[name], rtol=rtol, atol=atol):
      problems.append(f"params[{name!r}]: {_describe(value, expected.params[name])}")
  if actual.statistics is not None:
    for field, value in expected.statistics.items():
      got = float(actual.statistics[field])
      if not np.isclose(got, value, rtol=1e-4, atol=0):
        problems.append(f"statistics.{field}: {got} != {value}")
  return problems


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", list(ROWS))
def test_every_form_keeps_the_contract(name, form):
  row = ROWS[name]
  reason = not_applicable(row, form)
  if reason is not None:
    pytest.skip(reason)
  with jax.enable_x64(row.params == "float64"):
    run = run_microbatch if form.startswith("microbatch") else run_stateful
    actual = run(name, form)
    problems = compare(row, actual, reference(name))
  if problems:
    pytest.fail(f"{name} through {form}:\n  " + "\n  ".join(problems))


def test_the_parameters_keep_their_dtypes_in_every_form():
  # The reference's float64 values say nothing about dtypes: checked here once.
  for form in ("update_jit", "multisteps", "microbatch"):
    run = run_microbatch if form.startswith("microbatch") else run_stateful
    params = run("bfloat16_params_float32_accumulator", form).params
    assert all(params[name].dtype == jnp.bfloat16 for name in SHAPES), form


def test_microbatch_refuses_stochastic_rounding():
  message = r"`microbatch\(accumulator=...\)` sums within one step, where stochastic rounding"
  with pytest.raises(ValueError, match=message):
    optaccum.microbatch(
      _per_micro_batch_gradient, 3, accumulator=optaccum.stochastic_bfloat16(key=0)
    )

"""BatchNorm running statistics per window: `merge_batch_stats` and `BatchStatsWindow`.

Two references. The exact one is NumPy: the float64 mean and biased variance of
the activations each BatchNorm layer saw in the window's micro-batches (recorded
with `sow`), put through flax's update `m * old + (1 - m) * stat` once per
window. The other is one large-batch `apply`: its first BatchNorm layer sees the
same activations, so it must agree as tightly; deeper layers see activations
normalized by micro-batch statistics ("ghost batch norm"), which differ, so
they can only come close, while chaining k updates per window is far off.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen
from flax.training import train_state

import optaccum
from tests.helpers import assert_trees_close

MOMENTUM = 0.9
EVERY_K = 4
BATCH = 64
WINDOWS = 3
HIDDEN = 32
WIDE = 2**17  # features of the one large statistics leaf
CLASSES = 3
# Against float64 NumPy, relative to each leaf's largest value, the helper's float32
# statistics were off by at most 1.4e-7 (mean) and 2.7e-7 (var); flax's own
# large-batch apply by up to 4.4e-7 and 1.5e-6 (its one-pass variance, E[x^2] - E[x]^2).
RTOL = 2e-6


class Norm(linen.Module):
  """A BatchNorm that records its input, for the NumPy reference."""

  train: bool

  @linen.compact
  def __call__(self, x):
    self.sow("intermediates", "input", x)
    return linen.BatchNorm(use_running_average=not self.train, momentum=MOMENTUM)(x)


class Block(linen.Module):
  train: bool

  @linen.compact
  def __call__(self, x):
    return jax.nn.relu(Norm(self.train)(linen.Conv(4, (3, 3))(x)))


class Net(linen.Module):
  """Two nested conv blocks and a dense layer, each followed by a BatchNorm."""

  @linen.compact
  def __call__(self, x, train):
    x = Block(train)(x)
    x = Block(train)(x)
    x = jax.nn.relu(Norm(train)(linen.Dense(HIDDEN)(jnp.mean(x, axis=(1, 2)))))
    return linen.Dense(CLASSES)(x)


MODEL = Net()


def make_windows(seed=0):
  """WINDOWS batches of BATCH 6x6 one-channel images (mean 1, so that the means matter)."""
  rng = np.random.default_rng(seed)
  xs = rng.normal(size=(WINDOWS, BATCH, 6, 6, 1)) * 2.0 + 1.0
  ys = rng.integers(0, CLASSES, size=(WINDOWS, BATCH))
  return jnp.asarray(xs, jnp.float32), jnp.asarray(ys, jnp.int32)


@functools.cache
def initial_variables():
  xs, _ = make_windows()
  variables = jax.jit(functools.partial(MODEL.init, train=False))(jax.random.key(0), xs[0])
  return variables["params"], variables["batch_stats"]


def loss_fn(params, x, y, batch_stats):
  """Training-mode loss; the aux is the `batch_stats` this batch would write."""
  logits, updates = MODEL.apply(
    {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
  )
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return loss, updates["batch_stats"]


grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
large_batch_step = jax.jit(grad_fn)
microbatch_step = jax.jit(
  optaccum.microbatch(grad_fn, EVERY_K, has_aux=True, aux_reduction="stack")
)


@jax.jit
def layer_inputs(params, batch_stats, x):
  """What each BatchNorm layer saw in one training-mode apply on `x`."""
  _, recorded = MODEL.apply(
    {"params": params, "batch_stats": batch_stats},
    x,
    train=True,
    mutable=["batch_stats", "intermediates"],
  )
  return recorded["intermediates"]


def is_layer(x):
  return isinstance(x, dict) and sorted(x) == ["mean", "var"]


def layers(batch_stats):
  """The BatchNorm layers' statistics, in tree order."""
  return jax.tree.leaves(batch_stats, is_leaf=is_layer)


def numpy_statistics(params, old, micro_batches):
  """The running statistics after one window, from float64 statistics of what the layers saw."""
  seen = [jax.tree.leaves(layer_inputs(params, old, x)) for x in micro_batches]
  new = []
  for index, layer in enumerate(layers(old)):
    values = np.concatenate([np.asarray(inputs[index], np.float64) for inputs in seen])
    axes = tuple(range(values.ndim - 1))  # all but the features
    new.append(
      {
        name: MOMENTUM * np.asarray(layer[name], np.float64) + (1 - MOMENTUM) * stat
        for name, stat in (("mean", values.mean(axes)), ("var", values.var(axes)))
      }
    )
  return jax.tree.unflatten(jax.tree.structure(old, is_leaf=is_layer), new)


def microbatches(x):
  """The micro-batches `optaccum.microbatch` forms: rows i, i + k, i + 2k, ..."""
  return [x[i::EVERY_K] for i in range(EVERY_K)]


def assert_statistics_close(actual, expected, rtol=RTOL):
  """Leafwise, relative to each leaf's largest value (a mean can be near 0 elementwise)."""
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for (path, a), b in zip(
    jax.tree_util.tree_flatten_with_path(actual)[0], jax.tree.leaves(expected)
  ):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    np.testing.assert_allclose(
      a, b, rtol=0, atol=rtol * np.max(np.abs(b)), err_msg=jax.tree_util.keystr(path)
    )


def relative_error(actual, expected, name):
  """`|a - b| / |b|` over all layers' `name` ("mean" or "var") leaves together."""
  a = np.concatenate([np.asarray(layer[name], np.float64) for layer in layers(actual)])
  b = np.concatenate([np.asarray(layer[name], np.float64) for layer in layers(expected)])
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def in_step_windows():
  return window_statistics()


def window_statistics():
  """Each window's running statistics, four ways, all from the same parameters.

  Merged from `optaccum.microbatch`'s stack, the NumPy reference, one
  large-batch apply's, and k chained micro-batch applies' (the naive way).
  """
  params, start = initial_variables()
  xs, ys = make_windows()
  merged = large = chained = start
  windows = []
  for window in range(WINDOWS):
    expected = numpy_statistics(params, merged, microbatches(xs[window]))
    (_, stacked), _ = microbatch_step(params, xs[window], ys[window], batch_stats=merged)
    assert jax.tree.leaves(stacked)[0].shape[0] == EVERY_K
    merged = optaccum.flax.merge_batch_stats(stacked, momentum=MOMENTUM)
    (_, large), _ = large_batch_step(params, xs[window], ys[window], large)
    for x, y in zip(microbatches(xs[window]), microbatches(ys[window])):
      (_, chained), _ = large_batch_step(params, x, y, chained)
    windows.append({"merged": merged, "numpy": expected, "large": large, "chained": chained})
  return windows


def test_microbatch_merge_equals_the_window_statistics_after_one_and_several_windows(
  in_step_windows,
):
  for window in (in_step_windows[0], in_step_windows[-1]):
    assert_statistics_close(window["merged"], window["numpy"])


def test_merge_matches_large_batch_where_chained_micro_batch_updates_are_far_off(
  in_step_windows,
):
  for window in (in_step_windows[0], in_step_windows[-1]):
    merged, large, chained = window["merged"], window["large"], window["chained"]
    # The first layer sees the large batch's inputs: equal to rounding.
    assert_statistics_close(merged["Block_0"], large["Block_0"])
    for name in ("mean", "var"):
      # Deeper layers see micro-batch-normalized inputs (ghost batch norm): close,
      # not equal. Measured 3.5e-4 to 6.7e-4 (mean) and 1e-4 to 5.3e-4 (var) over
      # the windows, against 1.7 to 2.5 (mean) and 0.33 to 0.63 (var) chained.
      assert relative_error(merged, large, name) < 3e-3
      assert relative_error(chained, large, name) > 0.2


def test_micro_batch_normalization_gives_other_gradients_than_the_large_batch():
  # What cannot be equal: each micro-batch is normalized by its own statistics.
  params, start = initial_variables()
  xs, ys = make_windows()
  _, large_grads = large_batch_step(params, xs[0], ys[0], start)
  _, split_grads = microbatch_step(params, xs[0], ys[0], batch_stats=start)
  difference = optax.tree.norm(jax.tree.map(jnp.subtract, split_grads, large_grads))
  # Measured 0.24 of the large batch's gradient norm.
  assert difference / optax.tree.norm(large_grads) > 0.05


class BatchNormState(train_state.TrainState):
  batch_stats: dict
  batch_stats_window: optaccum.flax.BatchStatsWindow


LEARNING_RATE = 0.05


def create_state(skip=None):
  params, batch_stats = initial_variables()
  return BatchNormState.create(
    apply_fn=MODEL.apply,
    params=params,
    tx=optaccum.accumulate(optax.sgd(LEARNING_RATE), EVERY_K, skip=skip),
    batch_stats=batch_stats,
    batch_stats_window=optaccum.flax.BatchStatsWindow.create(batch_stats),
  )


@jax.jit
def micro_step_closed_by_has_updated(state, x, y):
  (_, new_stats), grads = grad_fn(state.params, x, y, state.batch_stats)
  window = state.batch_stats_window.add(new_stats)
  state = state.apply_gradients(grads=grads)
  info = optaccum.status(state.opt_state)
  # `reset`: a window the guard dropped ends too, and its statistics go with it.
  batch_stats, window = window.close(
    state.batch_stats, momentum=MOMENTUM, when=info.has_updated, reset=info.mini_step == 0
  )
  return state.replace(batch_stats=batch_stats, batch_stats_window=window)


@jax.jit
def micro_step_closed_by_count(state, x, y):
  (_, new_stats), grads = grad_fn(state.params, x, y, state.batch_stats)
  closes = optaccum.status(state.opt_state).mini_step == EVERY_K - 1
  batch_stats, window = state.batch_stats_window.add(new_stats).close(
    state.batch_stats, momentum=MOMENTUM, when=closes
  )
  return optaccum.flax.apply_train_state_gradients(
    state, grads=grads, batch_stats=batch_stats, batch_stats_window=window
  )


@pytest.mark.parametrize(
  "micro_step", [micro_step_closed_by_has_updated, micro_step_closed_by_count]
)
def test_window_in_a_train_state_equals_the_window_statistics(micro_step):
  state = create_state()
  xs, ys = make_windows()
  for window in range(WINDOWS):
    start = state.batch_stats
    expected = numpy_statistics(state.params, start, microbatches(xs[window]))
    for i, (x, y) in enumerate(zip(microbatches(xs[window]), microbatches(ys[window]))):
      state = micro_step(state, x, y)
      if i < EVERY_K - 1:  # the window-start statistics stay until the window closes
        assert jax.tree.all(jax.tree.map(jnp.array_equal, state.batch_stats, start))
    assert float(state.batch_stats_window.weight) == 0.0
    assert_statistics_close(state.batch_stats, expected)
  assert int(optaccum.flax.gradient_step(state)) == WINDOWS


def reference_training(windows):
  """Plain large-window training, by hand: per window, SGD on the mean of the
  micro-batches' gradients (float64), and the running statistics of NumPy."""
  params, batch_stats = initial_variables()
  for window in windows:
    grads = [large_batch_step(params, x, y, batch_stats)[1] for x, y in window]
    new_stats = numpy_statistics(params, batch_stats, [x for x, _ in window])
    params = jax.tree.map(
      lambda p, *g: np.asarray(p, np.float64) - LEARNING_RATE * np.mean(np.stack(g), axis=0),
      params,
      *grads,
    )
    params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params)
    batch_stats = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), new_stats)
  return params, batch_stats


@pytest.mark.parametrize("skip", [None, optaccum.skip.not_finite], ids=["guard", "skip"])
def test_a_nan_micro_batch_leaves_parameters_and_batch_stats_clean(skip):
  # One micro-batch of the middle window has a NaN input: its gradients and its
  # BatchNorm statistics are NaN. With the window guard alone the window is
  # dropped whole (the reference trains on the other windows); with
  # `skip.not_finite` only the micro-batch is (the window closes one
  # micro-batch later, on the clean ones).
  xs, ys = make_windows()
  clean = [list(zip(microbatches(xs[w]), microbatches(ys[w]))) for w in range(WINDOWS)]
  x, y = clean[1][2]
  poisoned = (x.at[0, 0, 0, 0].set(jnp.nan), y)
  if skip is None:
    fed = [clean[0], clean[1][:2] + [poisoned] + clean[1][3:], clean[2]]
    expected_params, expected_stats = reference_training([clean[0], clean[2]])
  else:
    fed = [clean[0], clean[1][:2] + [poisoned] + clean[1][2:], clean[2]]
    expected_params, expected_stats = reference_training(clean)
  state = create_state(skip)
  for window in fed:
    for x, y in window:
      state = micro_step_closed_by_has_updated(state, x, y)
  info = optaccum.status(state.opt_state)
  assert int(info.num_skipped_windows) == (1 if skip is None else 0)
  assert int(info.num_skipped) == (0 if skip is None else 1)
  assert int(state.batch_stats_window.num_skipped) == 1  # the NaN statistics
  assert float(state.batch_stats_window.weight) == 0.0
  assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(state))
  assert_trees_close(state.params, expected_params, rtol=1e-5, atol=1e-6)
  assert_statistics_close(state.batch_stats, expected_stats)


def test_reset_discards_the_window_and_when_false_keeps_the_statistics():
  # A window the guard drops can hold finite statistics (a NaN label, not input).
  x, old = small_layer()
  parts = split_rows(x, 4)
  window = optaccum.flax.BatchStatsWindow.create(old)
  for part in parts[:2]:
    window = window.add(layer_stats(part, old))
  kept, window = window.close(old, momentum=MOMENTUM, when=False, reset=jnp.array(True))
  assert jax.tree.all(jax.tree.map(jnp.array_equal, kept, old))
  assert float(window.weight) == 0.0
  for part in parts[2:]:
    window = window.add(layer_stats(part, old))
  closed, _ = window.close(old, momentum=MOMENTUM)
  # The next window's statistics are its own micro-batches' only.
  assert_statistics_close(closed, numpy_layer_statistics(jnp.concatenate(parts[2:]), old, MOMENTUM))


@functools.cache
def small_layer():
  """BATCH examples of 8 features (offset 3), and the running statistics before them."""
  rng = np.random.default_rng(3)
  x = rng.normal(size=(BATCH, 8)) * rng.uniform(0.5, 2.0, size=8) + 3.0
  old = {"mean": rng.normal(size=8), "var": rng.uniform(0.5, 2.0, size=8)}
  return jnp.asarray(x, jnp.float32), jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), old)


def split_rows(x, count):
  return [x[i * len(x) // count : (i + 1) * len(x) // count] for i in range(count)]


@jax.jit
def layer_stats(x, old):
  """The `batch_stats` one training-mode BatchNorm apply on `x` writes, from `old`."""
  layer = linen.BatchNorm(use_running_average=False, momentum=MOMENTUM, use_scale=False)
  _, updates = layer.clone(use_bias=False).apply({"batch_stats": old}, x, mutable=["batch_stats"])
  return updates["batch_stats"]


def stack(trees):
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


BAD_WEIGHTS = [float("nan"), float("inf"), -1.0]


@pytest.mark.parametrize("bad", BAD_WEIGHTS)
def test_window_skips_a_micro_batch_of_nan_infinite_or_negative_weight(bad):
  x, old = small_layer()
  parts = split_rows(x, 4)
  window = optaccum.flax.BatchStatsWindow.create(old)
  for i, part in enumerate(parts):
    window = window.add(layer_stats(part, old), weight=bad if i == 1 else len(part))
  assert int(window.num_skipped) == 1
  closed, _ = window.close(old, momentum=MOMENTUM)
  kept = jnp.concatenate([parts[0], parts[2], parts[3]])
  assert_statistics_close(closed, numpy_layer_statistics(kept, old, MOMENTUM))


def test_window_skips_a_micro_batch_whose_statistics_are_not_finite():
  x, old = small_layer()
  parts = split_rows(x, 4)
  window = optaccum.flax.BatchStatsWindow.create(old)
  for i, part in enumerate(parts):
    window = window.add(layer_stats(part.at[0, 2].set(jnp.inf) if i == 3 else part, old))
  assert int(window.num_skipped) == 1
  closed, _ = window.close(old, momentum=MOMENTUM)
  assert_statistics_close(closed, numpy_layer_statistics(x[: 3 * len(x) // 4], old, MOMENTUM))


def test_window_zero_weight_adds_nothing_and_zero_total_keeps_the_statistics():
  x, old = small_layer()
  parts = split_rows(x, 4)
  window = optaccum.flax.BatchStatsWindow.create(old)
  for i, part in enumerate(parts):
    window = window.add(layer_stats(part, old), weight=0.0 if i == 0 else 1.0)
  assert int(window.num_skipped) == 0  # a weight of 0 is no skip
  closed, _ = window.close(old, momentum=MOMENTUM)
  assert_statistics_close(closed, numpy_layer_statistics(x[len(x) // 4 :], old, MOMENTUM))
  empty = optaccum.flax.BatchStatsWindow.create(old)
  for part in parts:
    empty = empty.add(layer_stats(part, old), weight=0.0)
  kept, _ = empty.close(old, momentum=MOMENTUM)
  assert jax.tree.all(jax.tree.map(jnp.array_equal, kept, old))


@pytest.mark.parametrize("bad", BAD_WEIGHTS)
def test_merge_skips_a_micro_batch_of_nan_infinite_or_negative_weight(bad):
  x, old = small_layer()
  parts = split_rows(x, 4)
  stacked = stack([layer_stats(part, old) for part in parts])
  weights = jnp.array([16.0, bad, 16.0, 16.0])
  merged = optaccum.flax.merge_batch_stats(
    stacked, momentum=MOMENTUM, weights=weights, batch_stats=old
  )
  kept = jnp.concatenate([parts[0], parts[2], parts[3]])
  assert_statistics_close(merged, numpy_layer_statistics(kept, old, MOMENTUM))


@pytest.mark.parametrize("weighted", [False, True])
def test_merge_skips_a_micro_batch_whose_statistics_are_not_finite(weighted):
  x, old = small_layer()
  parts = split_rows(x, 4)
  parts[0] = parts[0].at[3, 1].set(jnp.nan)
  stacked = stack([layer_stats(part, old) for part in parts])
  options = {"weights": jnp.full(4, 16.0), "batch_stats": old} if weighted else {}
  merged = optaccum.flax.merge_batch_stats(stacked, momentum=MOMENTUM, **options)
  assert_statistics_close(merged, numpy_layer_statistics(x[len(x) // 4 :], old, MOMENTUM))


def test_merge_of_zero_total_weight_returns_the_statistics_unchanged():
  x, old = small_layer()
  stacked = stack([layer_stats(part, old) for part in split_rows(x, 4)])
  for weights in (jnp.zeros(4), jnp.array([0.0, jnp.nan, -2.0, 0.0])):
    kept = optaccum.flax.merge_batch_stats(
      stacked, momentum=MOMENTUM, weights=weights, batch_stats=old
    )
    assert jax.tree.all(jax.tree.map(jnp.array_equal, kept, old))


@functools.cache
def wide_inputs():
  """BATCH examples of WIDE features, each of its own scale and an offset of 4."""
  rng = np.random.default_rng(1)
  x = rng.normal(size=(BATCH, WIDE)).astype(np.float32) * rng.uniform(0.5, 3.0, size=WIDE) + 4.0
  old = {"mean": rng.normal(size=WIDE), "var": rng.uniform(0.5, 2.0, size=WIDE)}
  return jnp.asarray(x, jnp.float32), jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), old)


def numpy_layer_statistics(x, old, momentum):
  """One BatchNorm layer's running statistics after the batch `x`, in float64."""
  values = np.asarray(x, np.float64)
  return {
    "mean": momentum * np.asarray(old["mean"], np.float64) + (1 - momentum) * values.mean(0),
    "var": momentum * np.asarray(old["var"], np.float64) + (1 - momentum) * values.var(0),
  }


def test_weights_merge_micro_batches_of_unequal_size():
  x, old = wide_inputs()
  layer = linen.BatchNorm(use_running_average=False, momentum=MOMENTUM, use_scale=False)
  layer = layer.clone(use_bias=False)
  parts = [x[:16], x[16:]]
  new_stats = [
    layer.apply({"batch_stats": old}, part, mutable=["batch_stats"])[1] for part in parts
  ]
  new_stats = [updates["batch_stats"] for updates in new_stats]
  expected = numpy_layer_statistics(x, old, MOMENTUM)
  stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *new_stats)
  weighted = optaccum.flax.merge_batch_stats(
    stacked, momentum=MOMENTUM, weights=jnp.array([16, 48]), batch_stats=old
  )
  assert_statistics_close(weighted, expected)
  window = optaccum.flax.BatchStatsWindow.create(old)
  for stats, part in zip(new_stats, parts):
    window = window.add(stats, weight=part.shape[0])
  closed, _ = window.close(old, momentum=MOMENTUM)
  assert_statistics_close(closed, expected)
  # Unweighted, the 16 examples would count as much as the 48.
  unweighted = optaccum.flax.merge_batch_stats(stacked, momentum=MOMENTUM)
  assert relative_error(unweighted, expected, "var") > 1e-2  # measured 2.9e-2


@pytest.mark.parametrize("momentum", [0.0, 0.9, 0.999])
def test_merge_and_window_equal_numpy_statistics_of_a_wide_layer_for_any_momentum(momentum):
  x, old = wide_inputs()
  layer = linen.BatchNorm(use_running_average=False, momentum=momentum, use_scale=False)
  layer = layer.clone(use_bias=False)

  def new_stats(x):
    _, updates = layer.apply({"batch_stats": old}, x, mutable=["batch_stats"])
    return updates["batch_stats"]

  stacked = jax.jit(jax.vmap(new_stats))(jnp.reshape(x, (EVERY_K, -1, WIDE)))
  window = optaccum.flax.BatchStatsWindow.create(old)
  for i in range(EVERY_K):
    window = window.add(jax.tree.map(lambda leaf, i=i: leaf[i], stacked))
  closed, _ = window.close(old, momentum=momentum)
  expected = numpy_layer_statistics(x, old, momentum)
  assert_statistics_close(optaccum.flax.merge_batch_stats(stacked, momentum=momentum), expected)
  assert_statistics_close(closed, expected)


def test_bfloat16_statistics_are_combined_in_float32_and_kept_in_bfloat16():
  # flax's BatchNorm(force_float32_reductions=False) keeps bfloat16 statistics;
  # strict promotion (conftest) would refuse any implicit bfloat16-float32 mix.
  rng = np.random.default_rng(2)
  means = rng.normal(size=(EVERY_K, 8)) + 3.0
  variances = rng.uniform(0.5, 2.0, size=(EVERY_K, 8))
  stacked = {"mean": jnp.asarray(means, jnp.bfloat16), "var": jnp.asarray(variances, jnp.bfloat16)}
  means, variances = (np.asarray(stacked[name], np.float64) for name in ("mean", "var"))
  expected = {
    "mean": means.mean(0),
    "var": variances.mean(0) + means.var(0) / (1 - MOMENTUM),
  }
  merged = optaccum.flax.merge_batch_stats(stacked, momentum=MOMENTUM)
  window = optaccum.flax.BatchStatsWindow.create(jax.tree.map(lambda leaf: leaf[0], stacked))
  for i in range(EVERY_K):
    window = window.add(jax.tree.map(lambda leaf, i=i: leaf[i], stacked))
  closed, _ = window.close(jax.tree.map(lambda leaf: leaf[0], stacked), momentum=MOMENTUM)
  for result in (merged, closed):
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(result))
    assert_statistics_close(result, expected, rtol=2.0**-8)  # bfloat16's rounding


def test_an_empty_window_or_a_false_when_leaves_the_statistics_unchanged():
  _, start = initial_variables()
  window = optaccum.flax.BatchStatsWindow.create(start)
  closed, _ = window.close(start, momentum=MOMENTUM)  # nothing added
  assert jax.tree.all(jax.tree.map(jnp.array_equal, closed, start))
  added = window.add(jax.tree.map(lambda leaf: leaf + 1.0, start))
  kept, still_open = added.close(start, momentum=MOMENTUM, when=jnp.array(False))
  assert jax.tree.all(jax.tree.map(jnp.array_equal, kept, start))
  assert float(still_open.weight) == 1.0


# --- Errors: one test per message ----------------------------------------------------------

LAYER = {"mean": jnp.zeros(3), "var": jnp.ones(3)}
STACKED = {"mean": jnp.zeros((EVERY_K, 3)), "var": jnp.ones((EVERY_K, 3))}


@pytest.mark.parametrize("momentum", [1.0, -0.1, 1.5, True, "0.9", None])
@pytest.mark.parametrize("call", ["merge_batch_stats", "BatchStatsWindow.close"])
def test_momentum_outside_zero_to_one_is_refused(call, momentum):
  message = rf"`{call}\(momentum=...\)` must be a number with 0 <= momentum < 1"
  with pytest.raises(ValueError, match=message + ".*" + rf"got momentum={momentum!r}"):
    if call == "merge_batch_stats":
      optaccum.flax.merge_batch_stats(STACKED, momentum=momentum)
    else:
      optaccum.flax.BatchStatsWindow.create(LAYER).close(LAYER, momentum=momentum)


@pytest.mark.parametrize("call", ["merge_batch_stats", "BatchStatsWindow.create"])
def test_a_leaf_outside_a_batch_norm_layer_is_refused(call):
  tree = {"params": {"kernel": jnp.zeros((EVERY_K, 3))}, "batch_stats": {"norm": STACKED}}
  message = rf"`{call}\(.*=...\)` must hold only BatchNorm statistics.*\['params'\]\['kernel'\]"
  with pytest.raises(ValueError, match=message):
    if call == "merge_batch_stats":
      optaccum.flax.merge_batch_stats(tree, momentum=MOMENTUM)
    else:
      optaccum.flax.BatchStatsWindow.create(tree)


def test_a_tree_without_statistics_is_refused():
  with pytest.raises(ValueError, match=r"`merge_batch_stats\(stacked=...\)` holds no BatchNorm"):
    optaccum.flax.merge_batch_stats({}, momentum=MOMENTUM)


def test_integer_statistics_are_refused():
  stacked = {"mean": jnp.zeros((EVERY_K, 3), jnp.int32), "var": STACKED["var"]}
  with pytest.raises(TypeError, match=r"floating-point statistics, but the layer at the root"):
    optaccum.flax.merge_batch_stats(stacked, momentum=MOMENTUM)


def test_a_layer_without_a_micro_batch_axis_is_refused():
  layer = {"mean": jnp.zeros(()), "var": jnp.ones(())}
  with pytest.raises(ValueError, match=r"whose mean has shape \(\) .* leading micro-batch axis"):
    optaccum.flax.merge_batch_stats(layer, momentum=MOMENTUM)


def test_stacks_of_different_lengths_are_refused():
  stacked = {"a": STACKED, "b": {"mean": jnp.zeros((2, 3)), "var": jnp.ones((2, 3))}}
  message = r"of one length, but the leaf at \['a'\]\['mean'\] has 4 and .*\['b'\]\['mean'\] has 2"
  with pytest.raises(ValueError, match=message):
    optaccum.flax.merge_batch_stats(stacked, momentum=MOMENTUM)


def test_weights_of_another_length_are_refused():
  with pytest.raises(
    ValueError, match=r"`merge_batch_stats\(weights=...\)` .* shape \(4,\), got shape \(3,\)"
  ):
    optaccum.flax.merge_batch_stats(
      STACKED, momentum=MOMENTUM, weights=jnp.ones(3), batch_stats=LAYER
    )


def test_bool_weights_are_refused():
  with pytest.raises(
    TypeError, match=r"`merge_batch_stats\(weights=...\)` must hold numbers, got weights=Array"
  ):
    optaccum.flax.merge_batch_stats(
      STACKED, momentum=MOMENTUM, weights=jnp.ones(EVERY_K, jnp.bool_), batch_stats=LAYER
    )


def test_weights_without_batch_stats_are_refused():
  with pytest.raises(
    ValueError, match=r"`merge_batch_stats\(batch_stats=...\)` is required with weights=..."
  ):
    optaccum.flax.merge_batch_stats(STACKED, momentum=MOMENTUM, weights=jnp.ones(EVERY_K))


def test_merge_refuses_batch_stats_of_another_shape():
  wider = {"mean": jnp.zeros(4), "var": jnp.ones(4)}
  message = r"`merge_batch_stats\(batch_stats=...\)` does not match one micro-batch's"
  with pytest.raises(ValueError, match=message):
    optaccum.flax.merge_batch_stats(STACKED, momentum=MOMENTUM, batch_stats=wider)


def test_window_refuses_statistics_of_another_structure():
  window = optaccum.flax.BatchStatsWindow.create({"norm": LAYER})
  with pytest.raises(
    ValueError, match=r"`BatchStatsWindow.add\(batch_stats=...\)` has a tree structure"
  ):
    window.add({"other_norm": LAYER})


def test_window_refuses_statistics_of_another_shape():
  window = optaccum.flax.BatchStatsWindow.create(LAYER)
  wider = {"mean": jnp.zeros(4), "var": jnp.ones(4)}
  message = r"`BatchStatsWindow.close\(batch_stats=...\)` does not match the window at \['mean'\]"
  with pytest.raises(ValueError, match=message):
    window.close(wider, momentum=MOMENTUM)


def test_window_refuses_a_when_that_is_not_a_scalar_bool():
  window = optaccum.flax.BatchStatsWindow.create(LAYER)
  with pytest.raises(
    TypeError, match=r"`BatchStatsWindow.close\(when=...\)` must be a scalar bool"
  ):
    window.close(LAYER, momentum=MOMENTUM, when=jnp.ones(2, bool))


def test_window_refuses_a_reset_that_is_not_a_scalar_bool():
  window = optaccum.flax.BatchStatsWindow.create(LAYER)
  with pytest.raises(
    TypeError, match=r"`BatchStatsWindow.close\(reset=...\)` must be a scalar bool, got reset=1"
  ):
    window.close(LAYER, momentum=MOMENTUM, reset=1)


def test_window_refuses_a_weight_that_is_not_a_scalar():
  window = optaccum.flax.BatchStatsWindow.create(LAYER)
  with pytest.raises(ValueError, match=r"`BatchStatsWindow.add\(weight=...\)` must be a scalar"):
    window.add(LAYER, weight=jnp.ones(2))

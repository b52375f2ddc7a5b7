"""Bad input at `merge_batch_stats` and `BatchStatsWindow`: weights, statistics, arguments.

A bad weight means what it means in `optaccum.accumulate`: NaN, inf or negative
skips the micro-batch (counted in the window's `num_skipped`), 0 adds nothing,
and where nothing counts the statistics stay as they were. The reference is the
merge written out in float64 NumPy (see `optaccum/_batch_norm.py`):

  mean = sum_i p_i M_i,  var = sum_i p_i V_i + sum_i p_i (M_i - mean)**2 / (1 - m)

with `p_i` the kept micro-batches' weights over their sum. Every other bad
argument fails at the call with a message naming the call, the argument and
the value.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import FrozenDict

import optaccum

MOMENTUM = 0.9
K = 4
FEATURES = 3
Window = optaccum.flax.BatchStatsWindow
merge = optaccum.flax.merge_batch_stats


def micro_batch_statistics():
  """K micro-batches' running statistics: means around 2, variances in [0.5, 1.5].

  As flax writes them, `m * old + (1 - m) * mu_i`: the means' spread is that of
  the micro-batch means `mu_i` (0.3 here) times `1 - m`.
  """
  rng = np.random.default_rng(21)
  means = rng.normal(2.0, 0.3 * (1 - MOMENTUM), size=(K, FEATURES)).astype(np.float32)
  variances = rng.uniform(0.5, 1.5, size=(K, FEATURES)).astype(np.float32)
  return means, variances


def numpy_merge(means, variances, weights, momentum=MOMENTUM):
  """The large batch's statistics from the micro-batches of positive finite weight."""
  weights = np.asarray(weights, np.float64)
  kept = np.isfinite(weights) & (weights > 0)
  means, variances = (np.asarray(x, np.float64)[kept] for x in (means, variances))
  p = weights[kept] / weights[kept].sum()
  mean = np.einsum("i,if->f", p, means)
  spread = np.einsum("i,if->f", p, (means - mean) ** 2)
  return {"mean": mean, "var": np.einsum("i,if->f", p, variances) + spread / (1 - momentum)}


def stacked_layer(means, variances):
  return {"mean": jnp.asarray(means), "var": jnp.asarray(variances)}


def one(stacked, i):
  return jax.tree.map(lambda leaf: leaf[i], stacked)


def start_statistics():
  return {"mean": jnp.full(FEATURES, -5.0), "var": jnp.full(FEATURES, 7.0)}


def window_of(stacked, weights):
  window = Window.create(start_statistics())
  for i, weight in enumerate(weights):
    window = window.add(one(stacked, i), weight=weight)
  return window


def assert_statistics(result, expected, rtol=1e-6):
  for name in ("mean", "var"):
    np.testing.assert_allclose(np.asarray(result[name], np.float64), expected[name], rtol=rtol)


def assert_unchanged(result, start):
  for name in ("mean", "var"):
    np.testing.assert_array_equal(np.asarray(result[name]), np.asarray(start[name]))


# --- Weights: the same rule as accumulate's ----------------------------------------------


def test_a_negative_weight_skips_its_micro_batch_instead_of_extrapolating():
  # Issue 21: weights [2, -1, 1, 1] gave a variance of 12.2 from micro-batch
  # variances in [0.5, 1.5]; the -1 must skip micro-batch 1, as in accumulate.
  means, variances = micro_batch_statistics()
  stacked = stacked_layer(means, variances)
  weights = [2.0, -1.0, 1.0, 1.0]
  expected = numpy_merge(means, variances, weights)
  assert np.all(expected["var"] < 1.6)  # the reference itself stays in range
  merged = merge(
    stacked, momentum=MOMENTUM, weights=jnp.array(weights), batch_stats=one(stacked, 0)
  )
  assert_statistics(merged, expected)
  window = window_of(stacked, weights)
  assert int(window.num_skipped) == 1
  assert float(window.weight) == 4.0
  closed, _ = window.close(start_statistics(), momentum=MOMENTUM)
  assert_statistics(closed, expected)


def test_weights_summing_to_zero_through_a_negative_one_keep_the_positive_micro_batch():
  # [1, -1, 0, 0] summed to zero before, which gave NaN statistics; now the -1
  # is skipped, the zeros add nothing, and micro-batch 0 alone is the window.
  means, variances = micro_batch_statistics()
  stacked = stacked_layer(means, variances)
  weights = [1.0, -1.0, 0.0, 0.0]
  start = start_statistics()
  merged = merge(stacked, momentum=MOMENTUM, weights=jnp.array(weights), batch_stats=start)
  assert_statistics(merged, {"mean": means[0], "var": variances[0]})
  window = window_of(stacked, weights)
  assert int(window.num_skipped) == 1  # the -1; the zeros are no skip
  closed, _ = window.close(start, momentum=MOMENTUM)
  assert_statistics(closed, {"mean": means[0], "var": variances[0]})


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), -1e-30])
def test_a_bad_weight_first_in_the_window_leaves_the_later_ones_intact(bad):
  # Welford's sums start from the first micro-batch: a skipped first one must
  # leave them empty rather than holding a NaN or a negative weight.
  means, variances = micro_batch_statistics()
  stacked = stacked_layer(means, variances)
  weights = [bad, 3.0, 1.0, 2.0]
  window = window_of(stacked, weights)
  assert int(window.num_skipped) == 1
  closed, _ = window.close(start_statistics(), momentum=MOMENTUM)
  assert_statistics(closed, numpy_merge(means, variances, weights))


def test_a_window_of_only_skipped_or_zero_weights_keeps_the_statistics_and_counts_the_skips():
  means, variances = micro_batch_statistics()
  stacked = stacked_layer(means, variances)
  start = start_statistics()
  window = window_of(stacked, [float("nan"), -2.0, 0.0, float("inf")])
  assert int(window.num_skipped) == 3
  assert float(window.weight) == 0.0
  closed, after = window.close(start, momentum=MOMENTUM)
  assert_unchanged(closed, start)
  assert int(after.num_skipped) == 3  # counted over all windows: close keeps it
  merged = merge(
    stacked, momentum=MOMENTUM, weights=jnp.array([jnp.nan, -2.0, 0.0, jnp.inf]), batch_stats=start
  )
  assert_unchanged(merged, start)


def test_weights_with_bad_entries_under_jit_equal_the_eager_numpy_reference():
  means, variances = micro_batch_statistics()
  stacked = stacked_layer(means, variances)
  weights = [jnp.nan, 5.0, -3.0, 2.0]

  @jax.jit
  def both(stacked, weights, start):
    merged = merge(stacked, momentum=MOMENTUM, weights=weights, batch_stats=start)
    window = Window.create(start)
    for i in range(K):
      window = window.add(one(stacked, i), weight=weights[i])
    closed, window = window.close(start, momentum=MOMENTUM, when=weights[3] > 0)
    return merged, closed, window.num_skipped

  merged, closed, num_skipped = both(stacked, jnp.array(weights), start_statistics())
  expected = numpy_merge(means, variances, weights)
  assert_statistics(merged, expected)
  assert_statistics(closed, expected)
  assert int(num_skipped) == 2


# --- Non-finite statistics ---------------------------------------------------------------


def two_layers(means, variances):
  return {"first": stacked_layer(means, variances), "second": stacked_layer(means + 1, variances)}


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_a_non_finite_statistic_in_one_layer_skips_that_micro_batch_in_every_layer(bad_value):
  # The micro-batch is one decision: its finite first layer must not enter
  # either, or the layers would be merged over different micro-batches.
  means, variances = micro_batch_statistics()
  stacked = two_layers(means, variances)
  stacked["second"]["var"] = stacked["second"]["var"].at[2, 1].set(bad_value)
  kept = [1.0, 1.0, float("nan"), 1.0]  # the reference: micro-batch 2 dropped
  merged = merge(stacked, momentum=MOMENTUM)
  window = Window.create(one(stacked, 0))
  for i in range(K):
    window = window.add(one(stacked, i))
  assert int(window.num_skipped) == 1
  closed, _ = window.close(one(stacked, 0), momentum=MOMENTUM)
  for result in (merged, closed):
    assert_statistics(result["first"], numpy_merge(means, variances, kept))
    assert_statistics(result["second"], numpy_merge(means + 1, variances, kept))


def test_non_finite_statistics_of_weight_zero_are_skipped_and_counted():
  means, variances = micro_batch_statistics()
  stacked = stacked_layer(means, variances)
  stacked["mean"] = stacked["mean"].at[0, 0].set(jnp.nan)
  window = window_of(stacked, [0.0, 1.0, 1.0, 1.0])
  assert int(window.num_skipped) == 1
  closed, _ = window.close(start_statistics(), momentum=MOMENTUM)
  expected = numpy_merge(means, variances, [0.0, 1.0, 1.0, 1.0])
  assert_statistics(closed, expected)
  assert np.all(np.isfinite(np.asarray(closed["mean"])))


def test_every_micro_batch_non_finite_keeps_the_given_statistics_and_nan_only_without_them():
  means, variances = micro_batch_statistics()
  stacked = stacked_layer(np.full_like(means, np.nan), variances)
  start = start_statistics()
  assert_unchanged(merge(stacked, momentum=MOMENTUM, batch_stats=start), start)
  # Documented: without `batch_stats=` there is nothing to keep.
  alone = merge(stacked, momentum=MOMENTUM)
  assert np.all(np.isnan(np.asarray(alone["mean"]))) and np.all(np.isnan(alone["var"]))


def test_a_nan_weight_on_bfloat16_statistics_keeps_them_bfloat16_and_finite():
  means, variances = micro_batch_statistics()
  stacked = jax.tree.map(lambda x: x.astype(jnp.bfloat16), stacked_layer(means, variances))
  start = jax.tree.map(lambda x: x.astype(jnp.bfloat16), start_statistics())
  weights = [1.0, float("nan"), 1.0, 1.0]
  rounded = [np.asarray(stacked[name], np.float64) for name in ("mean", "var")]
  expected = numpy_merge(*rounded, weights)
  merged = merge(stacked, momentum=MOMENTUM, weights=jnp.array(weights), batch_stats=start)
  window = Window.create(start)
  for i, weight in enumerate(weights):
    window = window.add(one(stacked, i), weight=weight)
  closed, _ = window.close(start, momentum=MOMENTUM)
  for result in (merged, closed):
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(result))
    assert_statistics(result, expected, rtol=2.0**-8)


# --- Counting the skipped micro-batches --------------------------------------------------


def numpy_num_skipped(stacked, weights):
  """Micro-batches with a NaN, infinite or negative weight, or a statistic that is not finite."""
  weights = np.asarray(weights, np.float64)
  bad_weight = ~(np.isfinite(weights) & (weights >= 0))
  bad_statistics = np.zeros(len(weights), bool)
  for leaf in (stacked["mean"], stacked["var"]):
    bad_statistics |= ~np.all(np.isfinite(np.asarray(leaf, np.float64)), axis=1)
  return int(np.sum(bad_weight | bad_statistics))


COUNT_CASES = {
  # A weight of 0 adds nothing and is no skip.
  "good and zero": ([1.0, 0.0, 2.0, 3.0], None),
  "nan, -1, inf": ([np.nan, -1.0, 2.0, np.inf], None),
  # A NaN statistic and a bad weight on one micro-batch count once.
  "nan statistic": ([1.0, -2.0, 2.0, 3.0], (1, 2)),
  "every one": ([np.nan, np.nan, -1.0, 1.0], (3, 0)),
}


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("case", list(COUNT_CASES))
def test_merge_counts_skipped_micro_batches_as_a_window_does(case, jit):
  # Issue 21: a bad weight means the same in merge_batch_stats as in accumulate:
  # skipped and counted; the merge skipped it but reported no count.
  weights, nan_at = COUNT_CASES[case]
  means, variances = micro_batch_statistics()
  if nan_at is not None:
    means[nan_at] = np.nan
  stacked = stacked_layer(means, variances)
  start = start_statistics()

  def counted(stacked, weights, start):
    return merge(stacked, momentum=MOMENTUM, weights=weights, batch_stats=start, count_skipped=True)

  run = jax.jit(counted) if jit else counted
  merged, num_skipped = run(stacked, jnp.array(weights, jnp.float32), start)
  expected = numpy_num_skipped(stacked, weights)
  assert num_skipped.shape == () and num_skipped.dtype == jnp.int32
  assert int(num_skipped) == expected
  assert int(window_of(stacked, weights).num_skipped) == expected  # as the window counts
  kept = [w if nan_at is None or i != nan_at[0] else np.nan for i, w in enumerate(weights)]
  if expected == K:
    assert_unchanged(merged, start)
  else:
    assert_statistics(merged, numpy_merge(means, variances, kept))


def test_merge_counts_non_finite_statistics_without_weights():
  means, variances = micro_batch_statistics()
  variances[2, 0] = np.inf
  merged, num_skipped = merge(
    stacked_layer(means, variances), momentum=MOMENTUM, count_skipped=True
  )
  assert int(num_skipped) == 1
  assert_statistics(merged, numpy_merge(means, variances, [1.0, 1.0, np.nan, 1.0]))


@pytest.mark.parametrize("value", [1, None, jnp.array(True)])
def test_merge_refuses_a_count_skipped_that_is_not_a_bool(value):
  with pytest.raises(TypeError) as raised:
    merge(STACKED, momentum=MOMENTUM, count_skipped=value)
  assert str(raised.value) == (
    f"`merge_batch_stats(count_skipped=...)` must be a bool, got count_skipped={value!r}."
  )


# --- Arguments: one message each ---------------------------------------------------------

LAYER = {"mean": jnp.zeros(FEATURES), "var": jnp.ones(FEATURES)}
STACKED = {"mean": jnp.zeros((K, FEATURES)), "var": jnp.ones((K, FEATURES))}


@pytest.mark.parametrize(
  "mean, kind",
  [(0.0, "float"), ([0.0, 0.0, 0.0], "list"), ("abc", "str"), (np.float32(0.0), "float32")],
)
def test_create_refuses_statistics_that_are_not_arrays(mean, kind):
  message = (
    r"`BatchStatsWindow.create\(batch_stats=...\)` must hold arrays, as flax.linen.BatchNorm "
    rf"stores them, but the 'mean' of the layer at the root is a {kind}: "
  )
  with pytest.raises(TypeError, match=message):
    Window.create({"mean": mean, "var": jnp.ones(FEATURES)})


@pytest.mark.parametrize(
  "stacked", [{"mean": [[0.0]] * K, "var": [[1.0]] * K}, {"mean": "ab", "var": "cd"}]
)
def test_merge_refuses_a_stack_that_is_not_arrays(stacked):
  with pytest.raises(TypeError, match=r"`merge_batch_stats\(stacked=...\)` must hold arrays"):
    merge(stacked, momentum=MOMENTUM)


@pytest.mark.parametrize("call", ["create", "merge"])
def test_complex_statistics_are_refused(call):
  layer = {"mean": jnp.zeros((K, FEATURES), jnp.complex64), "var": STACKED["var"]}
  name = "BatchStatsWindow.create(batch_stats" if call == "create" else "merge_batch_stats(stacked"
  message = re.escape(f"`{name}=...)` must hold floating-point statistics, ") + ".*complex64"
  with pytest.raises(TypeError, match=message):
    Window.create(layer) if call == "create" else merge(layer, momentum=MOMENTUM)


def test_create_refuses_a_mean_and_var_of_different_shapes():
  with pytest.raises(ValueError, match=r"mean has shape \(3,\) and var has shape \(4,\)"):
    Window.create({"mean": jnp.zeros(3), "var": jnp.ones(4)})


def test_merge_refuses_an_empty_stack():
  empty = {"mean": jnp.zeros((0, FEATURES)), "var": jnp.ones((0, FEATURES))}
  with pytest.raises(
    ValueError,
    match=r"`merge_batch_stats\(stacked=...\)` must stack at least one micro-batch's .*"
    r"\['mean'\] has a leading axis of length 0",
  ):
    merge(empty, momentum=MOMENTUM, batch_stats=LAYER)


@pytest.mark.parametrize(
  "stats, error, message",
  [
    (
      {"mean": 0.0, "var": 1.0},
      TypeError,
      r"must hold arrays, but the leaf at \['mean'\] is a float",
    ),
    (
      {"mean": jnp.zeros(FEATURES, jnp.complex64), "var": jnp.ones(FEATURES)},
      TypeError,
      r"has a complex leaf at \['mean'\] \(complex64\[3\]\) where the window is real",
    ),
    (
      {"mean": jnp.zeros(FEATURES, jnp.int32), "var": jnp.ones(FEATURES, jnp.int32)},
      TypeError,
      r"must hold floating-point arrays, but the leaf at \['mean'\] has dtype int32",
    ),
    ({"norm": LAYER}, ValueError, r"has a tree structure that does not match the window"),
    (FrozenDict(LAYER), ValueError, r"has a tree structure that does not match the window"),
    (
      {"mean": jnp.zeros(4), "var": jnp.ones(4)},
      ValueError,
      r"does not match the window at \['mean'\]: batch_stats has float32\[4\], the window has "
      r"float32\[3\]",
    ),
  ],
  ids=["python-float", "complex", "int", "structure", "frozen-dict", "shape"],
)
@pytest.mark.parametrize("method", ["add", "close"])
def test_window_refuses_statistics_unlike_the_window(method, stats, error, message):
  window = Window.create(LAYER)
  with pytest.raises(error, match=rf"`BatchStatsWindow.{method}\(batch_stats=...\)` " + message):
    if method == "add":
      window.add(stats)
    else:
      window.close(stats, momentum=MOMENTUM)


@pytest.mark.parametrize(
  "weight, error, message",
  [
    (True, TypeError, r"must be a number \(real, not a bool\), got weight=True"),
    ("1", TypeError, r"must be a number \(real, not a bool\), got weight='1'"),
    (1j, TypeError, r"must be a number \(real, not a bool\), got weight=1j"),
    (jnp.ones(2), ValueError, r"must be a scalar, got an array of shape \(2,\)"),
    ([1.0], ValueError, r"must be a scalar, got an array of shape \(1,\)"),
  ],
)
def test_window_refuses_a_weight_that_is_not_a_real_scalar(weight, error, message):
  with pytest.raises(error, match=r"`BatchStatsWindow.add\(weight=...\)` " + message):
    Window.create(LAYER).add(LAYER, weight=weight)


@pytest.mark.parametrize(
  "name, value",
  [("when", None)]  # reset=None is the default: the window ends where it is applied
  + [(name, value) for name in ("when", "reset") for value in ("yes", 1, jnp.float32(1.0))]
  + [("when", jnp.ones(2, bool))],
)
def test_close_refuses_a_when_or_reset_that_is_not_a_scalar_bool(name, value):
  # Issue 21: a ValueError from JAX (for None) or a raw JAX error (for a str).
  message = rf"`BatchStatsWindow.close\({name}=...\)` must be a scalar bool, got {name}="
  with pytest.raises(TypeError, match=message):
    Window.create(LAYER).close(LAYER, momentum=MOMENTUM, **{name: value})


@pytest.mark.parametrize(
  "momentum", [float("nan"), float("inf"), np.bool_(False), jnp.float32(0.9), 1.0]
)
@pytest.mark.parametrize("call", ["merge_batch_stats", "BatchStatsWindow.close"])
def test_momentum_that_is_nan_a_bool_an_array_or_one_is_refused(call, momentum):
  message = rf"`{call}\(momentum=...\)` must be a number with 0 <= momentum < 1, .*got momentum="
  with pytest.raises(ValueError, match=message + re.escape(f"{momentum!r}.")):
    if call == "merge_batch_stats":
      merge(STACKED, momentum=momentum)
    else:
      Window.create(LAYER).close(LAYER, momentum=momentum)


@pytest.mark.parametrize(
  "weights",
  [
    jnp.ones(K, jnp.complex64),
    "abcd",
    [True, False, True, True],
    [1.0, [1.0, 2.0], 1.0, 1.0],
  ],
  ids=["complex", "str", "bool-list", "ragged"],
)
def test_merge_refuses_weights_that_are_not_real_numbers(weights):
  message = r"`merge_batch_stats\(weights=...\)` must hold numbers, got weights=.*: one real weight"
  with pytest.raises(TypeError, match=message):
    merge(STACKED, momentum=MOMENTUM, weights=weights, batch_stats=LAYER)


@pytest.mark.parametrize("weights, shape", [(jnp.ones((K, 1)), r"\(4, 1\)"), (1.0, r"\(\)")])
def test_merge_refuses_weights_of_another_shape(weights, shape):
  message = rf"`merge_batch_stats\(weights=...\)` .* shape \(4,\), got shape {shape}\."
  with pytest.raises(ValueError, match=message):
    merge(STACKED, momentum=MOMENTUM, weights=weights, batch_stats=LAYER)


@pytest.mark.parametrize(
  "start, error, message",
  [
    (
      {"mean": 0.0, "var": 1.0},
      TypeError,
      r"must hold arrays, but the leaf at \['mean'\] is a float",
    ),
    (
      {"mean": jnp.zeros(FEATURES, jnp.complex64), "var": jnp.ones(FEATURES)},
      TypeError,
      r"has a complex leaf at \['mean'\]",
    ),
    ({"norm": LAYER}, ValueError, r"has a tree structure that does not match one micro-batch's"),
  ],
  ids=["python-float", "complex", "structure"],
)
def test_merge_refuses_batch_stats_unlike_one_micro_batch(start, error, message):
  with pytest.raises(error, match=r"`merge_batch_stats\(batch_stats=...\)` " + message):
    merge(STACKED, momentum=MOMENTUM, weights=jnp.ones(K), batch_stats=start)


def test_a_list_of_int_weights_is_taken_as_sizes():
  means, variances = micro_batch_statistics()
  stacked = stacked_layer(means, variances)
  weights = [3, 0, 1, 2]
  merged = merge(stacked, momentum=MOMENTUM, weights=weights, batch_stats=start_statistics())
  assert_statistics(merged, numpy_merge(means, variances, weights))

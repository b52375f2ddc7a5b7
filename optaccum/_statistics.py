"""Window statistics: what k micro-batch gradients tell about the gradient's noise.

A window holds k independent estimates g_i of the gradient G, each the mean
over a micro-batch of B_i examples, so Cov(g_i) = Sigma / B_i where Sigma is the
covariance of one example's gradient. Their spread around the window's mean
gives, for the price of one squared norm per micro-step, unbiased estimates of
|G|^2 and tr(Sigma), and from them the gradient noise scale
B_simple = tr(Sigma) / |G|^2: the batch size beyond which a larger batch
mostly averages noise away instead of speeding up training.

With weights w_i equal to the micro-batch sizes B_i, W = sum(w_i) and
S = sum(w_i |g_i|^2) / W, the window's mean Gbar = sum(w_i g_i) / W has
E|Gbar|^2 = |G|^2 + tr(Sigma) / W and E[S] = |G|^2 + k tr(Sigma) / W, so

  |G|^2    = (k |Gbar|^2 - S) / (k - 1)
  tr(Sigma) = W (S - |Gbar|^2) / (k - 1)

are unbiased. With equal sizes B these are McCandlish et al.'s Appendix A.1
estimators with B_small = B and B_big = k B; unequal sizes only move B_small
to the mean size W / k.

References:
  McCandlish et al., 2018, "An Empirical Model of Large-Batch Training", Appendix A.1.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from optaccum._types import Updates


class WindowStatistics(NamedTuple):
  """What the last closed window tells about the gradient.

  Every field is a scalar. Before the first window closes, the float fields are
  NaN and the counts zero. A window of a single micro-batch has no spread to
  measure: its `gradient_squared_norm`, `trace_covariance` and `noise_scale`
  are NaN. Units of "example" are those of `micro_batch_size` (see
  `optaccum.status`).

  Attributes:
    window_norm: global norm of the window's mean gradient |Gbar|, read from
      the accumulator (so in its precision).
    micro_batch_squared_norm: S, the (weighted) mean over the window's
      micro-batches of their gradients' squared global norms.
    gradient_squared_norm: unbiased estimate of |G|^2, the squared norm of the
      true gradient. Negative when the window's noise hides the signal.
    trace_covariance: unbiased estimate of tr(Sigma), the summed variance of
      one example's gradient.
    noise_scale: B_simple = trace_covariance / gradient_squared_norm, in
      examples. One window's ratio is noisy (and may be negative): average
      `trace_covariance` and `gradient_squared_norm` over windows, e.g. with
      an exponential moving average, before dividing.
    batch_size: B_big, the window's examples (the sum of its weights times
      `micro_batch_size`).
    num_micro_batches: k, the micro-batches of positive weight in the window,
      over all replicas.
  """

  window_norm: jax.Array  # shape=(), dtype=float32
  micro_batch_squared_norm: jax.Array  # shape=(), dtype=float32
  gradient_squared_norm: jax.Array  # shape=(), dtype=float32
  trace_covariance: jax.Array  # shape=(), dtype=float32
  noise_scale: jax.Array  # shape=(), dtype=float32
  batch_size: jax.Array  # shape=(), dtype=float32
  num_micro_batches: jax.Array  # shape=(), dtype=int32


class StatisticsState(NamedTuple):
  """The statistics kept in `AccumulateState.statistics`: scalars only.

  Attributes:
    squared_norm_sum: sum of w_i |g_i|^2 over the open window's micro-batches.
    num_micro_batches: micro-batches of positive weight in the open window.
    last_window: the statistics of the last closed window.
  """

  squared_norm_sum: jax.Array  # shape=(), dtype=float32
  num_micro_batches: jax.Array  # shape=(), dtype=int32
  last_window: WindowStatistics

  def per_replica_mask(self) -> StatisticsState:
    """A tree of bools like this one: True where each replica holds its own value.

    The open window's running sums are local, summed across replicas when it
    closes; the last closed window's statistics are the same everywhere.
    """
    return StatisticsState(
      squared_norm_sum=True,  # type: ignore[arg-type]  # a mask: bools where arrays go
      num_micro_batches=True,  # type: ignore[arg-type]
      last_window=jax.tree.map(lambda _: False, self.last_window),
    )


def _squared_norm(tree: Updates, per_replica: bool = False) -> jax.Array:
  """Squared global norm in float32, whatever the leaves' dtype: the sum of |x|^2.

  A complex entry counts its real and imaginary parts, `re^2 + im^2`, as the
  window guard and the skip policies measure it (a cast to float32 would keep
  the real part only). With `per_replica`, `[R]`: one per replica (the leaves'
  leading axis).
  """
  total = jnp.zeros((), jnp.float32)
  for leaf in jax.tree.leaves(tree):
    axes = tuple(range(1, leaf.ndim)) if per_replica else None
    parts = (jnp.real(leaf), jnp.imag(leaf)) if jnp.iscomplexobj(leaf) else (leaf,)
    for part in parts:
      total = total + jnp.sum(jnp.square(part.astype(jnp.float32)), axis=axes)
  return total


def init() -> StatisticsState:
  """The statistics before the first window: NaN, and zero counts."""
  # A new array per field: one array in two fields could not be donated.
  nan = lambda: jnp.full((), jnp.nan, jnp.float32)  # noqa: E731
  return StatisticsState(
    squared_norm_sum=jnp.zeros((), jnp.float32),
    num_micro_batches=jnp.zeros((), jnp.int32),
    last_window=WindowStatistics(
      window_norm=nan(),
      micro_batch_squared_norm=nan(),
      gradient_squared_norm=nan(),
      trace_covariance=nan(),
      noise_scale=nan(),
      batch_size=jnp.zeros((), jnp.float32),
      num_micro_batches=jnp.zeros((), jnp.int32),
    ),
  )


def add(
  state: StatisticsState, updates: Updates, weight: jax.Array, per_replica: bool = False
) -> StatisticsState:
  """Counts one micro-batch of gradients `updates` and weight `weight` (0 if skipped).

  With `per_replica` (under mesh axes) `updates` has a leading replica
  axis and `weight` is `[R]`: each replica's micro-batch counts as one, as
  under `shard_map`.
  """
  counted = weight > 0
  # A select, not a multiply: a skipped micro-batch's norm may be NaN.
  squared_norm = jnp.where(counted, weight * _squared_norm(updates, per_replica), jnp.float32(0))
  return state._replace(
    squared_norm_sum=state.squared_norm_sum + jnp.sum(squared_norm),
    # dtype=int32: with 64-bit types enabled a sum of int32 would be int64.
    num_micro_batches=state.num_micro_batches + jnp.sum(counted, dtype=jnp.int32),
  )


def close(
  state: StatisticsState,
  acc_grads: Updates,
  total_weight: jax.Array,
  squared_norm_sum: jax.Array,
  count: jax.Array,
) -> StatisticsState:
  """The window's statistics from its sums, reduced over all replicas if any.

  `acc_grads`, `total_weight`, `squared_norm_sum` and `count` are the window's
  sums (the accumulation reduces them across replicas in one all-reduce,
  together with the gradients). A window of zero weight keeps the last
  window's statistics. Sizes are in units of weight; `optaccum.status`
  converts them to examples.
  """
  k = count.astype(jnp.float32)
  window_squared_norm = _squared_norm(acc_grads) / jnp.square(total_weight)
  micro_batch_squared_norm = squared_norm_sum / total_weight
  # k = 1 divides by zero: NaN, as documented, whatever the rounding left.
  spread = jnp.where(k > 1, k - 1, jnp.float32(jnp.nan))
  gradient_squared_norm = (k * window_squared_norm - micro_batch_squared_norm) / spread
  trace_covariance = total_weight * (micro_batch_squared_norm - window_squared_norm) / spread
  window = WindowStatistics(
    window_norm=jnp.sqrt(window_squared_norm),
    micro_batch_squared_norm=micro_batch_squared_norm,
    gradient_squared_norm=gradient_squared_norm,
    trace_covariance=trace_covariance,
    noise_scale=trace_covariance / gradient_squared_norm,
    batch_size=total_weight,
    num_micro_batches=count,
  )
  has_weight = total_weight > 0
  # zeros_like: under `shard_map` the reset sums keep the per-replica type.
  return StatisticsState(
    squared_norm_sum=jnp.zeros_like(state.squared_norm_sum),
    num_micro_batches=jnp.zeros_like(state.num_micro_batches),
    last_window=jax.tree.map(
      lambda new, old: jnp.where(has_weight, new, old), window, state.last_window
    ),
  )


def last_window(
  statistics: StatisticsState | tuple, micro_batch_size: int | None
) -> WindowStatistics | None:
  """The last closed window's statistics, in examples of `micro_batch_size`; None if not kept."""
  if not isinstance(statistics, StatisticsState):
    return None
  window = statistics.last_window
  if micro_batch_size is None:
    return window
  examples = jnp.float32(micro_batch_size)
  return window._replace(
    trace_covariance=window.trace_covariance * examples,
    noise_scale=window.noise_scale * examples,
    batch_size=window.batch_size * examples,
  )

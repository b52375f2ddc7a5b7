"""Reading an accumulation out of an optimizer state, chains included: one object."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from optaccum import _statistics, _validation
from optaccum._spikes import SpikeState, is_spike_state
from optaccum._state import AccumulateState, locate_state
from optaccum._statistics import WindowStatistics
from optaccum._types import OptState


class Status(NamedTuple):
  """What an accumulation has done so far, read from its state by `optaccum.status`.

  Every count is a scalar int32 array that saturates at 2**31 - 1.

  Attributes:
    mini_step: micro-batches in the open window; 0 right after a window closes.
    gradient_step: inner-optimizer steps taken: windows emitted. A Flax
      `TrainState.step` counts micro-steps; this counts what the inner
      optimizer saw, so it is what to log against and schedule by.
    has_updated: scalar bool, whether the last update call ran the inner
      optimizer (closed a window); exact also after a skipped micro-batch and
      after a window of zero total weight.
    num_skipped: micro-batches dropped: by the skip policy, or for a NaN,
      infinite or negative weight.
    num_skipped_windows: windows dropped whole by the window guard (their
      gradient held a NaN or inf): no optimizer step, parameters, inner state
      and `gradient_step` kept.
    num_empty_windows: windows that closed with zero total weight and emitted
      zeros (a `flush` of a window that held nothing is not counted).
    num_clamped_windows: windows closed while the `k` schedule returned NaN,
      an infinity or a value below 1; each ran as a window of one micro-step.
    num_spike_windows: windows whose step `optaccum.skip.spikes` skipped (a
      gradient norm or loss above its band, or not finite), read from the
      `SpikeState` wherever it sits in the state (summed where there are
      several); 0 without one. The accumulation counts such a window as run
      (`gradient_step` advances) with zero updates.
    statistics: the `WindowStatistics` of the last closed window when the
      accumulation keeps them (`statistics=True`), else None.
    state: the `AccumulateState` itself.
  """

  mini_step: jax.Array
  gradient_step: jax.Array
  has_updated: jax.Array
  num_skipped: jax.Array
  num_skipped_windows: jax.Array
  num_empty_windows: jax.Array
  num_clamped_windows: jax.Array
  num_spike_windows: jax.Array
  statistics: WindowStatistics | None
  state: AccumulateState


def status(opt_state: OptState, *, micro_batch_size: int | None = None) -> Status:
  """Reads the one accumulation inside `opt_state`: counters, flags and statistics.

  The accumulation may sit at any depth: inside `optax.chain`,
  `optax.inject_hyperparams`, a Flax `TrainState` or any other pytree. It works
  under `jax.jit` as outside.

  Window statistics (with `accumulate(..., statistics=True)`) are those of the
  last closed window ([what they estimate][window-statistics]). With `weight=`
  passed to `update`, the estimators take the weights as the micro-batches' sizes.

  Args:
    opt_state: an optimizer state that holds exactly one `AccumulateState`.
    micro_batch_size: examples per unit of weight (the micro-batch size when
      no weights are passed). It scales the statistics' `batch_size`,
      `trace_covariance` and `noise_scale` into examples. None (default)
      counts one unit of weight as one example.

  Returns:
    A `Status`.

  Raises:
    ValueError: if `opt_state` holds no `AccumulateState`, or more than one, or
      `micro_batch_size` is not a positive int.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optaccum
    >>> tx = optax.chain(optax.clip(1.0), optaccum.accumulate(optax.sgd(0.1), 2))
    >>> params = {"w": jnp.zeros(3)}
    >>> state = tx.init(params)
    >>> for _ in range(3):
    ...   _, state = tx.update({"w": jnp.ones(3)}, state, params)
    >>> info = optaccum.status(state)
    >>> int(info.gradient_step), int(info.mini_step), bool(info.has_updated)
    (1, 1, False)
  """
  if micro_batch_size is not None:
    _validation.check_positive_int("status", "micro_batch_size", micro_batch_size)
  leaves, _, position = locate_state("status(opt_state=...)", opt_state)
  state: AccumulateState = leaves[position]
  return Status(
    mini_step=state.mini_step,
    gradient_step=state.gradient_step,
    has_updated=state.emitted,
    num_skipped=state.num_skipped,
    num_skipped_windows=state.num_skipped_windows,
    num_empty_windows=state.num_empty_windows,
    num_clamped_windows=state.num_clamped_windows,
    num_spike_windows=_num_spike_windows(opt_state),
    statistics=_statistics.last_window(state.statistics, micro_batch_size),
    state=state,
  )


def _num_spike_windows(opt_state: OptState) -> jax.Array:
  """The windows skipped by every `skip.spikes` in `opt_state`: an int32 count, 0 without one."""
  found = [
    leaf.num_spikes
    for leaf in jax.tree.leaves(opt_state, is_leaf=is_spike_state)
    if isinstance(leaf, SpikeState)
  ]
  return sum(found[1:], start=found[0]) if found else jnp.zeros((), jnp.int32)

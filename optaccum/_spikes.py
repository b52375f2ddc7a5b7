"""Spike skipping: no step for a window whose gradient norm or loss leaps above its history.

A wrapper around the inner optimizer, so it runs where the inner optimizer runs:
once per window inside `accumulate`, `apply_gradients` and `compat.MultiSteps`
(on the window's mean gradient, in the closing micro-step only), and once per
call of `update` after `microbatch`, where the batch is the window.
"""

from __future__ import annotations

from typing import Any, NamedTuple, TypeGuard

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optaccum import _skip, _validation
from optaccum._targets import keep_dtypes, map_updates
from optaccum._types import OptState, Params, Scalar, Updates

_WHERE = "skip.spikes"
_UPDATE = "skip.spikes(...).update"
_IS_NONE = lambda x: x is None  # noqa: E731


class SpikeState(NamedTuple):
  """State of `skip.spikes`: the inner optimizer's state and the history of accepted windows.

  Each history is a ring buffer of the last `history` accepted windows: the
  n-th accepted window's entry sits at index `n % history`, so the entries
  are in no particular order (their mean and spread do not need one).

  Attributes:
    inner_opt_state: the wrapped optimizer's state; a skipped window leaves it
      as it was.
    norm_history: float32[history], the global gradient norms of the last
      accepted windows.
    value_history: float32[history], the `value=` (the loss) of the last
      accepted windows that were given one.
    num_norms: accepted windows recorded in `norm_history` so far (saturating
      at 2**31 - 1); its first `min(num_norms, history)` entries hold them.
    num_values: accepted windows recorded in `value_history` so far.
    num_spikes: windows skipped so far: a norm or value above its band, or not
      finite (read with `optaccum.status(...).num_spike_windows`).
    skipped: whether the last window was skipped.
  """

  inner_opt_state: OptState
  norm_history: jax.Array  # shape=(history,), dtype=float32
  value_history: jax.Array  # shape=(history,), dtype=float32
  num_norms: jax.Array  # shape=(), dtype=int32
  num_values: jax.Array  # shape=(), dtype=int32
  num_spikes: jax.Array  # shape=(), dtype=int32
  skipped: jax.Array  # shape=(), dtype=bool


def is_spike_state(x: object) -> bool:
  """Whether `x` is a `SpikeState` (for `is_leaf=` in tree maps)."""
  return isinstance(x, SpikeState)


def _global_norm(updates: Updates) -> jax.Array:
  """The float32 global norm of `updates`, whatever their dtypes (None leaves count 0)."""
  return jnp.sqrt(_skip.squared_norm(jax.tree.leaves(updates)))


def _above_band(
  x: jax.Array, history: jax.Array, count: jax.Array, num_sigmas: float, min_history: int
) -> jax.Array:
  """Whether `x` exceeds the mean of the recorded history by more than `num_sigmas` deviations.

  The deviation is the sample standard deviation (divided by n - 1, as
  OLMo-core's `torch.std_mean` and MaxText take it). False while fewer than
  `min_history` values are recorded.
  """
  size = history.shape[0]
  recorded = jnp.minimum(count, size)
  held = jnp.arange(size) < recorded
  n = recorded.astype(jnp.float32)
  mean = jnp.sum(jnp.where(held, history, jnp.float32(0))) / jnp.maximum(n, jnp.float32(1))
  deviation = jnp.where(held, history - mean, jnp.float32(0))
  variance = jnp.sum(jnp.square(deviation)) / jnp.maximum(n - 1, jnp.float32(1))
  band = mean + jnp.float32(num_sigmas) * jnp.sqrt(variance)
  return (count >= min_history) & (x > band)


def _skips(
  norm: jax.Array, loss: jax.Array | None, state: SpikeState, num_sigmas: float, min_history: int
) -> jax.Array:
  """Whether the window is skipped: its norm or loss is not finite, or lies above its band."""
  skip = ~jnp.isfinite(norm) | _above_band(
    norm, state.norm_history, state.num_norms, num_sigmas, min_history
  )
  if loss is not None:
    skip |= ~jnp.isfinite(loss)
    skip |= _above_band(loss, state.value_history, state.num_values, num_sigmas, min_history)
  return skip


def _dropped_where(
  skip: jax.Array, updates: Updates, inner_state: OptState, old_state: OptState
) -> tuple[Updates, OptState]:
  """The inner step's updates and state, or zeros and `old_state` where `skip` holds.

  A select, not a branch: the inner optimizer is traced once (a conditional
  would need the shapes of its updates first), and a NaN it computed from a
  non-finite window is dropped, not multiplied by 0. The state keeps the
  dtypes `init` gave it, as inside `accumulate`.
  """
  inner_state = keep_dtypes(inner_state, old_state)
  inner_state = jax.tree.map(lambda new, old: jnp.where(skip, old, new), inner_state, old_state)
  updates = map_updates(lambda u: jnp.where(skip, jnp.zeros((), u.dtype), u), updates)
  return updates, inner_state


def _recorded(
  history: jax.Array, count: jax.Array, x: jax.Array, accept: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """`history` with `x` written into the ring's next slot, and the count, where `accept` holds."""
  slot = count % history.shape[0]
  history = history.at[slot].set(jnp.where(accept, x, history[slot]))
  return history, jnp.where(accept, optax.safe_increment(count), count)


def _check_state(state: object, history: int) -> SpikeState:
  """`state`, checked: a `SpikeState` whose histories hold `history` entries."""
  if not isinstance(state, SpikeState):
    raise TypeError(
      f"`{_UPDATE}(state=...)` must be the SpikeState that this `skip.spikes` init built, "
      f"got a {type(state).__name__} (a state of another optimizer?)."
    )
  shape = jnp.shape(state.norm_history)
  if shape != (history,):
    raise ValueError(
      f"`{_UPDATE}(state=...)` holds a history of shape {shape}, but this `skip.spikes` "
      f"keeps history={history} windows (a state built with another history?)."
    )
  return state


def _check_arguments(
  inner: object, num_sigmas: object, history: object, min_history: object
) -> float:
  """Checks `spikes`' arguments, naming the call; returns `num_sigmas` as a float."""
  if not isinstance(inner, optax.GradientTransformation):
    raise TypeError(
      f"`{_WHERE}(inner=...)` must be an optax.GradientTransformation, got inner={inner!r}."
    )
  number = _validation.as_number(_WHERE, "num_sigmas", num_sigmas, positive=True, finite=True)
  if not _is_int(history) or not 2 <= int(history) <= _validation.MAX_INT32:
    raise ValueError(
      f"`{_WHERE}(history=...)` must be an int >= 2 (a spread needs two windows), "
      f"got history={history!r}."
    )
  if not _is_int(min_history) or not 2 <= int(min_history) <= int(history):
    raise ValueError(
      f"`{_WHERE}(min_history=...)` must be an int from 2 to history={history}, "
      f"got min_history={min_history!r}."
    )
  return float(number)


def _is_int(value: object) -> TypeGuard[int | np.integer]:
  """Whether `value` is a Python or NumPy int, and not a bool."""
  return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def spikes(
  inner: optax.GradientTransformation,
  *,
  num_sigmas: float = 6.0,
  history: int = 100,
  min_history: int = 20,
) -> optax.GradientTransformationExtraArgs:
  """Skips the step of a window whose gradient norm or loss spikes above its recent history.

  Wraps `inner`. Each `update` takes the float32 global norm of `updates`
  and, when given `value=` (the window's loss, the name optax's extra
  arguments use), that value. The step is skipped, with zero updates and
  `inner`'s state untouched, where either exceeds the mean of its last
  `history` accepted windows by more than `num_sigmas` sample standard
  deviations, once `min_history` of them are recorded, or where either is NaN
  or infinite (from the first window). A skipped window is counted in
  `num_spikes` and is not recorded, so a spike does not widen the band that
  judges the windows after it. As `accumulate`'s `inner` it runs once per
  window, on the window's mean gradient, with the `value=` of the micro-step
  that closes it; after `microbatch`, once per batch. `value=` and every other
  extra argument reach `inner` as well. Guide: [spike skipping][spike-skipping].

  Args:
    inner: the optimizer whose steps are skipped, clipping included (wrap the
      whole chain, so that the norm is that of the unclipped gradient).
    num_sigmas: how many standard deviations above the mean a spike lies: a
      finite positive number (default 6, as OLMo-core and MaxText).
    history: how many accepted windows the mean and deviation are taken over:
      an int >= 2 (default 100).
    min_history: accepted windows recorded before a window can be skipped as
      a spike: an int from 2 to `history` (default 20). Non-finite windows are
      skipped from the first.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a `SpikeState`.

  Raises:
    TypeError: if `inner` is no optax transformation; at `update`, if the
      state is no `SpikeState`, or `value=` or a leaf of `updates` is not real.
    ValueError: for a bad `num_sigmas`, `history` or `min_history`; at
      `update`, if `value=` is not a scalar or the state keeps another history.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optaccum
    >>> tx = optaccum.skip.spikes(optax.sgd(1.0), history=4, min_history=3)
    >>> params = {"w": jnp.zeros(2)}
    >>> state = tx.init(params)
    >>> for loss in [1.0, 1.1, 0.9, 1.0, 50.0]:
    ...   updates, state = tx.update({"w": jnp.ones(2)}, state, params, value=loss)
    >>> updates["w"], int(state.num_spikes)  # the loss of 50 is skipped
    (Array([0., 0.], dtype=float32), 1)
  """
  sigmas = _check_arguments(inner, num_sigmas, history, min_history)
  wrapped = optax.with_extra_args_support(inner)

  def init_fn(params: Params) -> SpikeState:
    empty = jnp.zeros((history,), jnp.float32)
    zero = jnp.zeros((), jnp.int32)
    return SpikeState(
      inner_opt_state=wrapped.init(params),
      norm_history=empty,
      value_history=empty,
      num_norms=zero,
      num_values=zero,
      num_spikes=zero,
      skipped=jnp.zeros((), jnp.bool_),
    )

  def update_fn(
    updates: Updates,
    state: SpikeState,
    params: Params | None = None,
    *,
    value: Scalar | None = None,
    **extra_args: Any,
  ) -> tuple[Updates, SpikeState]:
    state = _check_state(state, history)
    _validation.check_arrays(_UPDATE, "updates", updates)
    norm = _global_norm(updates)
    loss = None if value is None else _validation.as_scalar(_UPDATE, "value", value, jnp.float32)
    skip = _skips(norm, loss, state, sigmas, min_history)
    if value is not None:
      extra_args["value"] = value
    new_updates, inner_state = wrapped.update(updates, state.inner_opt_state, params, **extra_args)
    new_updates, inner_state = _dropped_where(skip, new_updates, inner_state, state.inner_opt_state)
    norm_history, num_norms = _recorded(state.norm_history, state.num_norms, norm, ~skip)
    value_history, num_values = state.value_history, state.num_values
    if loss is not None:
      value_history, num_values = _recorded(value_history, num_values, loss, ~skip)
    return new_updates, SpikeState(
      inner_opt_state=inner_state,
      norm_history=norm_history,
      value_history=value_history,
      num_norms=num_norms,
      num_values=num_values,
      num_spikes=jnp.where(skip, optax.safe_increment(state.num_spikes), state.num_spikes),
      skipped=skip,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)

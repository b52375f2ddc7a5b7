"""The state of an accumulation, and finding it inside a larger optimizer state.

A leaf module: it imports nothing from optaccum, so every other module may
import it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np

from optaccum._types import OptState, PyTree


class AccumulateState(NamedTuple):
  """State of `accumulate`; its first five fields are those of optax's `MultiStepsState`.

  Attributes:
    mini_step: micro-batches accepted into the current window; 0 right after a
      window closes.
    gradient_step: inner-optimizer steps taken so far (windows emitted).
    inner_opt_state: the wrapped optimizer's state; it advances once per window.
    acc_grads: the window's running sum of (weighted) gradients, in the
      accumulator dtype. Right after a window closes (`mini_step` 0) it holds
      what the window emitted, in that dtype; the next micro-step clears it.
    skip_state: what the skip policy returned for the last micro-batch.
    acc_weight: the window's sum of weights (the micro-batch count when
      unweighted).
    num_skipped: micro-batches dropped so far, by the skip policy or for a
      NaN, infinite or negative weight.
    emitted: whether the last update call ran the inner optimizer.
    rounding_key: with a stochastically rounded accumulator, the raw uint32
      data of the key that the next micro-step splits; else ().
    statistics: with `statistics=True`, a `StatisticsState` of scalars (read it
      with `optaccum.status(...).statistics`); else ().
    num_skipped_windows: windows whose gradient held a NaN or inf, dropped
      whole by the window guard (read with `optaccum.status(...).num_skipped_windows`).
    num_empty_windows: windows that closed with zero total weight and emitted
      zeros (read with `optaccum.status(...).num_empty_windows`).
  """

  mini_step: jax.Array  # shape=(), dtype=int32
  gradient_step: jax.Array  # shape=(), dtype=int32
  inner_opt_state: Any
  acc_grads: Any
  skip_state: Any = ()
  # NumPy defaults: a JAX array here would start the XLA backend at import,
  # before a multi-host program can call `jax.distributed.initialize`.
  acc_weight: jax.Array = np.zeros((), np.float32)  # type: ignore[assignment]  # shape=(), dtype=float32
  num_skipped: jax.Array = np.zeros((), np.int32)  # type: ignore[assignment]  # shape=(), dtype=int32
  emitted: jax.Array = np.zeros((), np.bool_)  # type: ignore[assignment]  # shape=(), dtype=bool
  rounding_key: Any = ()  # shape=(2,), dtype=uint32 for threefry keys
  statistics: Any = ()
  num_skipped_windows: jax.Array = np.zeros((), np.int32)  # type: ignore[assignment]  # shape=(), dtype=int32
  num_empty_windows: jax.Array = np.zeros((), np.int32)  # type: ignore[assignment]  # shape=(), dtype=int32


def is_state(x: object) -> bool:
  """Whether `x` is an `AccumulateState` (for `is_leaf=` in tree maps)."""
  return isinstance(x, AccumulateState)


def holds_state(tree: PyTree) -> bool:
  """Whether `tree` holds any `AccumulateState` (more than one is an error where it is read)."""
  return any(is_state(leaf) for leaf in jax.tree.leaves(tree, is_leaf=is_state))


def locate_state(where: str, opt_state: OptState, hint: str = "") -> tuple[list, Any, int]:
  """The leaves of `opt_state` (an AccumulateState counting as one), their treedef, and its index.

  Raises a ValueError naming `where` unless `opt_state` holds exactly one.
  """
  leaves, treedef = jax.tree.flatten(opt_state, is_leaf=is_state)
  found = [i for i, leaf in enumerate(leaves) if isinstance(leaf, AccumulateState)]
  if len(found) != 1:
    raise ValueError(
      f"`{where}` must hold exactly one optaccum AccumulateState (from "
      f"`optaccum.accumulate` or `optaccum.compat.MultiSteps`), found {len(found)} in a "
      f"state of type {type(opt_state).__name__}.{hint}"
    )
  return leaves, treedef, found[0]


def check_state(where: str, state: object) -> AccumulateState:
  """Returns `state` if it is an `AccumulateState`, else raises naming the call."""
  if not isinstance(state, AccumulateState):
    raise TypeError(
      f"`{where}(opt_state=...)` must be the AccumulateState that this accumulation's "
      f"init built, got a {type(state).__name__} (a state of another optimizer?)."
    )
  return state

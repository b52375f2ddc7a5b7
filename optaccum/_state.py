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
  """State of `accumulate`: the open window's sums, the inner state and the counters.

  Its first five fields have the names of optax's `MultiStepsState`, but
  `acc_grads` holds the window's running sum, not optax's running mean
  (`optaccum.compat.MultiSteps` keeps optax's state as it is).

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
    num_clamped_windows: windows closed while the `k` schedule returned NaN,
      an infinity or a value below 1, each run as a window of one micro-step
      (read with `optaccum.status(...).num_clamped_windows`).
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
  num_clamped_windows: jax.Array = np.zeros((), np.int32)  # type: ignore[assignment]  # shape=(), dtype=int32


def per_replica_mask(state: AccumulateState) -> AccumulateState:
  """A tree of bools like `state`: True at the leaves each replica holds its own of.

  Under a named axis the window's sums (and the skip decisions behind them)
  differ between replicas until the window closes; the counters and the inner
  optimizer's state stay equal on every replica.
  """
  fields = {
    name: jax.tree.map(lambda _, own=name in PER_REPLICA: own, value)
    for name, value in state._asdict().items()
  }
  mask_statistics = getattr(state.statistics, "per_replica_mask", None)
  if mask_statistics is not None:
    fields["statistics"] = mask_statistics()
  return AccumulateState(**fields)


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
      f"`optaccum.accumulate`), found {len(found)} in a "
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


# The fields that hold the open window's sums: each replica holds its own of
# them under a named axis until the window closes (and its reduction).
WINDOW_SUMS = ("acc_grads", "acc_weight", "statistics")
# The fields that each replica holds its own of between reductions.
PER_REPLICA = frozenset({"acc_grads", "skip_state", "acc_weight", "num_skipped"})
# The counters every AccumulateState holds as arrays, whatever its settings:
# together, they mark an AccumulateState flattened into a mapping (an NNX State).
_COUNTERS = ("mini_step", "gradient_step", "acc_weight", "num_skipped", "emitted")


def fields_of(tree: PyTree) -> dict[str, list]:
  """The leaves of each field of the one AccumulateState in `tree`, by field name.

  `tree` may hold the AccumulateState itself (a TrainState, a tuple), or be a
  mapping such as an NNX State, where `nnx.state(optimizer)` turned the
  AccumulateState into a mapping of its fields. Raises a ValueError unless
  `tree` holds exactly one.
  """
  if holds_state(tree):
    leaves, _, position = locate_state("opt_state", tree)
    return {name: jax.tree.leaves(value) for name, value in leaves[position]._asdict().items()}
  entries = jax.tree_util.tree_leaves_with_path(tree)
  paths = [tuple(_key_name(key) for key in path) for path, _ in entries]
  # Every prefix of every path: a Variable's leaf lies below its field's name.
  present = {path[:end] for path in paths for end in range(1, len(path) + 1)}
  prefixes = {
    path[:at]
    for path in paths
    for at, name in enumerate(path)
    if name == _COUNTERS[0] and all((*path[:at], field) in present for field in _COUNTERS)
  }
  if len(prefixes) != 1:
    locate_state("opt_state", tree)  # raises, saying how many it found
  (prefix,) = prefixes
  fields: dict[str, list] = {}
  for path, (_, leaf) in zip(paths, entries):
    if path[: len(prefix)] == prefix and len(path) > len(prefix):
      fields.setdefault(path[len(prefix)], []).append(leaf)
  return fields


def counters(fields: dict[str, list]) -> tuple[int, int]:
  """(mini_step, gradient_step) of `fields_of`'s result, as Python ints.

  Under `pmap` with the state kept per device (`out_axes=0`) each counter has
  a leading device axis; the devices step together, so they agree.
  """
  mini_step, gradient_step = (
    int(np.asarray(fields[name][0]).reshape(-1)[0]) for name in ("mini_step", "gradient_step")
  )
  return mini_step, gradient_step


def _key_name(key: object) -> str:
  """A tree path entry's name: a dict key, an attribute or a sequence index."""
  for attribute in ("key", "name", "idx"):
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)

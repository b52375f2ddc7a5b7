"""Eager argument checks shared by every public entry point.

Each check raises at the call that received the bad value, and its message names
the call, the argument and the value, so a user can fix it without a traceback
into JAX.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import Any, TypeGuard, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from optaccum._types import DTypeLike, KSchedule, PyTree

MAX_INT32 = 2**31 - 1


def _is_int(value: object) -> TypeGuard[int | np.integer]:
  """Whether `value` is a Python or NumPy int, and not a bool."""
  return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_k(where: str, k: object, name: str = "k") -> None:
  """Checks that `k` is a positive int or a callable schedule."""
  if callable(k):
    return
  if not _is_int(k) or not 1 <= int(k) <= MAX_INT32:
    raise ValueError(
      f"`{where}({name}=...)` must be a positive int (at most 2**31 - 1, the "
      f"largest int32 counter) or a callable `gradient_step -> k`, got {name}={k!r}."
    )


def check_schedule_value(where: str, name: str, schedule: Callable[[jax.Array], Any]) -> None:
  """Checks a schedule's value at gradient step 0: a finite real scalar.

  Inside a compiled step a bad value cannot raise, so the schedule is probed
  once here, where it can: a NaN or inf would otherwise be clamped to a window
  of one micro-step without a word.
  """
  value = schedule(jnp.zeros((), jnp.int32))
  shape = jnp.shape(value)
  kind = jnp.result_type(value)
  if shape != () or not (jnp.issubdtype(kind, jnp.integer) or jnp.issubdtype(kind, jnp.floating)):
    raise ValueError(
      f"`{where}({name}=...)` must return a real scalar, but at gradient step 0 it "
      f"returned {value!r}."
    )
  if not np.isfinite(float(value)):
    raise ValueError(
      f"`{where}({name}=...)` must return a finite number of micro-steps, but at gradient "
      f"step 0 it returned {value!r}."
    )


def check_choice(where: str, name: str, value: object, choices: tuple[str, ...]) -> None:
  """Checks that `value` is one of the strings in `choices`."""
  if not isinstance(value, str) or value not in choices:
    raise ValueError(
      f"`{where}({name}=...)` must be one of {', '.join(map(repr, choices))}, got {name}={value!r}."
    )


def check_callable_or_none(where: str, name: str, value: object) -> None:
  """Checks that `value` is None or callable."""
  if value is not None and not callable(value):
    raise TypeError(f"`{where}({name}=...)` must be None or a callable, got {name}={value!r}.")


def check_positive_int(where: str, name: str, value: object) -> None:
  """Checks that `value` is an int >= 1 (bools rejected)."""
  if not _is_int(value) or int(value) < 1:
    raise ValueError(f"`{where}({name}=...)` must be a positive int, got {name}={value!r}.")


def as_argnums(where: str, name: str, value: object) -> tuple[int, ...]:
  """Returns `value`, a non-negative int or a sequence of them, as a tuple of ints."""
  numbers = (value,) if isinstance(value, (int, np.integer)) else value
  ok = isinstance(numbers, Sequence) and all(
    isinstance(n, (int, np.integer)) and not isinstance(n, (bool, np.bool_)) and n >= 0
    for n in numbers
  )
  if not ok:
    raise TypeError(
      f"`{where}({name}=...)` must be a non-negative int or a sequence of them, "
      f"got {name}={value!r}."
    )
  return tuple(int(n) for n in cast(Sequence[int], numbers))


def check_number(where: str, name: str, value: object, *, positive: bool) -> None:
  """Checks that `value` is a real number (and > 0 where asked)."""
  ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
  if ok and positive:
    ok = cast(float, value) > 0  # a numbers.Real, which typeshed cannot compare
  if not ok:
    kind = "a positive number" if positive else "a real number"
    raise ValueError(f"`{where}({name}=...)` must be {kind}, got {name}={value!r}.")


def _describe(leaf: jax.Array | np.ndarray | None) -> str:
  if leaf is None:
    return "None"
  return f"{jnp.dtype(leaf.dtype).name}{list(jnp.shape(leaf))}"


def check_tree_matches(
  where: str,
  name: str,
  tree: PyTree,
  reference: PyTree,
  reference_name: str,
) -> None:
  """Checks `tree` against `reference`: structure, shapes, floating dtype kind.

  A None leaf (Optax's marker for "no gradient here") must sit where
  `reference` has None too, and is passed through.

  Raises:
    ValueError: naming both sides where structure or shapes differ.
    TypeError: where a leaf of `tree` is not floating point.
  """
  is_none = lambda x: x is None  # noqa: E731
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_none)
  ref_leaves, ref_treedef = jax.tree_util.tree_flatten_with_path(reference, is_leaf=is_none)
  if treedef != ref_treedef:  # type: ignore[operator]  # PyTreeDef: no stubs
    raise ValueError(
      f"`{where}({name}=...)` has a tree structure that does not match "
      f"{reference_name}.\n  {name}: {treedef}\n  {reference_name}: {ref_treedef}"
    )
  for (path, leaf), (_, ref) in zip(leaves, ref_leaves):
    if leaf is None and ref is None:
      continue
    if leaf is not None and not isinstance(leaf, (jax.Array, np.ndarray)):
      raise TypeError(
        f"`{where}({name}=...)` must hold arrays, but the leaf at "
        f"{jax.tree_util.keystr(path) or 'the root'} is a {type(leaf).__name__}: "
        f"{leaf!r}. Pass jnp.asarray(...) of the dtype you mean."
      )
    if ref is None or leaf is None or jnp.shape(leaf) != jnp.shape(ref):
      raise ValueError(
        f"`{where}({name}=...)` does not match {reference_name} at "
        f"{jax.tree_util.keystr(path) or 'the root'}: {name} has "
        f"{_describe(leaf)}, {reference_name} has {_describe(ref)}."
      )
    if jnp.iscomplexobj(leaf) and not jnp.iscomplexobj(ref):
      raise TypeError(
        f"`{where}({name}=...)` has a complex leaf at "
        f"{jax.tree_util.keystr(path) or 'the root'} ({_describe(leaf)}) where "
        f"{reference_name} is real ({_describe(ref)}): its imaginary part would be lost."
      )
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
      raise TypeError(
        f"`{where}({name}=...)` must hold floating-point arrays, but the leaf at "
        f"{jax.tree_util.keystr(path) or 'the root'} has dtype "
        f"{jnp.result_type(leaf).name}."
      )


def as_scalar(where: str, name: str, value: ArrayLike, dtype: DTypeLike) -> jax.Array:
  """Returns `value` as a scalar array of `dtype`; rejects non-scalars."""
  # np.shape: jnp.shape warns on a list (deprecated, to become an error).
  shape = np.shape(value)
  if shape != ():
    raise ValueError(f"`{where}({name}=...)` must be a scalar, got an array of shape {shape}.")
  check_real(where, name, value)
  # Straight to `dtype`: a Python int beyond int32 (2**40 tokens) overflows otherwise.
  return jnp.asarray(value, dtype)


def check_real(where: str, name: str, value: object) -> None:
  """Raises a TypeError naming the call unless `value` holds real numbers (no bool or complex)."""
  kind = getattr(value, "dtype", None)
  is_number = (
    jnp.issubdtype(kind, jnp.integer) or jnp.issubdtype(kind, jnp.floating)
    if kind is not None
    else isinstance(value, numbers.Real) and not isinstance(value, bool)
  )
  if not is_number:
    raise TypeError(
      f"`{where}({name}=...)` must be a number (real, not a bool), got {name}={value!r}."
    )


def as_flag(where: str, name: str, value: ArrayLike) -> jax.Array:
  """Returns `value` (a Python or JAX bool) as a scalar bool array."""
  # Checked before jnp.asarray, which raises on a str without naming the call.
  is_array = isinstance(value, (bool, np.bool_, jax.Array, np.ndarray))
  if not is_array or jnp.shape(value) != () or jnp.result_type(value) != jnp.bool_:
    raise TypeError(f"`{where}({name}=...)` must be a scalar bool, got {name}={value!r}.")
  return jnp.asarray(value)


def as_schedule(k: KSchedule) -> Callable[[jax.Array], jax.Array]:
  """Returns `k` as a schedule `gradient_step -> k` (int32, >= 1); see `window_length`."""
  length = window_length(k)
  return lambda step: length(step)[0]


# The largest float32 below 2**31: a finite k above it is kept within int32
# before the cast (which would wrap).
_LARGEST_K = 2.0**31 - 128.0


def window_length(k: KSchedule) -> Callable[[jax.Array], tuple[jax.Array, jax.Array]]:
  """Returns `gradient_step -> (window length, whether the schedule's value was clamped)`.

  The rule every form shares: float values are floored; a value that is NaN,
  infinite or below 1 gives a window of one micro-step (every micro-step
  emits), and the caller counts it (`Status.num_clamped_windows`). A traced
  value cannot raise, so it is clamped and counted, never silently kept.
  """
  if callable(k):
    schedule = k
  else:
    constant = int(k)
    schedule = lambda step: constant  # noqa: E731

  def length(step: jax.Array) -> tuple[jax.Array, jax.Array]:
    value = jnp.asarray(schedule(step))
    if jnp.shape(value) != ():
      raise ValueError(f"The `k` schedule must return a scalar, got shape {jnp.shape(value)}.")
    if jnp.issubdtype(value.dtype, jnp.floating):
      value = jnp.floor(value.astype(jnp.float32))
      clamped = ~jnp.isfinite(value) | (value < 1.0)
      kept = jnp.minimum(jnp.where(clamped, jnp.float32(1.0), value), _LARGEST_K)
    else:
      clamped = value < 1
      kept = jnp.where(clamped, jnp.ones((), value.dtype), value)
      top = np.iinfo(np.int32).max
      if np.iinfo(value.dtype).max > top:  # kept within int32 before the cast
        kept = jnp.minimum(kept, jnp.asarray(top, value.dtype))
    return kept.astype(jnp.int32), clamped

  return length


def unsplittable(x: ArrayLike, parts: int) -> str | None:
  """Why `x`'s leading axis does not split into `parts` equal parts ("a batch of 10"), or None."""
  shape = jnp.shape(x)
  if shape and not shape[0] % parts:
    return None
  return "no batch axis" if not shape else f"a batch of {shape[0]}"

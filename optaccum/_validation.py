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
  """Checks that `k` is a positive int, or a schedule whose value at step 0 is good.

  A schedule is probed once, here (`check_schedule_value`): inside a compiled
  step its value cannot raise.
  """
  if callable(k):
    check_schedule_value(where, name, k)
    return
  if not _is_int(k) or not 1 <= int(k) <= MAX_INT32:
    raise ValueError(
      f"`{where}({name}=...)` must be a positive int (at most 2**31 - 1, the "
      f"largest int32 counter) or a callable `gradient_step -> k`, got {name}={k!r}."
    )


def is_real_scalar(value: object) -> bool:
  """Whether `value` is one real number: a Python or NumPy number, or a 0-d integer or
  floating array (no bool, complex or str)."""
  if isinstance(value, (jax.Array, np.ndarray, np.generic)):
    kind = value.dtype
    real = jnp.issubdtype(kind, jnp.integer) or jnp.issubdtype(kind, jnp.floating)
    return real and np.shape(value) == ()
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_schedule_value(where: str, name: str, schedule: Callable[[jax.Array], Any]) -> None:
  """Checks a schedule's value at gradient step 0: a finite real scalar within int32.

  Inside a compiled step a bad value cannot raise, so the schedule is probed
  once here, where it can: a NaN or inf would otherwise be clamped to a window
  of one micro-step without a word, and a Python int beyond int32 would
  overflow in the step's first trace.
  """
  value = schedule(jnp.zeros((), jnp.int32))
  if not is_real_scalar(value):
    raise ValueError(
      f"`{where}({name}=...)` must return a real scalar, but at gradient step 0 it "
      f"returned {value!r}."
    )
  number = cast(float, value)
  if not np.isfinite(float(number)):
    raise ValueError(
      f"`{where}({name}=...)` must return a finite number of micro-steps, but at gradient "
      f"step 0 it returned {value!r}."
    )
  if (number > MAX_INT32) if isinstance(number, int) else float(number) >= 2.0**31:
    raise ValueError(
      f"`{where}({name}=...)` must return at most 2**31 - 1 micro-steps (the largest int32 "
      f"counter), but at gradient step 0 it returned {value!r}."
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


def as_number(where: str, name: str, value: object, *, positive: bool, finite: bool = False) -> Any:
  """Returns `value`, a real number (> 0 where `positive`, finite where `finite`), checked.

  A Python or NumPy number is returned as it is; a concrete 0-d JAX or NumPy
  array of an integer or floating dtype as the NumPy scalar of its dtype, so
  that arithmetic on it stays in that dtype. Bools, complex numbers, strings,
  non-scalars and traced values are refused with a ValueError naming the call.
  """
  number = value
  if isinstance(value, (jax.Array, np.ndarray)) and is_real_scalar(value):
    try:
      number = np.asarray(value)[()]
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
      number = None  # traced: no value to check
  ok = number is not None and is_real_scalar(number)
  if ok and positive:
    ok = cast(float, number) > 0  # a real number, which typeshed cannot compare
  if ok and finite:
    ok = bool(np.isfinite(float(cast(float, number))))
  if not ok:
    kind = "a positive number" if positive else "a real number"
    kind = f"a finite {kind[2:]}" if finite else kind
    raise ValueError(f"`{where}({name}=...)` must be {kind}, got {name}={value!r}.")
  return number


def shown(value: object) -> str:
  """`value` for a message: its type with an article, and its repr cut to 60 characters."""
  text, kind = repr(value), type(value).__name__
  text = text if len(text) <= 60 else text[:57] + "..."
  return f"{'an' if kind[:1].lower() in 'aeiou' else 'a'} {kind}: {text}"


def place(path: tuple) -> str:
  """Where a leaf sits in its tree, for a message: its key path, or "the root"."""
  return jax.tree_util.keystr(path) or "the root"


def array_error(
  where: str,
  name: str,
  path: tuple,
  leaf: object,
  hint: str = "Pass jnp.asarray(...) of the dtype you mean.",
) -> TypeError:
  """The TypeError for a leaf of `where`'s argument `name` that is not an array.

  A leaf at the root means the argument is no pytree of arrays at all (a
  string, a number).
  """
  if not path:
    return TypeError(f"`{where}({name}=...)` must be a pytree of arrays, got {shown(leaf)}. {hint}")
  return TypeError(
    f"`{where}({name}=...)` must hold arrays, but the leaf at {jax.tree_util.keystr(path)} is "
    f"{shown(leaf)}. {hint}"
  )


def check_arrays(where: str, name: str, tree: PyTree) -> None:
  """Raises `array_error` for the first leaf of `tree` that is not a JAX or NumPy array."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if not isinstance(leaf, (jax.Array, np.ndarray)):
      raise array_error(where, name, path, leaf)


def _describe(leaf: jax.Array | np.ndarray | None) -> str:
  if leaf is None:
    return "None"
  return f"{jnp.dtype(leaf.dtype).name}{list(jnp.shape(leaf))}"


def same_structure(
  where: str, name: str, tree: PyTree, reference: PyTree, reference_name: str
) -> list[tuple[tuple[Any, Any], Any]]:
  """`((path, leaf), reference leaf)` pairs; raises where the two trees differ.

  None leaves count on both sides (Optax's marker for "no gradient here").
  """
  is_none = lambda x: x is None  # noqa: E731
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_none)
  ref_leaves, ref_treedef = jax.tree.flatten(reference, is_leaf=is_none)
  if treedef != ref_treedef:  # type: ignore[operator]  # PyTreeDef: no stubs
    raise ValueError(
      f"`{where}({name}=...)` has a tree structure that does not match "
      f"{reference_name}.\n  {name}: {treedef}\n  {reference_name}: {ref_treedef}"
    )
  return list(zip(leaves, ref_leaves))


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
  leaves = same_structure(where, name, tree, reference, reference_name)
  for (path, leaf), ref in leaves:
    if leaf is None and ref is None:
      continue
    if leaf is not None and not isinstance(leaf, (jax.Array, np.ndarray)):
      raise array_error(where, name, path, leaf)
    if ref is None or leaf is None or jnp.shape(leaf) != jnp.shape(ref):
      raise ValueError(
        f"`{where}({name}=...)` does not match {reference_name} at "
        f"{place(path)}: {name} has "
        f"{_describe(leaf)}, {reference_name} has {_describe(ref)}."
      )
    if jnp.iscomplexobj(leaf) and not jnp.iscomplexobj(ref):
      raise TypeError(
        f"`{where}({name}=...)` has a complex leaf at "
        f"{place(path)} ({_describe(leaf)}) where "
        f"{reference_name} is real ({_describe(ref)}): its imaginary part would be lost."
      )
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
      raise TypeError(
        f"`{where}({name}=...)` must hold floating-point arrays, but the leaf at "
        f"{place(path)} has dtype "
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


def as_schedule(
  k: KSchedule, *, where: str | None = None, name: str = "k"
) -> Callable[[jax.Array], jax.Array]:
  """Returns `k` as a schedule `gradient_step -> k` (int32, >= 1); see `window_length`."""
  length = window_length(k, where=where, name=name)
  return lambda step: length(step)[0]


# The largest float32 below 2**31: a finite k above it is kept within int32
# before the cast (which would wrap).
_LARGEST_K = 2.0**31 - 128.0


def window_length(
  k: KSchedule, *, where: str | None = None, name: str = "k"
) -> Callable[[jax.Array], tuple[jax.Array, jax.Array]]:
  """Returns `gradient_step -> (window length, whether the schedule's value was clamped)`.

  The rule every form shares: float values are floored; a value that is NaN,
  infinite or below 1 gives a window of one micro-step (every micro-step
  emits), and the caller counts it (`Status.num_clamped_windows`). A traced
  value cannot raise, so it is clamped and counted, never silently kept. A
  value above the int32 range is kept at 2**31 - 1 (about 2**31 for a float),
  a Python int included (`jnp.asarray` would overflow on it). A value that is
  no real scalar raises a ValueError naming `where(name=...)` (the schedule)
  while the step is traced; `check_schedule_value` refuses it at step 0.
  """
  if callable(k):
    schedule = k
  else:
    constant = int(k)
    schedule = lambda step: constant  # noqa: E731

  def length(step: jax.Array) -> tuple[jax.Array, jax.Array]:
    raw = schedule(step)
    if not is_real_scalar(raw):
      shown = _describe(raw) if isinstance(raw, (jax.Array, np.ndarray)) else repr(raw)
      named = f"`{where}({name}=...)`" if where else f"The `{name}` schedule"
      raise ValueError(f"{named} must return a real scalar, got {shown}.")
    if isinstance(raw, (int, np.integer)) or isinstance(raw, np.ndarray) and raw.dtype.kind in "iu":
      # Clamped in Python: jnp.asarray overflows on an int beyond int32. One
      # below 1 stays below 1, to be clamped and counted as such.
      raw = min(max(int(raw), 0), MAX_INT32)
    value = jnp.asarray(raw)
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

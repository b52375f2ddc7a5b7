"""Which arguments of a gradient function are batches, and which is its PRNG key.

Shared by `microbatch` (which slices the batches into micro-batches) and
`per_replica` (which splits them among replicas): the defaults, the checks and
the errors are the same for both, each naming the function it came from.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp

from optaccum import _validation
from optaccum._types import PyTree

F = TypeVar("F", bound=Callable[..., Any])


def named_like(fn: Callable[..., Any]) -> Callable[[F], F]:
  """A decorator: the wrapper takes `fn`'s name and docstring, as `functools.wraps` gives.

  Without `__wrapped__`: the wrapper is a new function (it splits its batches),
  not `fn`, and Equinox's `filter_jit` warns about a `__wrapped__` that leads to
  a JAX-transformed callable (an `eqx.filter_value_and_grad`).
  """

  def decorate(wrapper: F) -> F:
    functools.update_wrapper(wrapper, fn)
    del wrapper.__wrapped__  # type: ignore[attr-defined]
    return wrapper

  return decorate


@dataclasses.dataclass(frozen=True)
class Arguments:
  """The batch and key arguments as given (checked), before a call resolves the defaults.

  Attributes:
    batch_argnums: positional batch arguments; None means every one after
      the first, except the key.
    batch_argnames: keyword batch arguments.
    key_arg: the position or keyword of the PRNG key argument, or None.
  """

  batch_argnums: tuple[int, ...] | None
  batch_argnames: tuple[str, ...]
  key_arg: int | str | None


@dataclasses.dataclass(frozen=True)
class Plan:
  """What one call does with each argument: which are batches, which is the key."""

  batch_argnums: tuple[int, ...]
  batch_argnames: tuple[str, ...]
  key_arg: int | str | None

  def passes_whole(self, name: int | str) -> bool:
    """Whether argument `name` (a position or keyword) is neither a batch nor the key."""
    return name not in {*self.batch_argnums, *self.batch_argnames, self.key_arg}


def check(where: str, batch_argnums: object, batch_argnames: object, key_arg: object) -> Arguments:
  """The three arguments, checked; raises naming `where` and the argument."""
  argnums = None
  if batch_argnums is not None:
    argnums = _validation.as_argnums(where, "batch_argnums", batch_argnums)
  names = (batch_argnames,) if isinstance(batch_argnames, str) else batch_argnames
  if not isinstance(names, Sequence) or not all(isinstance(n, str) for n in names):
    raise TypeError(
      f"`{where}(batch_argnames=...)` must be a str or a sequence of str, "
      f"got batch_argnames={batch_argnames!r}."
    )
  if key_arg is not None:
    if (
      isinstance(key_arg, bool)
      or not isinstance(key_arg, (int, str))
      or key_arg == ""
      or (isinstance(key_arg, int) and key_arg < 1)
    ):
      raise TypeError(
        f"`{where}(key_arg=...)` must be None, a positive int (a position) or a str (a "
        f"keyword), got key_arg={key_arg!r}."
      )
    if key_arg in (argnums or ()) or key_arg in names:
      raise ValueError(
        f"`{where}(key_arg=...)` names a batch argument; a key is split, not sliced, "
        f"got key_arg={key_arg!r}."
      )
  return Arguments(argnums, tuple(names), key_arg)


def plan(
  where: str, arguments: Arguments, args: tuple[PyTree, ...], kwargs: dict[str, PyTree]
) -> Plan:
  """Resolves the defaults against the call's arguments and checks they exist."""
  batch_argnums, key_arg = arguments.batch_argnums, arguments.key_arg
  if batch_argnums is None:
    batch_argnums = tuple(i for i in range(1, len(args)) if i != key_arg)
  for n in batch_argnums:
    if n >= len(args):
      raise ValueError(
        f"`{where}(batch_argnums=...)` names argument {n}, but the call has "
        f"{len(args)} positional arguments."
      )
  for name in arguments.batch_argnames:
    if name not in kwargs:
      raise ValueError(
        f"`{where}(batch_argnames=...)` names {name!r}, which the call does not pass; "
        f"it passes {sorted(kwargs)}."
      )
  if isinstance(key_arg, int) and key_arg >= len(args):
    raise ValueError(
      f"`{where}(key_arg=...)` names argument {key_arg}, but the call has "
      f"{len(args)} positional arguments."
    )
  if isinstance(key_arg, str) and key_arg not in kwargs:
    raise ValueError(
      f"`{where}(key_arg=...)` names {key_arg!r}, which the call does not pass; "
      f"it passes {sorted(kwargs)}."
    )
  return Plan(batch_argnums, arguments.batch_argnames, key_arg)


def batches(
  plan: Plan, args: tuple[PyTree, ...], kwargs: dict[str, PyTree]
) -> dict[int | str, PyTree]:
  """Each batch argument, by position (int) or keyword (str)."""
  found: dict[int | str, PyTree] = {n: args[n] for n in plan.batch_argnums}
  found.update({n: kwargs[n] for n in plan.batch_argnames})
  return found


def whole(
  plan: Plan, args: tuple[PyTree, ...], kwargs: dict[str, PyTree]
) -> dict[int | str, PyTree]:
  """Each argument passed whole (neither a batch nor the key), by position or keyword."""
  found: dict[int | str, PyTree] = {n: a for n, a in enumerate(args) if plan.passes_whole(n)}
  found.update({n: v for n, v in kwargs.items() if plan.passes_whole(n)})
  return found


def key(
  where: str, plan: Plan, args: tuple[PyTree, ...], kwargs: dict[str, PyTree]
) -> jax.Array | None:
  """The call's PRNG key, checked to be a single key; None without a key argument."""
  if plan.key_arg is None:
    return None
  value = args[plan.key_arg] if isinstance(plan.key_arg, int) else kwargs[plan.key_arg]
  dtype = jnp.result_type(value)
  is_typed = jnp.issubdtype(dtype, jax.dtypes.prng_key) and jnp.shape(value) == ()
  is_raw = dtype == jnp.uint32 and jnp.shape(value) == (2,)
  if not (is_typed or is_raw):
    raise TypeError(
      f"`{where}(key_arg=...)` names argument {plan.key_arg!r}, which must be a single PRNG "
      f"key, got {dtype} of shape {jnp.shape(value)}."
    )
  return value


def put(args: list[PyTree], kwargs: dict[str, PyTree], name: int | str, value: PyTree) -> None:
  """Sets the positional (int `name`) or keyword (str `name`) argument to `value`."""
  if isinstance(name, int):
    args[name] = value
  else:
    kwargs[name] = value


def replaced(
  args: tuple[PyTree, ...], kwargs: dict[str, PyTree], values: dict[int | str, PyTree]
) -> tuple[list[PyTree], dict[str, PyTree]]:
  """The call's arguments with those named in `values` replaced."""
  new_args, new_kwargs = list(args), dict(kwargs)
  for name, value in values.items():
    put(new_args, new_kwargs, name, value)
  return new_args, new_kwargs

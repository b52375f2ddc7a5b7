"""`microbatch`'s aux outputs (metrics): how each leaf combines over the micro-batches.

"mean" and "sum" leaves are summed in the scan's carry (weighted like the loss
for "mean"); "stack", "concat" and callable ones are kept per micro-batch and
combined after the scan.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from optaccum import _accumulator
from optaccum._types import PyTree

REDUCTIONS = ("mean", "sum", "stack", "concat")
Mode = str | Callable[[jax.Array], jax.Array]
_IS_SPEC = lambda x: isinstance(x, str) or callable(x)  # noqa: E731
_WHERE = "microbatch"


def check_reduction(value: PyTree) -> None:
  """Raises, naming `microbatch(aux_reduction=...)`, unless `value` is choices or a tree of them."""
  for spec in jax.tree.leaves(value, is_leaf=_IS_SPEC):
    if not (callable(spec) or spec in REDUCTIONS):
      raise ValueError(
        f"`{_WHERE}(aux_reduction=...)` must be one of {', '.join(map(repr, REDUCTIONS))}, "
        f"a callable, or a tree of them, got aux_reduction={value!r}."
      )


def check_unequal(aux: Layout, k: int, tail: int) -> None:
  """Raises where an aux leaf needs equal micro-batches ("stack", a callable) and has a tail."""
  for i in aux.stacked:
    if aux.modes[i] != "concat":
      raise ValueError(
        f"`{_WHERE}(aux_reduction=...)` stacks an aux leaf ({aux.modes[i]!r}), which needs "
        f"micro-batches of equal rows, but the batch does not split into k={k} of them (its "
        f"last micro-batch has {tail} rows); use 'concat', or a batch that k divides."
      )


def _modes(aux: PyTree, aux_reduction: PyTree) -> list[Any]:
  """One reduction per aux leaf, from a single choice or a tree prefix of `aux`."""
  try:
    modes = jax.tree.map(
      lambda spec, sub: jax.tree.map(lambda _: spec, sub), aux_reduction, aux, is_leaf=_IS_SPEC
    )
  except ValueError as error:
    raise ValueError(
      f"`{_WHERE}(aux_reduction=...)` must be one choice or a tree prefix of the aux "
      f"output.\n  aux_reduction: {aux_reduction!r}\n  aux: {jax.tree.structure(aux)}"
    ) from error
  return jax.tree.structure(aux).flatten_up_to(modes)  # type: ignore[attr-defined]  # PyTreeDef


def _check_mode(mode: Mode, leaf: jax.ShapeDtypeStruct) -> None:
  if mode == "mean" and not jnp.issubdtype(leaf.dtype, jnp.inexact):
    raise TypeError(
      f"`{_WHERE}(aux_reduction=...)` is 'mean' for an aux leaf of dtype "
      f"{leaf.dtype}; choose 'sum' (or 'stack') for it with a tree of choices."
    )
  if mode == "concat" and not leaf.shape:
    raise ValueError(
      f"`{_WHERE}(aux_reduction=...)` is 'concat' for a scalar aux leaf; 'concat' "
      "joins per-example leaves, use 'stack' for scalars."
    )


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where each aux leaf goes: summed in the carry ("mean", "sum") or stacked by the scan.

  Attributes:
    treedef: the aux output's structure.
    leaves: its leaves' shapes and dtypes, in flattened order.
    modes: each leaf's reduction.
    summed: the indices of the leaves summed in the carry.
    stacked: the indices of the leaves kept per micro-batch.
  """

  treedef: Any
  leaves: tuple[Any, ...]
  modes: tuple[Any, ...]
  summed: tuple[int, ...]
  stacked: tuple[int, ...]

  def flatten(self, aux: PyTree) -> list[Any]:
    return self.treedef.flatten_up_to(aux)

  def unflatten(self, leaves: list[Any]) -> Any:
    return self.treedef.unflatten(leaves)


def layout(aux_shape: PyTree, aux_reduction: PyTree) -> Layout:
  """The layout of `fn`'s aux output (`None` without aux), its reductions checked."""
  leaves, treedef = jax.tree.flatten(aux_shape)
  modes = _modes(aux_shape, aux_reduction)
  for mode, leaf in zip(modes, leaves):
    _check_mode(mode, leaf)
  summed = tuple(i for i, mode in enumerate(modes) if mode in _accumulator.REDUCTIONS)
  stacked = tuple(i for i, mode in enumerate(modes) if mode not in _accumulator.REDUCTIONS)
  return Layout(treedef, tuple(leaves), tuple(modes), summed, stacked)


def combine_stacked(mode: Mode, stack: jax.Array) -> Any:
  """An aux leaf from its `[k, ...]` stack of micro-batch values."""
  if mode == "stack":
    return stack
  if mode == "concat":
    # [k, m, ...] -> [m, k, ...] -> [m * k, ...]: row r = a * k + i was row a
    # of micro-batch i, so this restores the batch's order.
    return jnp.reshape(jnp.swapaxes(stack, 0, 1), (-1, *stack.shape[2:]))
  assert callable(mode)
  return mode(stack)

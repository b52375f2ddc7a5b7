"""Where a window's closing step writes its updates: the carries of its conditional.

The fast path carries the parameters and writes the updates into them; `update`
carries the accumulator (alone, where the updates fit it) or a buffer shaped
like the updates. Also the leaf helpers they share with the core.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import jax
import jax.numpy as jnp

from optaccum import _replicas
from optaccum._state import AccumulateState
from optaccum._types import Params, PyTree, Updates

_IS_NONE = lambda x: x is None  # noqa: E731
T = TypeVar("T")


def map_updates(fn: Callable[..., Any], updates: Updates, *rest: PyTree) -> Any:
  """Maps over an updates tree, passing its None leaves through."""
  return jax.tree.map(
    lambda u, *r: None if u is None else fn(u, *r), updates, *rest, is_leaf=_IS_NONE
  )


def _same_shapes(tree: PyTree, shapes: PyTree) -> bool:
  """Whether `tree` has the structure, shapes and dtypes of `shapes`."""
  structure = jax.tree.structure(tree, is_leaf=_IS_NONE)
  if structure != jax.tree.structure(shapes, is_leaf=_IS_NONE):  # type: ignore[operator]
    return False
  return all(
    leaf is None or (leaf.shape, leaf.dtype) == (shape.shape, shape.dtype)
    for leaf, shape in zip(
      jax.tree.leaves(tree, is_leaf=_IS_NONE), jax.tree.leaves(shapes, is_leaf=_IS_NONE)
    )
  )


def gradient_zeros(params: Params, acc_grads: Updates) -> Any:
  """Zero gradients: the parameters' dtypes, the accumulator's shapes and placement.

  Under mesh axes that is one zero gradient per replica.
  """
  return map_updates(lambda acc, p: jnp.zeros_like(acc, jnp.result_type(p)), acc_grads, params)


def keep_dtypes(new: T, old: T) -> T:
  """`new` with each array leaf cast back to the dtype of `old`'s.

  Optax creates moments in the parameters' dtype and returns them promoted
  after an update with wider gradients (bfloat16 parameters, float32
  gradients). A loop or conditional must keep its carry's types, and a state
  whose dtypes drift from window to window would retrace every step, so the
  inner state keeps the dtypes `init` gave it, as `optax.MultiSteps` does.
  For the same reason a leaf that Optax's update turns into None (a moment of
  an integer parameter, which gets no gradient) keeps its value from `init`.
  """

  def cast(n: PyTree, o: PyTree) -> PyTree:
    if n is None:
      return o
    if hasattr(n, "dtype") and hasattr(o, "dtype") and n.dtype != o.dtype:
      return n.astype(o.dtype)
    return n

  return jax.tree.map(cast, new, old, is_leaf=_IS_NONE)


def _holds_exactly(acc_grads: Updates, updates: Updates) -> bool:
  """Whether each accumulator leaf's dtype holds the update leaf's values exactly."""

  def holds(acc: jax.Array, update: jax.Array) -> bool:
    a, u = jnp.dtype(acc.dtype), jnp.dtype(update.dtype)
    if a == u:
      return True
    complex_kind = jnp.issubdtype(a, jnp.complexfloating)
    if complex_kind != jnp.issubdtype(u, jnp.complexfloating):
      return False
    if not (jnp.issubdtype(a, jnp.inexact) and jnp.issubdtype(u, jnp.inexact)):
      return False
    wide, narrow = jnp.finfo(a), jnp.finfo(u)
    return (
      wide.nmant >= narrow.nmant and wide.maxexp >= narrow.maxexp and wide.minexp <= narrow.minexp
    )

  return all(
    u is None or holds(a, u)
    for u, a in zip(
      jax.tree.leaves(updates, is_leaf=_IS_NONE), jax.tree.leaves(acc_grads, is_leaf=_IS_NONE)
    )
  )


class OtherShapes(Exception):
  """Raised while tracing: the inner optimizer's updates are not shaped like the carry."""

  def __init__(self, shapes: PyTree):
    super().__init__("the inner optimizer's updates differ from the gradients' shapes")
    self.shapes = shapes


def _apply_update(param: jax.Array, update: jax.Array | None) -> jax.Array:
  """`optax.apply_updates` for one leaf, with its promotion spelled out (strict mode passes).

  The sum is formed in the wider of the two dtypes (float32 for a bfloat16
  parameter and a float32 update) and cast back to the parameter's, as optax
  does under standard promotion. As `eqx.apply_updates`, a None update (an
  integer parameter) leaves its parameter.
  """
  if update is None:
    return param
  # An update sharded otherwise (an optimizer state sharded over the replicas,
  # ZeRO-1) is gathered to the parameter's layout here, once per window.
  update = _replicas.placed_like(update, param)
  wide = update.dtype if jnp.finfo(update.dtype).bits > jnp.finfo(param.dtype).bits else param.dtype
  return (param.astype(wide) + update.astype(wide)).astype(param.dtype)


class IntoParams:
  """The fast path's carry: the parameters. The closing step applies its updates to them."""

  def read(self, carry: Params, params: Params, sums: Updates) -> tuple[Params, Updates]:
    """The parameters and the window's sums the step reads (from the carry where it holds them)."""
    return carry, sums

  def write(self, carry: Params, updates: Updates, like: Updates, sums: Updates) -> Params:
    return jax.tree.map(_apply_update, carry, updates, is_leaf=_IS_NONE)


class IntoAccumulator:
  """`update`'s carry where the updates fit the accumulator: the accumulator itself.

  Once the window's gradient is formed the accumulator is free (the next
  micro-step clears it), so the closing step writes the updates there and
  every micro-step emits `where(emitted, acc, 0)`, which XLA fuses into the
  caller's `apply_updates`: a micro-step that does not close its window reads
  the gradient once for the add and the accumulator once for the caller's
  write, and allocates nothing (tests/test_memory.py).
  """

  def read(self, carry: Updates, params: Params, sums: Updates) -> tuple[Params, Updates]:
    return params, carry

  def write(self, carry: Updates, updates: Updates, like: Updates, sums: Updates) -> Updates:
    if not (_same_shapes(updates, like) and _holds_exactly(sums, updates)):
      raise OtherShapes(map_updates(_replicas.abstract, updates))
    return map_updates(
      lambda u, acc: _replicas.placed_like(u.astype(acc.dtype), acc), updates, sums
    )

  def emitted(
    self, state: AccumulateState, written: Updates, like: Updates
  ) -> tuple[Updates, AccumulateState]:
    """The dtypes to emit in, and the state holding what was written."""
    return like, state._replace(acc_grads=written)


class IntoBuffer:
  """`update`'s carry elsewhere: a buffer of zeros shaped like the updates.

  Across replicas (the gradients and the accumulator are per replica, the
  updates must be the same on every replica, and under `shard_map` typed so),
  or where the updates do not fit the accumulator.
  """

  def read(self, carry: Updates, params: Params, sums: Updates) -> tuple[Params, Updates]:
    return params, sums

  def write(self, carry: Updates, updates: Updates, like: Updates, sums: Updates) -> Updates:
    if not _same_shapes(updates, carry):
      raise OtherShapes(map_updates(_replicas.abstract, updates))
    return map_updates(_replicas.placed_like, updates, carry)

  def emitted(
    self, state: AccumulateState, written: Updates, like: Updates
  ) -> tuple[Updates, AccumulateState]:
    return written, state


Target = IntoParams | IntoAccumulator | IntoBuffer

"""Flax NNX modules as arguments of `microbatch`: split outside the scan, merged inside it.

Flax is an optional dependency. An NNX object can exist only once `flax.nnx` has
been imported, so `microbatch` looks for one only then, and nothing here imports
Flax before it is handed an NNX object.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from optaccum import _arguments
from optaccum._types import PyTree

if TYPE_CHECKING:
  from flax.nnx import GraphDef, State

# --- Modules in `microbatch` ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Graph:
  """The NNX objects among a call's arguments, split so that a scan can run them.

  NNX modules mutate their Variables, which a function traced inside
  `jax.lax.scan` may not do to objects made outside it. So the objects are
  split once, outside the scan, and every micro-batch gets fresh copies merged
  inside the scan's body: the Params are passed whole (they are what the
  gradient is taken of, and the forward pass reads them only), while every
  other Variable (BatchNorm statistics, `nnx.Rngs` keys and counts, anything a
  forward pass may change) is carried from one micro-batch to the next.

  Attributes:
    where: the public call, for errors.
    names: the positions (int) and keywords (str) of the arguments that hold
      NNX objects. The Params of all of them (split together, so that shared
      Variables stay shared) take the place of the first; the others become None.
    objects: the caller's arguments at `names`, written back after the scan.
    graphdef: their structure.
    state: their Variables other than Params: the scan's carried state.
  """

  where: str
  names: tuple[int | str, ...]
  objects: tuple[object, ...]
  graphdef: GraphDef[tuple[object, ...]]
  state: State

  def merged(
    self, args: list[PyTree], kwargs: dict[str, PyTree], state: State
  ) -> tuple[list[PyTree], dict[str, PyTree], tuple[object, ...]]:
    """A micro-batch's arguments with fresh NNX objects at `names`; also returns the objects."""
    from flax import nnx

    params = _value(args, kwargs, self.names[0])
    objects = nnx.merge(self.graphdef, params, state, copy=True)
    args, kwargs = _arguments.replaced(tuple(args), kwargs, dict(zip(self.names, objects)))
    return args, kwargs, objects

  def state_of(self, objects: tuple[object, ...], before: State) -> State:
    """The carried state a micro-batch's call left in `objects`; `before` is what it started from.

    Values the forward pass writes to Params are not carried: the Params are
    the same for every micro-batch (and `nnx.jit` hands back new arrays for
    them whether or not they changed, so a write cannot be told apart).
    """
    from flax import nnx

    _, _, state = _split(nnx, objects)
    shapes = lambda tree: jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), tree)  # noqa: E731
    if jax.tree.structure(state) != jax.tree.structure(before) or shapes(state) != shapes(before):  # type: ignore[operator]  # PyTreeDef: no stubs
      raise ValueError(
        f"`{self.where}(fn=...)` changed what the NNX module arguments hold in its forward pass "
        "(a Variable added, removed or reshaped, e.g. by `sow`): the state carried from one "
        "micro-batch to the next must keep one structure. Return such values as aux instead."
      )
    return state

  def write_back(self, state: PyTree) -> None:
    """Leaves the caller's objects holding `state`, what the last micro-batch left."""
    from flax import nnx

    nnx.update(self.objects, state)


def _value(args: Sequence[PyTree], kwargs: dict[str, PyTree], name: int | str) -> PyTree:
  return args[name] if isinstance(name, int) else kwargs[name]


def split_graph(
  where: str, args: tuple[PyTree, ...], kwargs: dict[str, PyTree]
) -> tuple[tuple[PyTree, ...], dict[str, PyTree], Graph | None]:
  """The call's arguments with NNX objects replaced by their Params, and the `Graph`.

  Returns the arguments unchanged and None where no argument holds an NNX
  module (or other graph node), as always when Flax has not been imported.
  """
  nnx = sys.modules.get("flax.nnx")
  if nnx is None:
    return args, kwargs, None
  found = {name: value for name, value in _named(args, kwargs) if _holds_graph_node(nnx, value)}
  if not found:
    return args, kwargs, None
  names, objects = tuple(found), tuple(found.values())
  graphdef, params, state = _split(nnx, objects)
  values = {name: params if i == 0 else None for i, name in enumerate(names)}
  new_args, new_kwargs = _arguments.replaced(args, kwargs, values)
  return tuple(new_args), new_kwargs, Graph(where, names, objects, graphdef, state)


def _split(
  nnx: ModuleType, objects: tuple[object, ...]
) -> tuple[GraphDef[tuple[object, ...]], State, State]:
  """`objects` as a graphdef, their Params, and every other Variable."""
  return nnx.split(objects, nnx.Param, ...)


def _named(args: tuple[PyTree, ...], kwargs: dict[str, PyTree]) -> list[tuple[int | str, PyTree]]:
  return [*enumerate(args), *kwargs.items()]


def _holds_graph_node(nnx: ModuleType, value: PyTree) -> bool:
  is_node = nnx.graph.is_graph_node
  return any(is_node(leaf) for leaf in jax.tree.leaves(value, is_leaf=is_node))

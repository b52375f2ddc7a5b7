"""Flax NNX: modules as arguments of `microbatch`, and the fast path for `nnx.Optimizer`.

Flax is an optional dependency. An NNX object can exist only once `flax.nnx` has
been imported, so `microbatch` looks for one only then, and nothing here imports
Flax before it is handed an NNX object.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import jax

from optaccum import _arguments
from optaccum._accumulate import accumulation_of
from optaccum._apply import apply_gradients
from optaccum._flax import check_plain_step
from optaccum._state import holds_state

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
  objects: tuple[Any, ...]
  graphdef: Any
  state: Any

  def merged(self, args: list, kwargs: dict, state: Any) -> tuple[list, dict, Any]:
    """A micro-batch's arguments with fresh NNX objects at `names`; also returns the objects."""
    from flax import nnx

    params = _value(args, kwargs, self.names[0])
    objects = nnx.merge(self.graphdef, params, state, copy=True)
    args, kwargs = _arguments.replaced(tuple(args), kwargs, dict(zip(self.names, objects)))
    return args, kwargs, (params, objects)

  def state_of(self, merged: Any) -> Any:
    """The carried state that a micro-batch's call left in its objects (from `merged`)."""
    from flax import nnx

    params, objects = merged
    _, new_params, state = _split(nnx, objects)
    if not _same_leaves(params, new_params):
      raise ValueError(
        f"`{self.where}(fn=...)` changed an nnx.Param of an NNX module argument in its forward "
        "pass; the Params are the same for every micro-batch, so keep what the forward pass "
        "writes in a Variable of another type (as BatchNorm keeps nnx.BatchStat)."
      )
    return state

  def write_back(self, state: Any) -> None:
    """Leaves the caller's objects holding `state`, what the last micro-batch left."""
    from flax import nnx

    nnx.update(self.objects, state)


def _value(args: Any, kwargs: dict, name: int | str) -> Any:
  return args[name] if isinstance(name, int) else kwargs[name]


def _same_leaves(tree: Any, other: Any) -> bool:
  leaves, other_leaves = jax.tree.leaves(tree), jax.tree.leaves(other)
  return len(leaves) == len(other_leaves) and all(a is b for a, b in zip(leaves, other_leaves))


def split_graph(where: str, args: tuple, kwargs: dict) -> tuple[tuple, dict, Graph | None]:
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


def _split(nnx: Any, objects: Any) -> tuple[Any, Any, Any]:
  """`objects` as a graphdef, their Params, and every other Variable."""
  return nnx.split(objects, nnx.Param, ...)


def _named(args: tuple, kwargs: dict) -> list[tuple[int | str, Any]]:
  return [*enumerate(args), *kwargs.items()]


def _holds_graph_node(nnx: Any, value: Any) -> bool:
  is_node = nnx.graph.is_graph_node
  return any(is_node(leaf) for leaf in jax.tree.leaves(value, is_leaf=is_node))


# --- The fast path for nnx.Optimizer ----------------------------------------------------


def apply_nnx_gradients(
  optimizer: Any,
  model: Any,
  grads: Any,
  *,
  weight: Any = None,
  flush: Any = False,
  update_args: dict[str, Any] | None = None,
) -> None:
  """`optimizer.update(model, grads, weight=...)` on optaccum's fast path.

  Updates `optimizer`'s state and `model`'s parameters (those `optimizer.wrt`
  selects) in place, and advances `optimizer.step` by one micro-step, as
  `nnx.Optimizer.update` does. Where `optimizer.tx` is
  `optaccum.accumulate(...)` itself it runs `optaccum.apply_gradients`: a
  micro-step that does not close the window only adds `grads` into the
  accumulator and leaves the parameters untouched, where `update` would
  build a tree of zero updates and rewrite every parameter. Where `tx` is a
  chain that holds the accumulation it calls `optimizer.update`, with
  `weight` and `flush` passed to the accumulation. It works under `nnx.jit`.
  `optimizer.step` counts micro-steps; the optimizer steps are
  `optaccum.flax_gradient_step(optimizer)`.

  Args:
    optimizer: an `nnx.Optimizer`, usually one whose `tx` is or holds
      `optaccum.accumulate`.
    model: the model `optimizer` was made for.
    grads: the micro-batch's gradients, as `nnx.grad` returns them.
    weight: the micro-batch's weight, e.g. its count of valid tokens; None
      counts as 1.
    flush: close the window now, as in `accumulate`.
    update_args: further keyword arguments for the inner optimizer's update
      (e.g. `value=` for `optax.contrib.reduce_on_plateau`).

  Where `tx` holds no accumulation (switched off by configuration), it is
  `optimizer.update(model, grads)`: a training loop needs no branch.

  Raises:
    TypeError: if `optimizer` is not an `nnx.Optimizer`, `update_args` is not
      a dict, or `weight` or `flush` is given where `tx` holds no accumulation.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> from flax import nnx
    >>> import optaccum
    >>> model = nnx.Linear(1, 1, use_bias=False, rngs=nnx.Rngs(0))
    >>> model.kernel[...] = jnp.zeros((1, 1))
    >>> tx = optaccum.accumulate(optax.sgd(1.0), every_k=2)
    >>> optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    >>> grad_fn = nnx.grad(lambda model, y: jnp.mean((model(jnp.ones((1, 1))) - y) ** 2))
    >>> # Mean-loss gradients of a 3-token and a 1-token micro-batch: -2 and -10.
    >>> optaccum.apply_nnx_gradients(optimizer, model, grad_fn(model, 1.0), weight=3)
    >>> optaccum.apply_nnx_gradients(optimizer, model, grad_fn(model, 5.0), weight=1)
    >>> model.kernel[...]  # -lr * (3 * -2 + 1 * -10) / 4 tokens
    Array([[4.]], dtype=float32)
    >>> int(optimizer.step[...]), int(optaccum.flax_gradient_step(optimizer))
    (2, 1)
  """
  from flax import nnx

  _check_optimizer(nnx, optimizer, update_args)
  extra_args = dict(update_args or {})
  if not holds_state(nnx.as_pure(optimizer.opt_state)):
    # No accumulation (switched off by configuration): a plain optimizer step.
    check_plain_step("apply_nnx_gradients", weight, flush)
    optimizer.update(model, grads, **extra_args)
    return
  if accumulation_of(optimizer.tx) is None:  # a chain that holds the accumulation
    optimizer.update(model, grads, weight=weight, flush=flush, **extra_args)
    return
  graph = optimizer.graph
  params = nnx.as_pure(nnx.state(model, optimizer.wrt, graph=graph))
  grads = nnx.as_pure(nnx.state(grads, optimizer.wrt, graph=graph))
  opt_state = nnx.as_pure(optimizer.opt_state)
  params, opt_state = apply_gradients(
    optimizer.tx, grads, opt_state, params, weight=weight, flush=flush, **nnx.as_pure(extra_args)
  )
  nnx.update(model, params)
  nnx.update(optimizer.opt_state, nnx.state(opt_state, graph=graph))
  optimizer.step[...] += 1


def _check_optimizer(nnx: Any, optimizer: Any, update_args: Any) -> None:
  """Raises a TypeError, naming the argument, unless `apply_nnx_gradients` can take them."""
  if not isinstance(optimizer, nnx.Optimizer):
    raise TypeError(
      "`apply_nnx_gradients(optimizer=...)` must be an nnx.Optimizer, got "
      f"{type(optimizer).__name__}; for a linen TrainState use "
      "`optaccum.apply_train_state_gradients`."
    )
  if update_args is not None and not isinstance(update_args, dict):
    raise TypeError(
      "`apply_nnx_gradients(update_args=...)` must be a dict of keyword arguments or None, "
      f"got update_args={update_args!r}."
    )

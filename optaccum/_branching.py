"""Running a step only where a predicate holds, tracing it once, copying nothing it skips.

The strategies (benchmarks/RESULTS.md measures them):

* `"cond"` (the default): `lax.cond`; reverse-differentiable. Early XLA
  versions copied the buffers its untaken branch passes through (the whole
  optimizer state); on jax 0.10 its compiled temporaries equal the loop's, it
  runs within run-to-run noise of it on CPU and compiles about 15% faster.
* `"loop"`: a `lax.while_loop` of zero or one trips, which updates its carry in
  place. Not reverse-differentiable.
* `"select"`: compute the step every time and keep it with `jnp.where`, as
  `optax.MultiSteps` does; no control flow at all (what `vmap` turns the other
  two into).

Each traces the step's Python once: an optimizer over hundreds of leaves takes
seconds to trace. Under `shard_map` the loop needs the step's output types
before it can build its carry; it traces the step once (`trace_once`) and
replays the trace as its body.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import jax
import jax.extend as jex
import jax.numpy as jnp

from optaccum._sharding import vary_over, varying_axes
from optaccum._types import PyTree

STRATEGIES = ("loop", "cond", "select")

T = TypeVar("T")


class Traced(NamedTuple):
  """A function traced once: `fn` replays it; `avals` describe its output."""

  fn: Callable[..., Any]
  avals: list  # the output's abstract values, flat (they carry per-replica types)


def trace_once(fn: Callable[..., Any], *args: PyTree) -> Traced:
  """`fn` traced once at `args`, as a function that replays its jaxpr.

  The replay binds the recorded primitives again without running `fn`'s
  Python, so a conditional or loop built around it does not trace `fn` again.
  Values `fn` closes over are kept as the jaxpr's constants.
  """
  closed, shapes = jax.make_jaxpr(fn, return_shape=True)(*args)
  replay = jex.core.jaxpr_as_fun(closed)
  out_tree = jax.tree.structure(shapes)

  def replayed(*args: PyTree) -> Any:
    return jax.tree.unflatten(out_tree, replay(*jax.tree.leaves(args)))

  return Traced(replayed, list(closed.out_avals))


def run_if(strategy: str, predicate: jax.Array, step: Callable[[T], T], operand: T) -> T:
  """`step(operand)` where `predicate` is true, else `operand`, unchanged.

  `step` must return a tree of the same structure, shapes and dtypes. Its
  Python is traced once (under `shard_map`, once and replayed).
  """
  if strategy == "cond":
    return jax.lax.cond(predicate, step, lambda x: x, operand)
  if strategy == "select":
    # A select, not a multiply: whatever `step` computed where it should not
    # have run (NaN included) is dropped.
    return jax.tree.map(lambda new, old: jnp.where(predicate, new, old), step(operand), operand)
  if jax.sharding.get_abstract_mesh().manual_axes:
    step, operand = _join_per_replica_types(step, operand)

  def body(carry: tuple[jax.Array, T]) -> tuple[jax.Array, T]:
    again, value = carry
    # `again & False`, not a fresh False: it keeps the predicate's type.
    return again & jnp.zeros((), jnp.bool_), step(value)

  return jax.lax.while_loop(lambda carry: carry[0], body, (predicate, operand))[1]


def _join_per_replica_types(step: Callable[[T], T], operand: T) -> tuple[Callable[[T], T], T]:
  """`step` and `operand` with each leaf typed as varying over what its input or output varies over.

  Under `shard_map`, a loop's carry must keep one type, and a type includes
  the mesh axes a value varies over; `lax.cond` joins these itself, the loop
  needs the join spelled out, from the output types of one trace of `step`.
  """
  traced = trace_once(step, operand)
  leaves, treedef = jax.tree.flatten(operand)
  axes = [varying_axes(x) | varying_axes(a) for x, a in zip(leaves, traced.avals, strict=True)]

  def joined(tree: T) -> T:
    return treedef.unflatten(  # type: ignore[attr-defined]  # PyTreeDef: no stubs
      [vary_over(x, ax) for x, ax in zip(jax.tree.leaves(tree), axes, strict=True)]
    )

  # The trace can be replayed only on inputs of the types it was traced with:
  # where the join changed one, `step` is traced again on the joined types.
  same_inputs = all(varying_axes(x) == ax for x, ax in zip(leaves, axes))
  body = traced.fn if same_inputs else step
  return (lambda value: joined(body(value))), joined(operand)

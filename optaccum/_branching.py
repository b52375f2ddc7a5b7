"""Running a step only where a predicate holds, without copying what it skips.

`lax.cond` makes XLA copy every buffer that its untaken branch passes through,
and on a micro-step that buffer is the whole optimizer state. A
`lax.while_loop` that runs its body zero or one times updates its carry in
place instead, so a skipped step copies nothing. In the last CPU run the two
were close: in benchmarks/RESULTS.md, table (a) (~8M parameters), a
non-emitting micro-step of `apply_gradients` took 1.34x the bare `acc + g`
with the loop and 1.39x with `lax.cond` (2.40x and 2.59x for `accumulate`).
The strategies (see benchmarks/RESULTS.md for the measurements):

* `"loop"`: the in-place while loop; the default on every backend (see
  `DEFAULTS`). Not reverse-differentiable.
* `"cond"`: `lax.cond`; reverse-differentiable, copies pass-through buffers.
* `"select"`: compute the step every time and keep it with `jnp.where`, as
  `optax.MultiSteps` does; no control flow at all (what `vmap` turns the other
  two into).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import jax
import jax.numpy as jnp

from optaccum._sharding import vary_over, varying_axes

STRATEGIES = ("auto", "loop", "cond", "select")
LOOP_SCOPE = "optaccum_run_if"

T = TypeVar("T")


# What `"auto"` means on each backend (benchmarks/RESULTS.md, "Backends").
# CPU, measured: "loop" was ahead of "cond" for the fast path in every run
# (by 1-8% on the parameter-heavy LM), the two within noise for the
# transformation; "select" runs the optimizer on every micro-step and is up
# to 6x slower. GPU and TPU, not measured (no accelerator was available): on
# TPU both loops and conditionals run on the device; on GPU both need the
# predicate on the host, one sync per non-emitting micro-step (microseconds),
# which "select" avoids at the price of a whole optimizer pass on every
# micro-step (milliseconds for any model worth accumulating for). The
# in-place carry comes from XLA's HLO passes, common to all backends, so
# "loop" everywhere until measured otherwise.
DEFAULTS = {"cpu": "loop", "gpu": "loop", "tpu": "loop"}


def resolve(strategy: str) -> str:
  """The strategy to use for `strategy`: `"auto"` means the default backend's default."""
  if strategy != "auto":
    return strategy
  return DEFAULTS.get(jax.default_backend(), "loop")


def run_if(strategy: str, predicate: jax.Array, step: Callable[[T], T], operand: T) -> T:
  """`step(operand)` where `predicate` is true, else `operand`, unchanged.

  `step` must return a tree of the same structure, shapes and dtypes.
  """
  strategy = resolve(strategy)
  if strategy == "cond":
    return jax.lax.cond(predicate, step, lambda x: x, operand)
  if strategy == "select":
    # A select, not a multiply: whatever `step` computed where it should not
    # have run (NaN included) is dropped.
    return jax.tree.map(lambda new, old: jnp.where(predicate, new, old), step(operand), operand)

  # Under `shard_map`, a loop's carry must keep one type, and a type includes
  # the mesh axes a value varies over; `lax.cond` joins these itself, the loop
  # needs the join spelled out: each leaf varies over what its input or its
  # output varies over. Tracing `step` once more finds the output's axes.
  leaves, treedef = jax.tree.flatten(operand)
  out_avals = jax.make_jaxpr(step)(operand).out_avals
  axes = [varying_axes(x) | varying_axes(a) for x, a in zip(leaves, out_avals)]

  def joined(tree: T) -> T:
    return treedef.unflatten(  # type: ignore[attr-defined]  # PyTreeDef: no stubs
      [vary_over(x, ax) for x, ax in zip(jax.tree.leaves(tree), axes, strict=True)]
    )

  def body(carry: tuple[jax.Array, T]) -> tuple[jax.Array, T]:
    again, value = carry
    # `again & False`, not a fresh False: it keeps the predicate's type.
    return again & jnp.zeros((), jnp.bool_), joined(step(value))

  # The scope names the loop in the compiled program, where tools that count
  # what a step runs (tests/hlo.py) read it as a branch, not a loop.
  with jax.named_scope(LOOP_SCOPE):
    carry = (predicate, joined(operand))
    return jax.lax.while_loop(lambda carry: carry[0], body, carry)[1]

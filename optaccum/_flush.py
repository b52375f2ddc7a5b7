"""`flush`: applies a partial window now, through any chain that holds the accumulation."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from optaccum import _checks, _targets
from optaccum._state import AccumulateState, is_state, locate_state
from optaccum._types import OptState, Params, Updates

_IS_NONE = lambda x: x is None  # noqa: E731


def _check_flush(tx: object, opt_state: OptState, params: Params, acc_grads: Updates) -> None:
  """Checks `flush`'s arguments before anything is traced: `tx`, then `params`.

  `tx.init(params)` must build `opt_state`'s structure and accumulator shapes: that
  finds a `tx` that did not build it, and gives the shapes without guessing.
  """
  if not (callable(getattr(tx, "init", None)) and callable(getattr(tx, "update", None))):
    raise TypeError(
      "`flush(tx=...)` must be the optax GradientTransformation whose state is "
      f"opt_state (`optaccum.accumulate(...)` or a chain holding it), got tx={tx!r}."
    )
  checked = _checks.check_params("flush", params, acc_grads)
  built = jax.eval_shape(tx.init, params)  # type: ignore[attr-defined]  # checked callable above
  built_def, state_def = jax.tree.structure(built), jax.tree.structure(opt_state)
  if built_def != state_def:  # type: ignore[operator]  # PyTreeDef: no stubs
    raise ValueError(
      "`flush(tx=...)` is not the transformation whose state is opt_state: tx.init(params) "
      f"builds\n  {built_def}\nbut opt_state is\n  {state_def}"
    )
  leaves = jax.tree.leaves(built, is_leaf=is_state)
  (wanted,) = [leaf.acc_grads for leaf in leaves if isinstance(leaf, AccumulateState)]
  shapes = [None if w is None else w.shape for w in jax.tree.leaves(wanted, is_leaf=_IS_NONE)]
  _checks.check_param_shapes("flush", checked, shapes)


def flush(
  tx: optax.GradientTransformation,
  opt_state: OptState,
  params: Params,
  **extra_args: object,
) -> tuple[Any, Any]:
  """Applies a partial window now: emits the mean (or sum) of what it holds.

  Use it at the end of the data, or before an evaluation or a checkpoint, when
  the window holds fewer than k micro-batches. `tx` may be `accumulate(...)` or
  any chain that contains it: the call passes zero gradients of weight 0 through
  the whole of `tx` with `flush=True`, and the accumulation closes its window.
  The zeros are no micro-batch: transforms that run before the accumulation
  in the chain (those whose states come first in `opt_state`, such as a
  `scale_by_rms` that feeds it) keep their states as they were, and the
  transforms after it see the window's updates, as when a window closes. An
  empty window emits zeros and leaves the inner state untouched.

  Args:
    tx: the transformation whose state is `opt_state`.
    opt_state: the optimizer state, holding one `AccumulateState`.
    params: the current parameters; the zero gradients take their structure and
      dtypes.
    **extra_args: extra arguments for the inner optimizer.

  Returns:
    `(updates, opt_state)`, as from `tx.update`.

  Raises:
    ValueError: if `opt_state` holds no `AccumulateState` (or several): there is
      no window to close, and a plain optimizer would take a step.
    ValueError: if `params` does not match the accumulator's structure or shapes,
      or `tx.init(params)` builds a state of another structure than `opt_state`
      (`tx` is not the transformation that built it).
    TypeError: if `tx` is not a transformation, a leaf of `params` with an
      accumulator is not a floating-point array, or `extra_args` holds
      `weight` or `flush`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optaccum
    >>> tx = optaccum.accumulate(optax.sgd(1.0), k=4)
    >>> params = {"w": jnp.zeros(2)}
    >>> state = tx.init(params)
    >>> _, state = tx.update({"w": jnp.array([1.0, 2.0])}, state, params)
    >>> _, state = tx.update({"w": jnp.array([3.0, 6.0])}, state, params)
    >>> updates, state = optaccum.flush(tx, state, params)
    >>> updates["w"]  # -lr * mean of the two micro-batches seen
    Array([-2., -4.], dtype=float32)
  """
  taken = sorted({"weight", "flush"} & set(extra_args))
  if taken:
    raise TypeError(
      f"`flush(**extra_args)` may not hold {' or '.join(taken)}: flush passes "
      "weight=0 and flush=True to tx.update itself."
    )
  hint = " With no window to close, `tx.update` would take a plain optimizer step."
  leaves, treedef, position = locate_state("flush(opt_state=...)", opt_state, hint)
  _check_flush(tx, opt_state, params, leaves[position].acc_grads)
  zeros = _targets.gradient_zeros(params, leaves[position].acc_grads)
  updates, new_state = tx.update(
    zeros,
    opt_state,
    params,
    weight=jnp.zeros((), jnp.float32),
    flush=True,
    **extra_args,
  )
  new_leaves = jax.tree.leaves(new_state, is_leaf=is_state)
  # What precedes the accumulation saw only the zeros: keep it as it was.
  kept = leaves[:position] + new_leaves[position:]
  return updates, jax.tree.unflatten(treedef, kept)

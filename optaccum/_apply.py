"""The fast path: accumulate, and touch the parameters only when a window closes."""

from __future__ import annotations

from typing import Any

import optax

from optaccum._accumulate import accumulation_of
from optaccum._types import OptState, Params, Scalar, Updates


def apply_gradients(
  tx: optax.GradientTransformation,
  grads: Updates,
  opt_state: OptState,
  params: Params,
  *,
  weight: Scalar | None = None,
  flush: Scalar = False,
  **extra_args: object,
) -> tuple[Any, Any]:
  """One micro-step of `tx = optaccum.accumulate(...)`, applied to `params`.

  Equal to `updates, opt_state = tx.update(grads, opt_state, params, ...)`
  followed by `params = optax.apply_updates(params, updates)`, but cheaper: one
  conditional holds both the inner optimizer and the parameter write, so a
  micro-step that does not close the window only adds `grads` into the
  accumulator. No tree of zero updates is built and no parameter is rewritten;
  with donated buffers under `jax.jit` the parameters are not even copied.

  Args:
    tx: a transformation made by `optaccum.accumulate`. To clip or scale, put
      those transforms inside `accumulate`'s `inner`.
    grads: the micro-batch's gradients.
    opt_state: the `AccumulateState` of `tx`.
    params: the parameters.
    weight: the micro-batch's weight, as in `accumulate`.
    flush: close the window now, as in `accumulate`.
    **extra_args: extra arguments for the inner optimizer.

  Returns:
    `(params, opt_state)` after the micro-step.

  Raises:
    TypeError: if `tx` was not made by `optaccum.accumulate`, `params` is None,
      or a leaf of `params` with an accumulator is not a floating-point array.
    ValueError: if `params` differs from the accumulator in tree or shapes.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optaccum
    >>> tx = optaccum.accumulate(optax.sgd(1.0), k=2)
    >>> params = {"w": jnp.zeros(2)}
    >>> state = tx.init(params)
    >>> params, state = optaccum.apply_gradients(tx, {"w": jnp.ones(2)}, state, params)
    >>> params, state = optaccum.apply_gradients(tx, {"w": jnp.ones(2)}, state, params)
    >>> params["w"]
    Array([-1., -1.], dtype=float32)
  """
  accumulation = accumulation_of(tx)
  if accumulation is None:
    raise TypeError(
      "`apply_gradients(tx=...)` must be a transformation made by `optaccum.accumulate` "
      f"(put other transforms inside its `inner`), got tx={tx!r}."
    )
  return accumulation.apply(grads, opt_state, params, weight, flush, extra_args)

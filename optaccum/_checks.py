"""Parameters checked against a state's accumulator, before anything is traced.

`update`, the fast path, `flush` and the Flax helpers all check the parameters
they are given here, each naming its own call and argument.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optaccum import _validation
from optaccum._state import AccumulateState
from optaccum._types import Params, Updates

_IS_NONE = lambda x: x is None  # noqa: E731


def check_params(
  where: str, params: Params, acc_grads: Updates, name: str = "params"
) -> list[tuple[Any, Any, Any]]:
  """Checks `params` against the accumulator in opt_state, before anything is traced.

  `params` must be the tree of the accumulator (None, where a parameter has no
  gradient, counts as a leaf on both sides), and each leaf with an
  accumulator a floating-point array (complex where the accumulator is).
  Structure and dtypes only: no optimizer is traced. Returns `(path, param,
  accumulator)` for every leaf, for `check_param_shapes`.

  Raises:
    ValueError: naming `where(params=...)` and both trees where they differ.
    TypeError: where a leaf with an accumulator is not a floating-point array.
  """
  pairs = _validation.same_structure(where, name, params, acc_grads, "the accumulator in opt_state")
  hint = "Pass the parameters that opt_state was built for."
  for (path, param), acc in pairs:
    if acc is None:
      continue
    if not isinstance(param, (jax.Array, np.ndarray)):
      raise _validation.array_error(where, name, path, param, hint)
    if not jnp.issubdtype(param.dtype, jnp.inexact) or (
      jnp.iscomplexobj(param) and not jnp.iscomplexobj(acc)
    ):
      raise TypeError(
        f"`{where}({name}=...)` has dtype {param.dtype.name} at "
        f"{_validation.place(path)}, where the accumulator in opt_state is "
        f"{acc.dtype.name}. {hint}"
      )
  return [(path, param, acc) for (path, param), acc in pairs]


def check_param_shapes(
  where: str, checked: list[tuple[Any, Any, Any]], wanted: list[Any], name: str = "params"
) -> None:
  """Raises naming `where(params=...)` where an accumulator is not of the shape `wanted`.

  `wanted` holds, for each entry of `check_params`, the accumulator's shape
  (a tuple) as the parameter makes it (under mesh axes with a leading replica
  axis); None where there is no accumulator.
  """
  for (path, param, acc), want in zip(checked, wanted):
    if acc is not None and tuple(want) != tuple(jnp.shape(acc)):
      lead = len(want) > jnp.ndim(param)
      note = " (a leading axis of replicas, then the parameter's shape)" if lead else ""
      raise ValueError(
        f"`{where}({name}=...)` does not match the accumulator in opt_state at "
        f"{_validation.place(path)}: {name} has shape {jnp.shape(param)}, "
        f"the accumulator {jnp.shape(acc)}{note}."
      )


def check_inner_state(
  where: str, inner: optax.GradientTransformation, state: AccumulateState, params: Params
) -> None:
  """Raises naming `where` if `state.inner_opt_state` is not the inner optimizer's.

  `params` reach here only once `_add` has found them of the accumulator's
  tree and shapes, so a difference found here is the state's, not theirs.
  """
  like = state.acc_grads if params is None else params
  try:
    expected = jax.tree.structure(jax.eval_shape(inner.init, like))
  except Exception:
    return  # the parameters do not say what the inner state should be
  given = jax.tree.structure(state.inner_opt_state)
  if given != expected:  # type: ignore[operator]  # PyTreeDef: no stubs
    raise ValueError(
      f"`{where}(state=...)` holds an inner_opt_state that is not the state "
      f"of this accumulation's inner optimizer (another optimizer's?).\n"
      f"  state.inner_opt_state: {given}\n"
      f"  expected (the inner optimizer's init on params): {expected}"
    ) from None

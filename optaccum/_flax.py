"""Flax helpers: the gradient step of a train state, and the fast path for linen and NNX.

Flax is an optional dependency (`pip install "optaccum[flax]"`), so it is imported
only inside the functions that take Flax objects.
"""

from __future__ import annotations

import dataclasses
from types import ModuleType
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import optax

from optaccum import _overwrite, _validation
from optaccum._accumulate import accumulation_of
from optaccum._apply import apply_gradients
from optaccum._inspect import status
from optaccum._state import holds_state, is_state
from optaccum._types import OptState, Params, Scalar, Updates

if TYPE_CHECKING:
  from flax import nnx
  from flax.training.train_state import TrainState

# TrainState fields that apply_train_state_gradients computes rather than replaces.
_COMPUTED = ("step", "params", "opt_state")
_NNX = "apply_nnx_gradients"


def flax_gradient_step(state: TrainState | nnx.Optimizer) -> jax.Array:
  """The optimizer (gradient) step of a Flax `TrainState` or `nnx.Optimizer`.

  With `tx=optaccum.accumulate(...)`, Flax's own `step` counts calls to
  `apply_gradients` / `update`, that is micro-steps. This counts the windows
  emitted: the steps the inner optimizer took, and its schedules saw. Log
  against it, and compare it with a large-batch run's `step`.

  Args:
    state: a linen `flax.training.train_state.TrainState` or an `nnx.Optimizer`
      whose `tx` holds one `optaccum.accumulate` (chains included).

  Where `tx` holds no accumulation (switched off by configuration), every
  step is an optimizer step and this is the state's own `step`, so a training
  loop needs no branch.

  Returns:
    A scalar int32 array; it works under `jax.jit` and `nnx.jit` too.

  Raises:
    TypeError: if `state` has no `opt_state`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> from flax.training.train_state import TrainState
    >>> import optaccum
    >>> params = {"w": jnp.zeros(3)}
    >>> tx = optaccum.accumulate(optax.sgd(0.1), k=2)
    >>> state = TrainState.create(apply_fn=None, params=params, tx=tx)
    >>> for _ in range(5):
    ...   state = state.apply_gradients(grads={"w": jnp.ones(3)})
    >>> int(state.step), int(optaccum.flax.gradient_step(state))
    (5, 2)
  """
  if not hasattr(state, "opt_state"):
    raise TypeError(
      "`flax.gradient_step(state=...)` must be a flax TrainState or an nnx.Optimizer, "
      f"got an object of type {type(state).__name__} with no `opt_state`."
    )
  from flax import nnx

  # nnx.Optimizer wraps each state array in a Variable; as_pure reads the arrays
  # and leaves a linen TrainState's plain arrays as they are.
  opt_state = nnx.as_pure(state.opt_state)
  if not holds_state(opt_state):
    # No accumulation (switched off by configuration): every step is an optimizer step.
    return jnp.asarray(nnx.as_pure(state.step), jnp.int32)
  return jnp.asarray(status(opt_state).gradient_step, jnp.int32)


def apply_train_state_gradients(
  state: TrainState,
  *,
  grads: Updates,
  weight: Scalar | None = None,
  flush: Scalar = False,
  update_args: dict[str, Any] | None = None,
  **fields: object,
) -> TrainState:
  """`TrainState.apply_gradients` that passes `weight` (and `flush`) to the accumulation.

  Flax's `TrainState.apply_gradients(grads=..., **kwargs)` treats its keyword
  arguments as fields to replace, so it cannot hand a micro-batch's `weight` to
  `optaccum.accumulate`. This does the same step (`step + 1`, the parameters
  and optimizer state `tx.update` and `optax.apply_updates` would give, and
  the fields given as keywords replaced, as Flax does: `batch_stats=...`) and
  passes `weight`, `flush` and `update_args` to the accumulation. A keyword
  that names no field of the state is refused, so a misspelt `wieght=` fails
  instead of being ignored. Where `tx` is `optaccum.accumulate(...)` itself it
  runs the fast path, `optaccum.apply_gradients`: a micro-step that does not
  close the window only adds the gradients into the accumulator. `step` counts
  micro-steps; the optimizer steps are `optaccum.flax.gradient_step(state)`.

  Use it for token-weighted windows: pass the gradient of the micro-batch's
  mean loss and its number of valid tokens. Where `tx` holds no accumulation
  (switched off by configuration) it is Flax's plain step, so a training loop
  needs no branch; `weight` and `flush` are then refused.

  (For NNX, `optaccum.flax.apply_nnx_gradients(optimizer, model, grads, weight=...)`
  is the same step on the fast path; `nnx.Optimizer.update(model, grads,
  weight=...)` forwards keyword arguments too.)

  Args:
    state: a linen `TrainState` (or subclass) whose `tx` holds
      `optaccum.accumulate`.
    grads: gradients with the structure of `state.params`.
    weight: the micro-batch's weight, e.g. its count of valid tokens; None
      counts as 1.
    flush: close the window now, as in `accumulate`.
    update_args: further keyword arguments for the inner optimizer's update
      (e.g. `value=` for `optax.contrib.reduce_on_plateau`).
    **fields: fields of the state to replace, as in Flax's `apply_gradients`;
      not `step`, `params` or `opt_state`, which this step computes.

  Returns:
    The new `TrainState`, with `step` advanced by one micro-step.

  Raises:
    TypeError: if `state` is not a linen `TrainState`, a keyword names no
      field of it (or one this step computes), `weight` is not a real number,
      `flush` is not a scalar bool, or (where `tx` is the accumulation itself)
      `grads` holds a leaf that is not a floating-point array.
    ValueError: where `tx` is the accumulation itself, if `grads` does not
      match its accumulator (the structure, or a leaf's shape) or `weight`
      is neither a scalar nor, under mesh axes, one weight per replica.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> from flax.training.train_state import TrainState
    >>> import optaccum
    >>> tx = optaccum.accumulate(optax.sgd(1.0), k=2)
    >>> state = TrainState.create(apply_fn=None, params={"w": jnp.zeros(1)}, tx=tx)
    >>> # Mean-loss gradients of a 3-token and a 1-token micro-batch.
    >>> state = optaccum.flax.apply_train_state_gradients(
    ...     state, grads={"w": jnp.array([1.0])}, weight=3)
    >>> state = optaccum.flax.apply_train_state_gradients(
    ...     state, grads={"w": jnp.array([5.0])}, weight=1)
    >>> state.params["w"]  # -lr * (3 * 1 + 1 * 5) / 4 tokens
    Array([-2.], dtype=float32)
    >>> optaccum.flax.apply_train_state_gradients(state, grads=state.params, wieght=1)
    Traceback (most recent call last):
    TypeError: `apply_train_state_gradients(wieght=...)` names no field of TrainState ...
  """
  from flax.training.train_state import TrainState

  if not isinstance(state, TrainState):
    raise TypeError(
      "`apply_train_state_gradients(state=...)` must be a flax.training.train_state."
      f"TrainState, got {type(state).__name__}; for nnx.Optimizer pass weight= to "
      "`optaccum.flax.apply_nnx_gradients(optimizer, model, grads, weight=...)` (the fast path) "
      "or `optimizer.update(model, grads, weight=...)`."
    )
  _check_fields(state, fields)
  if update_args is not None and not isinstance(update_args, dict):
    raise TypeError(
      "`apply_train_state_gradients(update_args=...)` must be a dict of keyword "
      f"arguments or None, got {update_args!r}."
    )
  extra_args = dict(update_args or {})
  plain = not holds_state(state.opt_state)  # no accumulation (switched off by configuration)
  if plain:
    check_plain_step("apply_train_state_gradients", weight, flush)
    if not extra_args:  # the state's own step (a subclass's override included)
      return state.apply_gradients(grads=grads, **fields)
  # Flax's fp8 statistics: the optimizer sees `params` only, and the new values
  # replace the old on every micro-step, as in Flax's `apply_gradients`.
  grads, overwritten = _overwrite.split(grads)
  params = state.params if overwritten is None else state.params["params"]
  grads = grads if overwritten is None else grads["params"]
  if plain:  # Flax's step, with the optimizer's extra arguments
    updates, opt_state = state.tx.update(grads, state.opt_state, params, **extra_args)
    params = optax.apply_updates(params, updates)
  else:
    _check_micro_step(
      "apply_train_state_gradients", state.tx, state.opt_state, grads, weight, flush
    )
    params, opt_state = _accumulation_step(
      state.tx, grads, state.opt_state, params, weight, flush, extra_args
    )
  if overwritten is not None:
    params = _overwrite.join({"params": params}, overwritten)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state, **fields)


def _accumulation_step(
  tx: optax.GradientTransformation,
  grads: Updates,
  opt_state: OptState,
  params: Params,
  weight: Scalar | None,
  flush: Scalar,
  extra_args: dict[str, Any],
) -> tuple[Params, OptState]:
  """One micro-step of `tx`, which holds the accumulation: the new params and state."""
  if accumulation_of(tx) is not None:
    # `tx` is the accumulation itself: the fast path, which writes the
    # parameters only when a window closes.
    return apply_gradients(tx, grads, opt_state, params, weight=weight, flush=flush, **extra_args)
  # e.g. a chain that holds the accumulation
  updates, opt_state = tx.update(grads, opt_state, params, weight=weight, flush=flush, **extra_args)
  return optax.apply_updates(params, updates), opt_state


def _check_micro_step(
  where: str,
  tx: optax.GradientTransformation,
  opt_state: OptState,
  grads: Updates,
  weight: Scalar | None,
  flush: Scalar,
) -> None:
  """Raises, naming `where` and its `grads=`, `weight=` and `flush=`, where the accumulation would.

  The accumulation checks them too, but names its own call
  (`apply_gradients(updates=...)`, `accumulate(...).update`): checked here
  first, the message names the helper that was called. The gradients are
  checked on the fast path only (`tx` the accumulation itself); in a chain they
  reach the accumulation through the other transforms, which may reshape them.
  """
  accumulation = accumulation_of(tx)
  if weight is not None:
    if accumulation is None:
      _validation.check_real(where, "weight", weight)
    else:
      accumulation.replicas.weight(where, weight)
  _validation.as_flag(where, "flush", flush)
  if accumulation is None or not is_state(opt_state):
    return
  accumulation.replicas.check_updates(where, grads, "grads")
  _validation.check_tree_matches(
    where, "grads", grads, opt_state.acc_grads, "the accumulator built by tx.init(params)"
  )


def check_plain_step(where: str, weight: object, flush: object) -> None:
  """Raises a TypeError where `weight` or `flush` is given to a step that accumulates nothing."""
  for name, value, default in (("weight", weight, None), ("flush", flush, False)):
    if value is not default:
      raise TypeError(
        f"`{where}({name}=...)` needs an accumulation, but the optimizer holds no "
        f"`optaccum.accumulate`, got {name}={value!r}; a plain optimizer step takes neither."
      )


def _check_fields(state: TrainState, fields: dict[str, object]) -> None:
  """Raises a TypeError for a keyword that is not a replaceable field of `state`."""
  names = [field.name for field in dataclasses.fields(state)]
  for name in fields:
    if name in _COMPUTED:
      raise TypeError(
        f"`apply_train_state_gradients({name}=...)`: `{name}` is what this step "
        "computes; it cannot be replaced."
      )
    if name not in names:
      replaceable = [n for n in names if n not in _COMPUTED]
      raise TypeError(
        f"`apply_train_state_gradients({name}=...)` names no field of "
        f"{type(state).__name__} (fields: {', '.join(replaceable)}; weight, flush and "
        "update_args go to the accumulation)."
      )


def apply_nnx_gradients(
  optimizer: nnx.Optimizer,
  model: nnx.Module,
  grads: nnx.State,
  *,
  weight: Scalar | None = None,
  flush: Scalar = False,
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
  `optaccum.flax.gradient_step(optimizer)`.

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
    TypeError: if `optimizer` is not an `nnx.Optimizer`, `model` holds no NNX
      module, `grads` is not an `nnx.State` (or a module), `update_args` is
      not a dict, `weight` or `flush` is given where `tx` holds no
      accumulation, `weight` is not a real number, `flush` is not a scalar
      bool, or (where `tx` is the accumulation itself) `grads` holds a leaf
      that is not a floating-point array.
    ValueError: where `tx` is the accumulation itself, if `grads` or the
      parameters of `model` do not match its accumulator (the structure, or a
      leaf's shape) or `weight` is neither a scalar nor, under mesh axes,
      one weight per replica.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> from flax import nnx
    >>> import optaccum
    >>> model = nnx.Linear(1, 1, use_bias=False, rngs=nnx.Rngs(0))
    >>> model.kernel[...] = jnp.zeros((1, 1))
    >>> tx = optaccum.accumulate(optax.sgd(1.0), k=2)
    >>> optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    >>> grad_fn = nnx.grad(lambda model, y: jnp.mean((model(jnp.ones((1, 1))) - y) ** 2))
    >>> # Mean-loss gradients of a 3-token and a 1-token micro-batch: -2 and -10.
    >>> optaccum.flax.apply_nnx_gradients(optimizer, model, grad_fn(model, 1.0), weight=3)
    >>> optaccum.flax.apply_nnx_gradients(optimizer, model, grad_fn(model, 5.0), weight=1)
    >>> model.kernel[...]  # -lr * (3 * -2 + 1 * -10) / 4 tokens
    Array([[4.]], dtype=float32)
    >>> int(optimizer.step[...]), int(optaccum.flax.gradient_step(optimizer))
    (2, 1)
  """
  from flax import nnx

  _check_optimizer(nnx, optimizer, update_args)
  _check_nnx_arguments(nnx, model, grads)
  extra_args = dict(update_args or {})
  opt_state = nnx.as_pure(optimizer.opt_state)
  if not holds_state(opt_state):
    # No accumulation (switched off by configuration): a plain optimizer step.
    check_plain_step(_NNX, weight, flush)
    optimizer.update(model, grads, **extra_args)
    return
  graph = optimizer.graph
  grad_arrays = nnx.as_pure(nnx.state(grads, optimizer.wrt, graph=graph))
  _check_micro_step(_NNX, optimizer.tx, opt_state, grad_arrays, weight, flush)
  accumulation = accumulation_of(optimizer.tx)
  if accumulation is None:  # a chain that holds the accumulation
    optimizer.update(model, grads, weight=weight, flush=flush, **extra_args)
    return
  params = nnx.as_pure(nnx.state(model, optimizer.wrt, graph=graph))
  accumulation.check_params(_NNX, params, opt_state.acc_grads, "model")
  params, opt_state = apply_gradients(
    optimizer.tx,
    grad_arrays,
    opt_state,
    params,
    weight=weight,
    flush=flush,
    **nnx.as_pure(extra_args),
  )
  nnx.update(model, params)
  nnx.update(optimizer.opt_state, nnx.state(opt_state, graph=graph))
  optimizer.step[...] += 1


def _check_nnx_arguments(nnx: ModuleType, model: object, grads: object) -> None:
  """Raises a TypeError, naming the argument, unless `model` and `grads` hold NNX objects."""
  is_node = nnx.graph.is_graph_node
  holds_node = lambda value: any(  # noqa: E731
    is_node(leaf) for leaf in jax.tree.leaves(value, is_leaf=is_node)
  )
  if not holds_node(model):
    raise TypeError(
      f"`{_NNX}(model=...)` must be the NNX module that `optimizer` was made for, "
      f"got model={_short(model)}."
    )
  if not (isinstance(grads, nnx.State) or holds_node(grads)):
    raise TypeError(
      f"`{_NNX}(grads=...)` must be an nnx.State, as `nnx.grad` returns it, "
      f"got grads={_short(grads)}."
    )


def _short(value: object) -> str:
  """`value` for a message: its repr where short, else its type."""
  text = repr(value)
  return text if len(text) <= 80 else f"an object of type {type(value).__name__}"


def _check_optimizer(nnx: ModuleType, optimizer: object, update_args: object) -> None:
  """Raises a TypeError, naming the argument, unless `apply_nnx_gradients` can take them."""
  if not isinstance(optimizer, nnx.Optimizer):
    raise TypeError(
      "`apply_nnx_gradients(optimizer=...)` must be an nnx.Optimizer, got "
      f"{type(optimizer).__name__}; for a linen TrainState use "
      "`optaccum.flax.apply_train_state_gradients`."
    )
  if update_args is not None and not isinstance(update_args, dict):
    raise TypeError(
      "`apply_nnx_gradients(update_args=...)` must be a dict of keyword arguments or None, "
      f"got update_args={update_args!r}."
    )

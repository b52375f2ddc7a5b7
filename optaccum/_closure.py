"""Closure-style losses: a loss that captures its batch, turned into one that takes it."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from optaccum._types import Params, PyTree

_WHERE = "batch_as_argument"

#: What the loss function returns: the loss, or `(loss, aux)`.
Loss = TypeVar("Loss")


def batch_as_argument(
  make_loss_fn: Callable[..., Callable[[Params], Loss]],
) -> Callable[..., Loss]:
  """Turns `make_loss_fn(batch) -> loss_fn(params)` into `loss(params, batch)`.

  The Flax examples write a train step's loss as a closure over the batch,
  `def loss_fn(params): ...`, which `jax.value_and_grad` differentiates but
  `optaccum.microbatch` cannot split: the batch is not an argument. Wrap the
  closure's definition in a function of the batch, `make_loss_fn`, and pass
  that here; the result takes the batch as an argument, so one line changes:

      grad_fn = jax.value_and_grad(optaccum.batch_as_argument(make_loss_fn), has_aux=True)
      (loss, aux), grads = optaccum.microbatch(grad_fn, 4, has_aux=True)(params, batch)

  Every argument after the parameters, positional or keyword, is passed to
  `make_loss_fn`: `loss(params, batch, key)` calls `make_loss_fn(batch, key)(params)`,
  so a dropout key can be split per micro-batch with `microbatch(..., key_arg=2)`.

  Args:
    make_loss_fn: a function of the batch (and any further arguments) that
      returns the loss function of the parameters, `loss_fn(params)`, as the
      closure in the train step would be. It may return `(loss, aux)`.

  Returns:
    `loss(params, *args, **kwargs)`, equal to `make_loss_fn(*args, **kwargs)(params)`.

  Raises:
    TypeError: if `make_loss_fn` is not callable, or, when the result is
      called, if `make_loss_fn` does not return a callable.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optaccum
    >>> def make_loss_fn(batch):
    ...   def loss_fn(w):
    ...     return jnp.mean((batch["x"] @ w - batch["y"]) ** 2)
    ...   return loss_fn
    >>> w = jnp.ones(3)
    >>> batch = {"x": jnp.arange(24.0).reshape(8, 3), "y": jnp.arange(8.0)}
    >>> grad_fn = jax.value_and_grad(optaccum.batch_as_argument(make_loss_fn))
    >>> loss, grads = optaccum.microbatch(grad_fn, 4)(w, batch)
    >>> expected_loss, expected_grads = jax.value_and_grad(make_loss_fn(batch))(w)
    >>> bool(jnp.allclose(loss, expected_loss)), bool(jnp.allclose(grads, expected_grads))
    (True, True)
  """
  if not callable(make_loss_fn):
    raise TypeError(
      f"`{_WHERE}(make_loss_fn=...)` must be callable, a function of the batch that returns "
      f"`loss_fn(params)`, got make_loss_fn={make_loss_fn!r}."
    )

  def loss(params: Params, *args: PyTree, **kwargs: PyTree) -> Loss:
    loss_fn = make_loss_fn(*args, **kwargs)
    if not callable(loss_fn):
      raise TypeError(
        f"`{_WHERE}(make_loss_fn=...)` must return the loss function `loss_fn(params)`, "
        f"but make_loss_fn={make_loss_fn!r} returned {type(loss_fn).__name__}: {loss_fn!r}."
      )
    return loss_fn(params)

  return loss

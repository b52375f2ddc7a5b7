"""`per_replica`: a gradient function whose gradients come out per replica, not yet reduced."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import jax

from optaccum import _arguments, _replicas
from optaccum._types import PyTree

_WHERE = "per_replica"

#: What the gradient function returns (each leaf gains a replica axis).
Output = TypeVar("Output")


def per_replica(
  fn: Callable[..., Output],
  axis_name: str | Sequence[str] = "data",
  *,
  batch_argnums: int | Sequence[int] | None = None,
  batch_argnames: str | Sequence[str] = (),
  key_arg: int | str | None = None,
) -> Callable[..., Output]:
  """Wraps a gradient function so that its outputs come out per replica, not yet reduced.

  For plain `jax.jit` over a mesh: each batch `[B, ...]` is split into R
  contiguous blocks of `B / R` rows, one per replica (R is the product of the
  sizes of `axis_name` in the mesh in context), and `fn` runs on each block with
  `jax.vmap(..., spmd_axis_name=axis_name)`, with no communication over
  `axis_name`. Every output leaf (loss, aux, gradients) gains a leading axis of
  size R, sharded over `axis_name`: replica r's value for its rows alone (take
  `jnp.mean(loss)` for the batch's mean loss). On an Explicit mesh an argument
  passed whole (the parameters) that is sharded over `axis_name` (pure FSDP)
  is gathered first, so each replica's gradient is its own and full-size.
  Feed the gradients to
  `optaccum.accumulate(..., axis_name=axis_name)` or `apply_gradients` with it,
  which sums the replicas once per window. Call it with the mesh in context,
  `with jax.set_mesh(mesh):` (Auto or Explicit axes). Guide:
  [under plain jax.jit][under-plain-jaxjit-axis_name-and-optaccumparallelper_replica].

  Args:
    fn: a function like `jax.grad(loss)` or `jax.value_and_grad(loss)`; its
      first argument is the parameters.
    axis_name: the mesh axis (or a tuple of axes) over which the batch is
      split among replicas (default `"data"`).
    batch_argnums: positional arguments that are batches, split along axis 0;
      None (default) means every one after the first, except the key.
    batch_argnames: keyword arguments that are batches.
    key_arg: the position (int) or keyword (str) of a PRNG key argument, if
      any: replica r gets the key folded with r, so replicas draw different
      dropout masks.

  Returns:
    A function with `fn`'s signature whose every output leaf has a leading
    replica axis.

  Raises:
    TypeError: if `fn` is not callable, `axis_name` is no axis name or sequence
      of distinct names, or the batch arguments are named by a bad type.
    ValueError: at the call, if no mesh is in context, it lacks an axis of
      `axis_name` or its axes are not all Auto or all Explicit, a batch does not
      divide among the replicas.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optaccum
    >>> mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    >>> def loss(w, x):
    ...   return jnp.mean((x @ w) ** 2)
    >>> grad_fn = optaccum.parallel.per_replica(jax.grad(loss), axis_name="data")
    >>> tx = optaccum.accumulate(optax.sgd(0.1), 2, axis_name="data")
    >>> with jax.set_mesh(mesh):
    ...   w, x = jnp.ones(3), jnp.ones((4, 3))
    ...   state = tx.init(w)
    ...   grads = grad_fn(w, x)
    ...   updates, state = tx.update(grads, state, w)
    >>> grads.shape  # one replica on this machine
    (1, 3)
  """
  if not callable(fn):
    raise TypeError(f"`{_WHERE}(fn=...)` must be callable, got fn={fn!r}.")
  axes = _replicas.check_axes(_WHERE, axis_name)
  arguments = _arguments.check(_WHERE, batch_argnums, batch_argnames, key_arg)

  @_arguments.named_like(fn)
  def per_replica_fn(*args: PyTree, **kwargs: PyTree) -> Output:
    replicas = _replicas.count(_WHERE, axes)
    plan = _arguments.plan(_WHERE, arguments, args, kwargs)
    key = _arguments.key(_WHERE, plan, args, kwargs)
    args, kwargs = _replicas.gather_whole(args, kwargs, plan, axes)
    parts = _replicas.split_batches(_WHERE, _arguments.batches(plan, args, kwargs), axes, replicas)

    def local(parts: dict[int | str, PyTree], replica: jax.Array) -> Output:
      values = dict(parts)
      if plan.key_arg is not None and key is not None:  # both, or neither
        values[plan.key_arg] = jax.random.fold_in(key, replica)
      local_args, local_kwargs = _arguments.replaced(args, kwargs, values)
      return fn(*local_args, **local_kwargs)

    return _replicas.vmap(local, axes, in_axes=(0, 0))(parts, _replicas.indices(axes, replicas))

  return per_replica_fn

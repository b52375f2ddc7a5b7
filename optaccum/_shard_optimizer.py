"""`shard_optimizer`: an optimizer whose state lies sharded over the replicas (ZeRO-1)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import optax
from jax.sharding import PartitionSpec as P

from optaccum import _replicas, _validation
from optaccum._types import OptState, Params, Updates

_WHERE = "shard_optimizer"


def shard_optimizer(
  inner: optax.GradientTransformation, axis_name: str | Sequence[str] = "data"
) -> optax.GradientTransformationExtraArgs:
  """Wraps an optimizer so that its state lies sharded over the replicas' axes (ZeRO-1).

  `init` builds `inner`'s state and shards each array leaf over `axis_name` along
  its first dimension that the number of replicas R divides and that no axis
  shards yet (a leaf with none, such as a step count, stays as it is): each
  device holds 1/R of the moments. `update` runs `inner` on those shards and
  gathers its updates to the parameters' layout (on an Auto mesh: unsharded
  along the dimension `init` shards, the rest XLA's choice), so the caller
  applies them as usual. Call both with the mesh in context
  (`jax.set_mesh(mesh)`), eagerly or under `jax.jit`; on an Auto mesh call
  `init` eagerly, as `jax.jit` hides the layouts it reads there (each leaf
  is then sharded along its first dimension R divides). With parameters
  replicated over `axis_name`, inside `accumulate(..., axis_name=...)`, or
  after `microbatch(..., axis_name=...)`, a window costs one reduction of the
  gradient and one gather of the updates, both in its closing step. Guide:
  [ZeRO-1][optimizer-state-sharded-over-the-replicas-zero-1].

  Args:
    inner: any optax optimizer.
    axis_name: the mesh axis (or a tuple of axes) of the replicas (default
      `"data"`).

  Returns:
    An optax transformation with `inner`'s state, sharded, and its updates.

  Raises:
    TypeError: if `inner` is not an optax transformation, or `axis_name` is no
      axis name or sequence of distinct names.
    ValueError: at `init` or `update`, if no mesh is in context, it lacks an
      axis of `axis_name`, or its axes are not all Auto or all Explicit.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optaccum
    >>> mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    >>> tx = optaccum.parallel.shard_optimizer(optax.adam(1e-3), axis_name="data")
    >>> with jax.set_mesh(mesh):
    ...   state = tx.init({"w": jnp.zeros((4, 3))})
    >>> state[0].mu["w"].sharding.spec
    P('data', None)
  """
  if not isinstance(inner, optax.GradientTransformation):
    raise TypeError(
      f"`{_WHERE}(inner=...)` must be an optax GradientTransformation, got inner={inner!r}."
    )
  axes = _replicas.check_axes(_WHERE, axis_name)
  wrapped = optax.with_extra_args_support(inner)

  def init(params: Params) -> OptState:
    _validation.check_arrays(f"{_WHERE}(...).init", "params", params)
    replicas = _replicas.count(f"{_WHERE}(...).init", axes)
    return jax.tree.map(lambda x: _sharded(x, axes, replicas), wrapped.init(params))

  def update(
    updates: Updates, state: OptState, params: Params | None = None, **extra_args: object
  ) -> tuple[Updates, OptState]:
    replicas = _replicas.count(f"{_WHERE}(...).update", axes)
    updates, state = wrapped.update(updates, state, params, **extra_args)
    likes = params if params is not None else jax.tree.map(lambda _: None, updates)
    updates = jax.tree.map(
      lambda u, p: None if u is None else _gathered(u, p, axes, replicas),
      updates,
      likes,
      is_leaf=lambda x: x is None,
    )
    return updates, state

  return optax.GradientTransformationExtraArgs(init, update)


def _free_dim(x: jax.Array, axes: tuple[str, ...], replicas: int) -> int | None:
  """The dimension `init` shards `x` along: its first free one that `replicas` divides.

  None where `x` is a scalar, already uses an axis of `axes`, or has no such
  dimension.
  """
  spec = _replicas.spec_of(x) or (None,) * x.ndim
  if _replicas.named_axes(spec) & set(axes):
    return None
  free = [i for i, e in enumerate(spec) if e is None and x.shape[i] % replicas == 0]
  return free[0] if free else None


def _sharded(x: object, axes: tuple[str, ...], replicas: int) -> object:
  """`x` sharded over `axes` along its first free dimension that `replicas` divides."""
  if not isinstance(x, jax.Array) or x.ndim == 0:
    return x
  dim = _free_dim(x, axes, replicas)
  if dim is None:
    return x
  explicit = _replicas.explicit(axes)
  # Where an Auto mesh hides the leaf's layout (traced), its other dimensions
  # are left to XLA rather than pinned unsharded.
  unknown = None if explicit else P.UNCONSTRAINED
  spec = list(_replicas.spec_of(x) or (unknown,) * x.ndim)
  spec[dim] = axes[0] if len(axes) == 1 else axes
  if explicit:
    return jax.sharding.reshard(x, P(*spec))
  return jax.lax.with_sharding_constraint(x, P(*spec))  # eagerly too, with the mesh set


def _gathered(
  u: jax.Array, like: jax.Array | None, axes: tuple[str, ...], replicas: int
) -> jax.Array:
  """An update laid out like its parameter `like`, gathered from the state's shards.

  On an Explicit mesh the parameter's type says its layout. On an Auto mesh
  XLA would otherwise carry the state's sharding into the updates, and from
  there into the step's outputs, gathering on every micro-step: the dimension
  `init` shards is pinned unsharded, the others left to XLA, so the gather
  happens here, in the closing step. Under `jax.jit` the parameters' layout
  is not in their type there, so the dimension is the first one R divides:
  the one `init` picked unless the parameters are sharded along it over
  another axis, where the pin costs a gather of the update over that axis
  once per window, not a wrong result.
  """
  if _replicas.explicit(axes):
    if like is None or _replicas.spec_of(like) is None:
      # No typed parameter to follow (none given, or not on the mesh): gather
      # over the replicas, keeping any other axis.
      return _replicas.gathered_over(u, axes)  # type: ignore[return-value]
    return _replicas.placed_like(u, like)
  dim = _free_dim(like if like is not None else u, axes, replicas)
  if dim is None:
    return u
  spec = [None if i == dim else P.UNCONSTRAINED for i in range(u.ndim)]
  return jax.lax.with_sharding_constraint(u, P(*spec))

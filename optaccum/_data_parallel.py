"""Data-parallel training with per-replica accumulators, on `jax.shard_map`."""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Sequence
from typing import Any, TypeVar

import jax
from jax.sharding import PartitionSpec
from jax.tree_util import PyTreeDef

from optaccum import _validation
from optaccum._state import AccumulateState, is_state, per_replica_mask
from optaccum._types import PyTree

#: What the per-replica function returns.
Output = TypeVar("Output")


def _per_replica_mask(tree: PyTree) -> PyTree:
  """A tree of bools like `tree`: True at the leaves each replica holds its own of."""

  def mark(node: PyTree) -> PyTree:
    if isinstance(node, AccumulateState):
      return per_replica_mask(node)
    return jax.tree.map(lambda _: False, node)

  return jax.tree.map(mark, tree, is_leaf=is_state)


def _check_arguments(
  fn: object, mesh: object, axis_name: object, batch_argnums: object
) -> tuple[int, ...]:
  """Checks `data_parallel`'s arguments; returns `batch_argnums` as a tuple of ints."""
  if not callable(fn):
    raise TypeError(f"`data_parallel(fn=...)` must be callable, got fn={fn!r}.")
  if not isinstance(mesh, jax.sharding.Mesh):
    raise TypeError(f"`data_parallel(mesh=...)` must be a jax.sharding.Mesh, got mesh={mesh!r}.")
  if axis_name not in mesh.axis_names:
    raise ValueError(
      f"`data_parallel(axis_name=...)` must name an axis of the mesh, whose axes are "
      f"{mesh.axis_names}, got axis_name={axis_name!r}."
    )
  return _validation.as_argnums("data_parallel", "batch_argnums", batch_argnums)


def _check_call(args: tuple[PyTree, ...], batch_argnums: tuple[int, ...]) -> None:
  """Checks that the call passes every argument `batch_argnums` names."""
  for n in batch_argnums:
    if n >= len(args):
      raise ValueError(
        f"`data_parallel(batch_argnums=...)` names argument {n}, but the call has "
        f"{len(args)} positional arguments."
      )


def _check_batches(
  args: tuple[PyTree, ...], batch_argnums: tuple[int, ...], axis_name: Hashable, replicas: int
) -> None:
  """Checks that every leaf of every batch argument splits into equal parts among the replicas.

  Shapes are static, so this raises at the call (or its trace), naming the
  argument, where `shard_map` would refuse the specs without naming either.
  """
  for n in batch_argnums:
    for path, leaf in jax.tree_util.tree_leaves_with_path(args[n]):
      size = _validation.unsplittable(leaf, replicas)
      if size is None:
        continue
      found = (
        "a scalar, with no batch axis to split (pass it outside batch_argnums)"
        if size == "no batch axis"
        else f"{size} rows, which does not divide by {replicas}"
      )
      raise ValueError(
        f"`data_parallel(batch_argnums=...)` splits argument {n} along axis 0 among the "
        f"{replicas} replicas of mesh axis {axis_name!r}, but its leaf at "
        f"{_validation.place(path)} is {found}."
      )


def _names_in(spec: PartitionSpec) -> set[str]:
  return {n for e in spec for n in ((e,) if isinstance(e, str) else (e or ()))}


def _check_replicated(
  args: tuple[PyTree, ...], masks: list[PyTree | None], axis_name: Hashable
) -> None:
  """Raises where an argument `fn` shares across replicas is known to be sharded over `axis_name`.

  `shard_map` replicates it over `axis_name` (its in_specs), gathering the
  shards onto every replica. Sharding over the other mesh axes, which stay
  automatic, is kept (measured: FSDP over 'fsdp' of a 'data' x 'fsdp' mesh
  comes back sharded). Known: a concrete array's sharding, or a traced one's
  type on an Explicit mesh; on an Auto mesh under `jax.jit` it is not visible.
  """
  for n, (arg, mask) in enumerate(zip(args, masks)):
    if mask is None:
      continue
    for (path, leaf), own in zip(jax.tree_util.tree_leaves_with_path(arg), jax.tree.leaves(mask)):
      if own or not isinstance(leaf, jax.Array):
        continue
      sharding = (
        leaf.sharding if not isinstance(leaf, jax.core.Tracer) else jax.typeof(leaf).sharding
      )
      spec = getattr(sharding, "spec", None)
      if spec is not None and axis_name in _names_in(spec):
        raise ValueError(
          f"`data_parallel(axis_name={axis_name!r})` got argument {n} at "
          f"{_validation.place(path)} sharded as {spec}, over the replica "
          "axis; it replicates every argument but the batches and the accumulators over "
          "that axis, so these shards would be gathered onto every replica. For parameters "
          "sharded over the batch axis, use plain `jax.jit` with "
          "`optaccum.parallel.per_replica(grad_fn, axis_name=...)` and "
          "`optaccum.accumulate(..., axis_name=...)` (docs/distributed.md)."
        )


def _in_specs(masks: list[PyTree | None], axis_name: Hashable) -> tuple[PyTree, ...]:
  """`shard_map`'s in_specs: batches (mask None) and per-replica leaves split, others replicated."""
  replicas, replicated = PartitionSpec(axis_name), PartitionSpec()
  return tuple(
    replicas if mask is None else jax.tree.map(lambda own: replicas if own else replicated, mask)
    for mask in masks
  )


def _strip_replica_axis(args: tuple[PyTree, ...], masks: list[PyTree | None]) -> list[PyTree]:
  """The arguments as `fn` sees them: each per-replica leaf's `[1, ...]` slice without its axis."""
  return [
    a if mask is None else jax.tree.map(lambda x, own: x[0] if own else x, a, mask)
    for a, mask in zip(args, masks)
  ]


def _split_outputs(out: PyTree) -> tuple[PyTreeDef, list[bool], list[jax.Array], list[jax.Array]]:
  """`fn`'s output as its structure, per-replica mask, shared and per-replica leaves.

  Each per-replica leaf gets a leading axis of one, along which `shard_map`
  joins the replicas' leaves.
  """
  leaves, treedef = jax.tree.flatten(out)
  own = treedef.flatten_up_to(_per_replica_mask(out))  # type: ignore[attr-defined]  # PyTreeDef
  shared = [x for x, o in zip(leaves, own) if not o]
  per_replica = [x[None] for x, o in zip(leaves, own) if o]
  return treedef, own, shared, per_replica


def _local_fn(
  fn: Callable[..., PyTree], masks: list[PyTree | None], outputs: dict[str, Any]
) -> Callable[..., tuple[list[jax.Array], list[jax.Array]]]:
  """`fn` on one replica, as `shard_map` calls it, returning `(shared, per_replica)` leaves.

  The output's structure and mask are known only inside the trace, so they
  are left in `outputs`, for `_join_outputs`.
  """

  def local_fn(*args: PyTree) -> tuple[list[jax.Array], list[jax.Array]]:
    treedef, own, shared, per_replica = _split_outputs(fn(*_strip_replica_axis(args, masks)))
    outputs.update(treedef=treedef, own=own)
    return shared, per_replica

  return local_fn


def _join_outputs(
  treedef: PyTreeDef, own: list[bool], shared: list[jax.Array], per_replica: list[jax.Array]
) -> PyTree:
  """`fn`'s output tree, from its shared and per-replica leaves in flattened order."""
  shared_leaves, per_replica_leaves = iter(shared), iter(per_replica)
  leaves = [next(per_replica_leaves) if o else next(shared_leaves) for o in own]
  return treedef.unflatten(leaves)


def data_parallel(
  fn: Callable[..., Output],
  mesh: jax.sharding.Mesh,
  *,
  axis_name: Hashable,
  batch_argnums: int | Sequence[int],
) -> Callable[..., Output]:
  """Runs `fn` on every replica of `mesh`'s `axis_name`, each on its slice of the batch.

  The layout for `optaccum.accumulate(..., axis_name=...)` inside `shard_map`:
  `jax.shard_map` over `axis_name`, with the arguments in `batch_argnums` split
  along axis 0 across replicas and every other argument and output replicated,
  except the per-replica fields of each `AccumulateState` (the accumulator, the
  window's weight, the skip counters), which get a leading axis of one entry per
  replica, sharded over `axis_name`. `fn` is written for one replica and sees the
  shapes `tx.init` gives; wrap `tx.init` in it too. As under `jax.pmap`,
  gradients stay per replica (`check_vma=False`): every output but the
  accumulators must be equal across replicas (reduce a loss with
  `jax.lax.pmean`). Parameters and state must be replicated over `axis_name`;
  other mesh axes stay automatic. Guide:
  [cross-step accumulate][cross-step-accumulate-axis_namedata].

  Args:
    fn: the per-replica function; its arguments and outputs are pytrees of
      arrays.
    mesh: the device mesh.
    axis_name: the mesh axis that holds the replicas.
    batch_argnums: the positional arguments that are batches, split along
      axis 0 (pass `()` for `tx.init`).

  Returns:
    A function of the same arguments; wrap it in `jax.jit`.

  Raises:
    TypeError: if `fn` is not callable, `mesh` is not a `jax.sharding.Mesh`
      or `batch_argnums` is not a non-negative int or a sequence of them.
    ValueError: if `axis_name` is not an axis of `mesh`; and at the call, if
      `batch_argnums` names an argument the call does not pass, a leaf of a
      batch argument has no leading axis or one whose length does not divide
      by the number of replicas, or an argument shared across replicas is
      sharded over `axis_name`.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optaccum
    >>> from jax.sharding import AxisType
    >>> mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))
    >>> tx = optaccum.accumulate(optax.sgd(0.5), k=2, axis_name="data")
    >>> data_parallel = optaccum.parallel.data_parallel
    >>> init = jax.jit(data_parallel(tx.init, mesh, axis_name="data", batch_argnums=()))
    >>> def step(params, opt_state, x):
    ...   grads = jax.grad(lambda p: jnp.mean(x @ p))(params)  # local: no all-reduce
    ...   updates, opt_state = tx.update(grads, opt_state, params)
    ...   return optax.apply_updates(params, updates), opt_state
    >>> step = jax.jit(data_parallel(step, mesh, axis_name="data", batch_argnums=2))
    >>> params = jnp.ones(3)
    >>> opt_state = init(params)
    >>> opt_state.acc_grads.shape == (jax.device_count(), 3)  # one accumulator per replica
    True
    >>> for x in jnp.ones((2, 4, 3)):  # a window of two micro-steps
    ...   params, opt_state = step(params, opt_state, x)
    >>> params
    Array([0.5, 0.5, 0.5], dtype=float32)
  """
  batch_argnums = _check_arguments(fn, mesh, axis_name, batch_argnums)

  @functools.wraps(fn)
  def parallel_fn(*args: PyTree) -> Output:
    _check_call(args, batch_argnums)
    _check_batches(args, batch_argnums, axis_name, mesh.shape[axis_name])
    masks = [None if n in batch_argnums else _per_replica_mask(a) for n, a in enumerate(args)]
    _check_replicated(args, masks, axis_name)
    outputs: dict[str, Any] = {}
    shared, per_replica = jax.shard_map(
      _local_fn(fn, masks, outputs),
      mesh=mesh,
      in_specs=_in_specs(masks, axis_name),
      out_specs=(PartitionSpec(), PartitionSpec(axis_name)),
      axis_names=frozenset({axis_name}),
      # As under pmap: gradients stay per replica until the code reduces them.
      check_vma=False,
    )(*args)
    return _join_outputs(outputs["treedef"], outputs["own"], shared, per_replica)

  return parallel_fn

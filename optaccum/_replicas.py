"""Per-replica values under plain `jax.jit` on a mesh: a leading replica axis, summed once.

Under plain `jax.jit` over a mesh whose batch axis is sharded (`'data'`), the
gradient of a mean loss comes back summed over the batch, so XLA (GSPMD)
inserts an all-reduce of the gradients into every gradient computation. To
defer it, optaccum gives the computation an explicit replica axis: each batch
`[B, ...]` is reshaped to `[R, B / R, ...]`, its leading axis sharded over the
replica axes (`axis_name`, R the product of their sizes), and the gradient
function is `jax.vmap`-ed over it with `spmd_axis_name=axis_name`. Every
replica then computes the gradient of its own rows, a leaf `[R, ...]` sharded
over the replica axes: nothing to communicate. Summing that leading axis is the
one all-reduce, which optaccum does once per window.

This works on Auto meshes (sharding constraints) and Explicit ones (sharding in
types, `jax.sharding.reshard`) alike, with the model unchanged: the model sees
a batch of `B / R` rows and parameters as they are (an FSDP model still gathers
its weights, and its gradients are still reduce-scattered over the FSDP axes
per micro-batch; only the replica axes are deferred).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from optaccum import _arguments, _spans, _validation
from optaccum._sharding import vary
from optaccum._types import DTypeLike, PyTree, Scalar


def check_axes(where: str, value: object) -> tuple[str, ...]:
  """`axis_name=` as a tuple of mesh axis names; raises naming `where`."""
  axes = (value,) if isinstance(value, str) else value
  if (
    not isinstance(axes, Sequence)
    or not axes
    or not all(isinstance(a, str) and a for a in axes)
    or len(set(axes)) != len(axes)
  ):
    raise TypeError(
      f"`{where}(axis_name=...)` must be a mesh axis name or a non-empty sequence of "
      f"distinct names, such as 'data' or ('replica', 'data'), got axis_name={value!r}."
    )
  return tuple(axes)


def shown_axes(axes: tuple[Hashable, ...]) -> str:
  """`axes` as a message shows them: one name as the name, several as the tuple."""
  return repr(axes[0]) if len(axes) == 1 else repr(axes)


def _context_mesh(where: str, axes: tuple[str, ...]) -> Any:
  """The mesh set by `jax.set_mesh`, checked to hold `axes` of one axis type."""
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.shape:
    raise ValueError(
      f"`{where}(axis_name={shown_axes(axes)})` needs the mesh in context: call it under "
      "`with jax.set_mesh(mesh):` (inside and outside `jax.jit`)."
    )
  missing = [a for a in axes if a not in mesh.shape]
  if missing:
    raise ValueError(
      f"`{where}(axis_name={shown_axes(axes)})` names axes {missing} that the mesh in context "
      f"does not have; its axes are {tuple(mesh.axis_names)}."
    )
  types = {mesh.axis_types[mesh.axis_names.index(a)] for a in axes}
  if len(types) != 1:
    raise ValueError(
      f"`{where}(axis_name={shown_axes(axes)})` needs axes that are all Auto or all Explicit "
      f"(plain `jax.jit`) or all Manual (inside `shard_map`), got "
      f"{sorted(str(t) for t in types)}."
    )
  return mesh


def count(where: str, axes: tuple[str, ...]) -> int:
  """R, the number of replicas: the product of the sizes of `axes` in the mesh in context."""
  mesh = _context_mesh(where, axes)
  if mesh.axis_types[mesh.axis_names.index(axes[0])] == AxisType.Manual:
    raise ValueError(
      f"`{where}(axis_name={shown_axes(axes)})` runs under plain `jax.jit` with the mesh in "
      "context (Auto or Explicit axes), not inside `shard_map`, where those axes are "
      "Manual: call it outside the `shard_map`."
    )
  total = 1
  for a in axes:
    total *= mesh.shape[a]
  return total


def explicit(axes: tuple[str, ...]) -> bool:
  """Whether the mesh in context types its axes `axes` (Explicit), rather than XLA choosing."""
  mesh = jax.sharding.get_abstract_mesh()
  return mesh.axis_types[mesh.axis_names.index(axes[0])] == AxisType.Explicit


def named_axes(spec: tuple[Any, ...] | None) -> set[str]:
  """The mesh axes a PartitionSpec's entries name (none for an unknown spec)."""
  return {n for e in spec or () for n in ((e,) if isinstance(e, str) else e or ())}


def _entry(axes: tuple[str, ...]) -> Any:
  return axes[0] if len(axes) == 1 else axes


def _without(entry: str | tuple[str, ...] | None, axes: tuple[str, ...]) -> Any:
  """A PartitionSpec entry with `axes` taken out (None where nothing is left)."""
  names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
  kept = tuple(n for n in names if n not in axes)
  return None if not kept else kept[0] if len(kept) == 1 else kept


def spec_of(x: jax.Array | jax.ShapeDtypeStruct) -> tuple[Any, ...] | None:
  """`x`'s PartitionSpec entries, one per dimension, where they are known; else None."""
  sharding = getattr(x, "sharding", None)
  if isinstance(x, jax.core.Tracer) or not isinstance(sharding, NamedSharding):
    sharding = jax.typeof(x).sharding
    if not isinstance(sharding, NamedSharding) or not _explicit_spec(sharding):
      return None
  spec = tuple(sharding.spec)
  return spec + (None,) * (jnp.ndim(x) - len(spec))


def _explicit_spec(sharding: NamedSharding) -> bool:
  """Whether a traced value's sharding is its type (Explicit axes), not a placeholder."""
  return any(t == AxisType.Explicit for t in sharding.mesh.axis_types)


def _place(x: jax.Array, axes: tuple[str, ...], rest: tuple[Any, ...] | None) -> jax.Array:
  """`x` with its leading axis sharded over `axes`, the others as `rest` (None: XLA's choice)."""
  if explicit(axes):
    return jax.sharding.reshard(x, P(_entry(axes), *(rest or (None,) * (x.ndim - 1))))
  others = rest if rest is not None else (P.UNCONSTRAINED,) * (x.ndim - 1)
  return jax.lax.with_sharding_constraint(x, P(_entry(axes), *others))


def split(
  where: str, x: jax.Array, axes: tuple[str, ...], replicas: int, argument: str
) -> jax.Array:
  """A batch leaf `[B, ...]` as `[R, B / R, ...]`: replica r holds rows r B/R to (r+1) B/R.

  Contiguous blocks, as a batch sharded along its first axis lies on the devices.
  """
  size = _validation.unsplittable(x, replicas)
  if size is not None:
    raise ValueError(
      f"`{where}(axis_name={shown_axes(axes)})` splits every batch into {replicas} replicas, "
      f"but {argument} has {size}, which does not divide by {replicas}."
    )
  spec = spec_of(x)
  rest = None if spec is None else (_without(spec[0], axes), *spec[1:])
  shape = jnp.shape(x)
  local = jnp.reshape(x, (replicas, shape[0] // replicas, *shape[1:]))
  return _place(local, axes, rest)


def split_batches(
  where: str, batches: dict[int | str, Any], axes: tuple[str, ...], replicas: int
) -> dict[int | str, Any]:
  """Every leaf of every batch argument `split` among the replicas."""

  def split_argument(name: int | str, batch: PyTree) -> Any:
    label = f"argument {name!r}" if isinstance(name, str) else f"argument {name}"
    return jax.tree_util.tree_map_with_path(
      lambda path, x: split(where, x, axes, replicas, f"{label} at {_validation.place(path)}"),
      batch,
    )

  return {name: split_argument(name, batch) for name, batch in batches.items()}


def vmap(fn: Callable[..., Any], axes: tuple[str, ...], in_axes: PyTree) -> Callable[..., Any]:
  """`fn` mapped over the replica axis: every output leaf `[R, ...]`, sharded over `axes`."""
  mapped = jax.vmap(fn, in_axes=in_axes, spmd_axis_name=_entry(axes))

  def per_replica_fn(*args: PyTree) -> Any:
    out = mapped(*args)
    if not explicit(axes):
      # On an Auto mesh `spmd_axis_name` already shards the outputs' replica
      # axis; constraining the others too would let XLA pick other layouts
      # than the parameters' (measured: a bias sharded over 'fsdp').
      return out
    return jax.tree.map(lambda y: _place(y, axes, _rest_of(y, axes)), out)

  return per_replica_fn


def indices(axes: tuple[str, ...], replicas: int) -> jax.Array:
  """Each replica's index, `[R]` int32, sharded over `axes` (a `vmap` input like the batches)."""
  return _place(jnp.arange(replicas, dtype=jnp.int32), axes, ())


def _rest_of(y: jax.Array, axes: tuple[str, ...]) -> tuple[Any, ...] | None:
  spec = spec_of(y)
  return None if spec is None else tuple(_without(e, axes) for e in spec[1:])


def zeros(
  leaf: jax.Array | jax.ShapeDtypeStruct, axes: tuple[str, ...], replicas: int, dtype: DTypeLike
) -> jax.Array:
  """A per-replica accumulator for `leaf`: `[R, *leaf.shape]` zeros, sharded like `leaf`.

  The leading axis lies over `axes`, the others as `leaf`'s (without `axes`: a
  leaf sharded over a replica axis, as in pure FSDP, gets one full copy per
  replica).
  """
  spec = spec_of(leaf)
  rest = None if spec is None else tuple(_without(e, axes) for e in spec)
  return _place(jnp.zeros((replicas, *jnp.shape(leaf)), dtype), axes, rest)


def abstract(x: jax.Array) -> jax.ShapeDtypeStruct:
  """`x`'s shape and dtype, and its sharding where that is its type (Explicit axes)."""
  sharding = jax.typeof(x).sharding
  typed = isinstance(sharding, NamedSharding) and _explicit_spec(sharding)
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding if typed else None)


def typed_zeros(x: jax.Array) -> jax.Array:
  """Zeros with `x`'s shape and dtype, placed as `x` where its sharding is its type."""
  out = jnp.zeros(x.shape, x.dtype)
  sharding = x.sharding if isinstance(x, jax.ShapeDtypeStruct) else jax.typeof(x).sharding
  if isinstance(sharding, NamedSharding) and _explicit_spec(sharding):
    if any(e is not None for e in sharding.spec):
      out = jax.sharding.reshard(out, sharding.spec)
  return out


def placed_like(x: jax.Array, like: jax.Array) -> jax.Array:
  """`x` resharded to `like`'s layout where that is its type (Explicit axes), else as it is.

  On an Explicit mesh an optimizer whose state is sharded over the replicas
  (ZeRO-1) returns updates sharded like its state; written into the
  parameters (or a carry shaped like them) they are gathered to their layout.
  """
  target = jax.typeof(like).sharding
  if not (isinstance(target, NamedSharding) and _explicit_spec(target)):
    return x
  current = jax.typeof(x).sharding
  if isinstance(current, NamedSharding) and tuple(current.spec) == tuple(target.spec):
    return x
  return jax.sharding.reshard(x, target.spec)


def zeros_of_one(x: jax.Array) -> jax.Array:
  """Zeros shaped like one replica's slice of per-replica `x`, placed like it where typed."""
  spec = spec_of(x)
  out = jnp.zeros(jnp.shape(x)[1:], x.dtype)
  if spec is not None and _explicit_spec(jax.typeof(x).sharding):
    out = jax.sharding.reshard(out, P(*spec[1:]))
  return out


def gather_whole(
  args: tuple,
  kwargs: dict,
  plan: _arguments.Plan,
  axes: tuple[str, ...],
  dtype: DTypeLike | None = None,
) -> tuple[tuple, dict]:
  """The arguments passed whole (the parameters), with any sharding over `axes` gathered.

  Pure FSDP on an Explicit mesh (one axis splits both the batch and the
  parameters): each replica needs the whole parameters to compute its
  gradient, and a gradient taken against the gathered copy is the replica's
  own, not yet reduced, so the window reduces it once (a full-size gradient
  per device in the meantime; docs/distributed.md weighs the two options). On
  an Auto mesh XLA picks the layouts: left as they are. With `dtype`, the
  first argument's wider floating leaves are cast to it before they are
  gathered (`microbatch(gather_dtype=...)`), on an Auto mesh before XLA gathers
  them.
  """
  typed = explicit(axes)

  def gathered(leaf: object, cast: bool = False) -> object:
    if cast and isinstance(leaf, jax.Array) and _narrows(leaf, dtype):
      leaf = leaf.astype(dtype)
    return gathered_over(leaf, axes) if typed else leaf

  whole = {
    n: jax.tree.map(lambda leaf: gathered(leaf, cast=n == 0), v)
    for n, v in _arguments.whole(plan, args, kwargs).items()
  }
  new_args, new_kwargs = _arguments.replaced(args, kwargs, whole)
  return tuple(new_args), new_kwargs


def gathered_over(leaf: object, axes: tuple[str, ...]) -> object:
  """An Explicit-typed `leaf` with its sharding over `axes` gathered, its other axes kept."""
  spec = spec_of(leaf) if isinstance(leaf, jax.Array) else None
  if spec is None or not named_axes(spec) & set(axes):
    return leaf
  return jax.sharding.reshard(leaf, P(*(_without(e, axes) for e in spec)))


def _narrows(leaf: object, dtype: DTypeLike | None) -> bool:
  """Whether `leaf` is a floating array wider than the floating `dtype` (None: no cast)."""
  if dtype is None or not isinstance(leaf, jax.Array):
    return False
  if not jnp.issubdtype(leaf.dtype, jnp.floating):
    return False
  return jnp.finfo(leaf.dtype).bits > jnp.finfo(dtype).bits


def grads_like_before_gather(
  where: str, grads: PyTree, params: PyTree, dtype: DTypeLike | None
) -> PyTree:
  """`grads`' shapes, in the dtypes the parameters had before `gather_whole` cast them.

  A gradient taken against parameters cast to `dtype` comes in `dtype`; the
  split function returns it in the parameters' own dtype (float32 for float32
  parameters), summed in the accumulator's meanwhile.
  """
  if dtype is None:
    return grads
  shapes = lambda tree: jax.tree.map(jnp.shape, tree)  # noqa: E731
  same_tree = jax.tree.structure(grads) == jax.tree.structure(params)  # type: ignore[operator]
  if not same_tree or shapes(grads) != shapes(params):
    raise ValueError(
      f"`{where}(gather_dtype=...)` returns the gradients in the dtypes the parameters "
      "had before the cast, so `fn`'s gradients must be shaped like its first argument, "
      "the parameters (as `jax.grad`'s default argnums=0 gives them); got gradients "
      f"{jax.tree.structure(grads)} for parameters {jax.tree.structure(params)}."
    )
  return jax.tree.map(
    lambda g, p: jax.ShapeDtypeStruct(g.shape, p.dtype) if _narrows(p, dtype) else g,
    grads,
    params,
  )


def check_gather_at_call(
  where: str, dtype: DTypeLike | None, replicas: Replicas, args: tuple
) -> None:
  """Raises at the call unless `dtype` is None or the call gathers its first argument.

  That is: `axis_name` names axes of the mesh in context (plain `jax.jit`),
  and the parameters come as the first positional argument.
  """
  if dtype is None:
    return
  name = jnp.dtype(dtype).name
  if replicas.axes is None:
    _ = replicas.axis_name  # raises where the axis is bound nowhere (no mesh, no shard_map)
    raise ValueError(
      f"`{where}(gather_dtype=...)` casts the parameters before they are gathered over the "
      f"`axis_name` axes of the mesh in context, under plain `jax.jit`; this call runs "
      f"inside `shard_map` (or `pmap`), whose in_specs place the parameters, got "
      f"gather_dtype={name}."
    )
  if not args:
    raise ValueError(
      f"`{where}(gather_dtype=...)` casts the first positional argument, the parameters; "
      f"this call passes no positional argument, got gather_dtype={name}."
    )


def check_leading(
  where: str, name: str, tree: PyTree, axes: tuple[str, ...], replicas: int
) -> None:
  """Raises unless every array leaf of `tree` has a leading replica axis of size R."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    shape = jnp.shape(leaf)
    if not shape or shape[0] != replicas:
      raise ValueError(
        f"`{where}({name}=...)` must hold per-replica gradients under "
        f"axis_name={shown_axes(axes)} under plain `jax.jit`: every leaf with a leading axis of "
        f"{replicas} replicas, as `optaccum.parallel.per_replica(grad_fn, "
        f"axis_name={shown_axes(axes)})` returns them; the leaf at {_validation.place(path)} has "
        f"shape {shape}."
      )


def total(x: jax.Array) -> jax.Array:
  """The sum over the replica axis: the all-reduce over the replica axes.

  Half-precision sums (a bfloat16 accumulator, stochastically rounded per
  replica) are added in float32, not rounded once more to nearest.
  """
  wide = jnp.float32 if x.dtype in (jnp.bfloat16, jnp.float16) else None
  return jnp.sum(x, axis=0, dtype=wide)


S = TypeVar("S")
T = TypeVar("T")
_is_none = lambda x: x is None  # noqa: E731


@dataclasses.dataclass(frozen=True)
class Replicas:
  """How an accumulation's replicas are handled: one policy that every form uses.

  One keyword, `axis_name=`, names the replicas' axis; where the call runs
  decides how they are reduced:

  * no axis: one replica, nothing to reduce;
  * inside `jax.shard_map` or `pmap` (the axis is Manual or bound): each replica
    holds its own sums, which one `psum` over the axis reduces;
  * under plain `jax.jit` with a mesh in context whose axes of that name are
    Auto or Explicit: per-replica values carry a leading axis of R replicas,
    which one sum reduces.

  Attributes:
    name: the `axis_name` the user gave (a name or a tuple of names), or None.
    where: the call that took it, for error messages.
  """

  name: Hashable | None = None
  where: str = "accumulate"

  @classmethod
  def of(cls, where: str, axis_name: Hashable | None) -> Replicas:
    """The policy for a call's `axis_name=`; raises naming `where`."""
    if axis_name is not None and not isinstance(axis_name, Hashable):
      raise TypeError(f"`{where}(axis_name=...)` must be hashable, got axis_name={axis_name!r}.")
    if isinstance(axis_name, tuple) and (not axis_name or len(set(axis_name)) != len(axis_name)):
      # A reduction over no axes is the identity: each replica would step on its own.
      raise ValueError(
        f"`{where}(axis_name=...)` must name an axis or a non-empty tuple of distinct axes, "
        f"got axis_name={axis_name!r}."
      )
    return cls(axis_name, where)

  @property
  def axes(self) -> tuple[str, ...] | None:
    """The mesh axes, where the call runs under plain `jax.jit` over a mesh holding them."""
    if self.name is None:
      return None
    names = self.name if isinstance(self.name, tuple) else (self.name,)
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.shape or not all(isinstance(n, str) and n in mesh.shape for n in names):
      return None  # a pmap axis, or no mesh: the named-axis mode
    types = {mesh.axis_types[mesh.axis_names.index(n)] for n in names}
    if types == {AxisType.Manual}:
      return None  # inside shard_map
    _context_mesh(self.where, names)  # raises where the axes mix Manual with others
    return names

  @property
  def axis_name(self) -> Hashable | None:
    """The mapped axis, inside `shard_map` or `pmap` (the named-axis mode).

    Raises:
      ValueError: where the axis is neither bound here (inside `shard_map` or
        `pmap`) nor an axis of the mesh in context.
    """
    if self.name is None or self.axes is not None:
      return None
    names = self.name if isinstance(self.name, tuple) else (self.name,)
    for name in names:
      try:
        jax.lax.axis_size(name)
      except NameError:
        raise ValueError(
          f"`{self.where}(axis_name={shown_axes(names)})`: no axis {name!r} here. Call it inside "
          "`jax.shard_map` (or `pmap`, `optaccum.parallel.data_parallel`) over that axis, "
          "or under plain `jax.jit` with `jax.set_mesh(mesh)` of a mesh that has it."
        ) from None
    return self.name

  @property
  def alone(self) -> bool:
    """Whether there is a single replica (no reduction at all)."""
    return self.name is None

  @property
  def decide_apart(self) -> bool:
    """Whether each replica decides alone what its micro-batch does (a named axis).

    Under a named axis each replica runs the skip policy on its own gradient,
    so a skipped micro-batch still counts towards the window length: the
    replicas must close their windows together. Under mesh axes one program
    decides for all replicas at once.
    """
    return self.name is not None and self.axes is None

  def count(self, where: str) -> int:
    """R under mesh axes (from the mesh in context); 1 otherwise."""
    return 1 if self.axes is None else count(where, self.axes)

  def reduce(self, per_replica: T, summed: S) -> tuple[T, S]:
    """The one cross-replica reduction of a window: every form's sums go through here.

    Args:
      per_replica: each replica's own sums (under mesh axes with a leading
        replica axis).
      summed: sums that mesh axes already hold for all replicas (the weights and
        statistics `accumulate` sums as they come) but a named axis holds per
        replica.

    Returns:
      Both, summed over the replicas.
    """
    with jax.named_scope(_spans.REDUCE):
      if self.axis_name is not None:
        return jax.lax.psum((per_replica, summed), self.axis_name)
      if self.axes is not None:
        return jax.tree.map(total, per_replica), summed
    return per_replica, summed

  def largest(self, tree: T) -> T:
    """The largest value across replicas (Flax's fp8 statistics; mesh axes: a leading axis)."""
    if self.axis_name is not None:
      return jax.lax.pmax(tree, self.axis_name)
    if self.axes is not None:
      return jax.tree.map(lambda x: jnp.max(x, axis=0), tree)
    return tree

  def fold_key(self, key: jax.Array, replica: jax.Array | None = None) -> jax.Array:
    """`key` made each replica's own: folded with its index (under mesh axes, `replica`)."""
    if self.axis_name is not None:
      key = jax.random.fold_in(key, jax.lax.axis_index(self.axis_name))
    if replica is not None:
      key = jax.random.fold_in(key, replica)
    return key

  def zeros(
    self, where: str, leaf: jax.Array | jax.ShapeDtypeStruct, dtype: DTypeLike
  ) -> jax.Array:
    """An empty accumulator for `leaf`, placed where `leaf` lies (one per replica on a mesh)."""
    if self.axes is not None:
      return zeros(leaf, self.axes, count(where, self.axes), dtype)
    # zeros_like, not zeros(shape): it keeps the leaf's sharding (and, under
    # shard_map, its per-replica type), so the sum lies where the leaf does.
    return jnp.zeros_like(leaf, dtype)  # type: ignore[arg-type]  # a ShapeDtypeStruct works

  @property
  def leading_axis(self) -> bool:
    """Whether per-replica values carry a leading replica axis (mesh axes)."""
    return self.axes is not None

  def weight(self, where: str, weight: Scalar) -> jax.Array:
    """`weight=` as float32: a scalar, or under mesh axes also one per replica, `[R]`."""
    if self.axes is None or jnp.ndim(weight) == 0:
      return _validation.as_scalar(where, "weight", weight, jnp.float32)
    replicas = count(where, self.axes)
    if jnp.shape(weight) != (replicas,):
      raise ValueError(
        f"`{where}(weight=...)` must be a scalar or, under axis_name={shown_axes(self.axes)}, "
        f"one weight per replica of shape ({replicas},), got shape {jnp.shape(weight)}."
      )
    _validation.check_real(where, "weight", weight)
    return jnp.asarray(weight).astype(jnp.float32)

  def spread(self, where: str, weight: jax.Array) -> jax.Array:
    """A micro-batch's weight as every replica's: `[R]` under mesh axes, else as it is."""
    if self.axes is None:
      return weight
    return jnp.broadcast_to(weight, (count(where, self.axes),))

  def zeros_of_updates(self, updates: PyTree, params: PyTree = None) -> PyTree:
    """Zeros shaped like the updates of one replica, laid out like `params` where given.

    The emitted updates' buffer: under mesh axes with parameters sharded over
    them (pure FSDP on an Explicit mesh) it lies like the parameters, so the
    inner optimizer's updates are written where `apply_updates` reads them.
    """

    def zeros(u: jax.Array | None, p: jax.Array | None = None) -> jax.Array | None:
      if u is None or self.axes is None:
        return None if u is None else typed_zeros(u)
      return zeros_of_one(u) if p is None else placed_like(zeros_of_one(u), p)

    if params is None:
      return jax.tree.map(zeros, updates, is_leaf=_is_none)
    return jax.tree.map(zeros, updates, params, is_leaf=_is_none)

  def vary(self, tree: T) -> T:
    """`tree` typed as varying over a named axis (under `shard_map`), else as it is."""
    return tree if self.axis_name is None else vary(tree, self.axis_name)

  def check_updates(self, where: str, updates: PyTree, name: str = "updates") -> None:
    """Raises where mesh axes expect per-replica gradients and `updates` are not."""
    if self.axes is not None:
      check_leading(where, name, updates, self.axes, count(where, self.axes))

  def counts(self, accepted: jax.Array) -> jax.Array:
    """Whether a micro-step counts towards the window's length.

    Under a named axis every micro-step counts, skipped or not, so that all
    replicas close their windows together; otherwise a skipped micro-batch is
    as if it never happened.
    """
    return jnp.ones((), jnp.bool_) if self.decide_apart else accepted

  def next_key(self, skip: jax.Array | None, old: jax.Array, new: jax.Array) -> jax.Array:
    """The rounding key after a micro-step: a skipped micro-batch draws no bits.

    Under a named axis the key is shared and advances on every replica.
    """
    return new if skip is None or self.decide_apart else jnp.where(skip, old, new)

  def accumulator_shape(self, acc: jax.Array, param_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape `acc` must have for a parameter of `param_shape` (mesh axes: R first)."""
    return (jnp.shape(acc)[:1] if self.leading_axis else ()) + tuple(param_shape)

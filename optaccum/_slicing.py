"""`microbatch`'s arguments, and the slicing of one call into k micro-batch calls."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from optaccum import (
  _accumulator,
  _arguments,
  _aux,
  _nnx,
  _overwrite,
  _replicas,
  _spans,
  _validation,
)
from optaccum._types import DTypeLike, PyTree, Scalar

WHERE = "microbatch"


# --- Arguments --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Settings:
  """`microbatch`'s arguments, checked: what every call of the split function reads."""

  fn: Callable[..., Any]
  k: int
  has_aux: bool
  arguments: _arguments.Arguments
  reduction: str
  weight_fn: Callable[..., Any] | None
  accumulator: _accumulator.Accumulator
  aux_reduction: PyTree
  replicas: _replicas.Replicas
  num_real: jax.Array | int | None = None
  # Per-example mode: each example's gradients go through `per_example`, which
  # also returns its metrics; they come back as the aux output (`has_aux`).
  per_example: Callable[[PyTree], tuple[PyTree, PyTree]] | None = None
  # Pure FSDP with the reduction deferred: the parameters cast to this before
  # they are gathered (None: gathered as they are).
  gather_dtype: DTypeLike | None = None


def check_gather_dtype(
  gather_dtype: object, axis_name: object, arguments: _arguments.Arguments
) -> DTypeLike | None:
  """`gather_dtype=`: None, or a floating dtype narrower than float64 where `axis_name` is set.

  It casts the first positional argument (the parameters), which must then be
  passed whole, not split as a batch (the key is never argument 0).
  """
  if gather_dtype is None:
    return None
  try:
    dtype = jnp.dtype(gather_dtype)  # type: ignore[call-overload]
  except TypeError:
    dtype = None
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating) or dtype.itemsize >= 8:
    shown = dtype.name if dtype is not None else _validation.shown(gather_dtype)
    raise TypeError(
      f"`{WHERE}(gather_dtype=...)` must be a floating dtype narrower than float64, such as "
      f"jnp.bfloat16 (the parameters' wider floating leaves are cast to it), got "
      f"gather_dtype={shown}."
    )
  if axis_name is None:
    raise ValueError(
      f"`{WHERE}(gather_dtype=...)` casts the parameters that it gathers over the "
      f"replicas' axes once per call, so it needs `axis_name=`, got gather_dtype="
      f"{dtype.name} and axis_name=None."
    )
  if 0 in (arguments.batch_argnums or ()):
    raise ValueError(
      f"`{WHERE}(gather_dtype=...)` casts the first positional argument, the parameters, "
      f"passed whole; got batch_argnums={arguments.batch_argnums!r}, which splits argument 0 "
      "as a batch."
    )
  return dtype


def check_num_real(num_real: object, k: int) -> jax.Array | int | None:
  """`num_real=`: None, an int in [0, k], or a scalar integer array (traced: clamped there)."""
  if num_real is None:
    return None
  bad = isinstance(num_real, bool) or not _validation.is_real_scalar(num_real)
  if bad or not jnp.issubdtype(jnp.result_type(num_real), jnp.integer):  # type: ignore[arg-type]
    raise TypeError(
      f"`{WHERE}(num_real=...)` must be an int or a scalar integer array, the number of "
      f"real micro-batches, got num_real={_validation.shown(num_real)}."
    )
  if not isinstance(num_real, jax.core.Tracer) and not 0 <= int(num_real) <= k:  # type: ignore[call-overload]
    raise ValueError(
      f"`{WHERE}(num_real=...)` must be between 0 and k={k}, got num_real={int(num_real)}."  # type: ignore[call-overload]
    )
  return num_real  # type: ignore[return-value]


def check_arguments(
  fn: object,
  k: int,
  *,
  has_aux: bool,
  batch_argnums: int | Sequence[int] | None,
  batch_argnames: str | Sequence[str],
  key_arg: int | str | None,
  reduction: str,
  weight_fn: Callable[..., Scalar] | None,
  accumulator: _accumulator.Accumulator | DTypeLike | None,
  aux_reduction: PyTree,
  axis_name: Hashable | None,
  num_real: object = None,
  per_example: Callable[[PyTree], tuple[PyTree, PyTree]] | None = None,
  gather_dtype: object = None,
) -> Settings:
  """`microbatch`'s arguments as `Settings`; raises, naming the argument, at the first bad one."""
  if not callable(fn):
    raise TypeError(f"`{WHERE}(fn=...)` must be callable, got fn={fn!r}.")
  _validation.check_positive_int(WHERE, "k", k)
  if not isinstance(has_aux, bool):
    raise TypeError(f"`{WHERE}(has_aux=...)` must be a bool, got has_aux={has_aux!r}.")
  arguments = _arguments.check(WHERE, batch_argnums, batch_argnames, key_arg)
  _validation.check_choice(WHERE, "reduction", reduction, _accumulator.REDUCTIONS)
  _validation.check_callable_or_none(WHERE, "weight_fn", weight_fn)
  accumulator = _accumulator.as_accumulator(WHERE, accumulator, stochastic=False)
  _aux.check_reduction(aux_reduction)
  replicas = _replicas.Replicas.of(WHERE, axis_name)
  _validation.check_callable_or_none(WHERE, "per_example", per_example)
  if per_example is not None:
    for name, value, default in (
      ("has_aux", has_aux, False),
      ("aux_reduction", aux_reduction, "mean"),
    ):
      if value != default:
        raise ValueError(
          f"`{WHERE}(per_example=...)` returns each example's metrics as the aux output, "
          f"in batch order, so it takes neither an aux output of `fn` nor an aux reduction, "
          f"got {name}={value!r}."
        )
    has_aux, aux_reduction = True, "concat"
  return Settings(
    fn=fn,
    k=int(k),
    has_aux=has_aux,
    arguments=arguments,
    reduction=reduction,
    weight_fn=weight_fn,
    accumulator=accumulator,
    aux_reduction=aux_reduction,
    replicas=replicas,
    num_real=check_num_real(num_real, int(k)),
    per_example=per_example,
    gather_dtype=check_gather_dtype(gather_dtype, axis_name, arguments),
  )


# --- Slicing one call into micro-batch calls --------------------------------------------


class Cut(NamedTuple):
  """How a call's rows are cut: `parts` equal micro-batches, then a shorter `tail`.

  `rows` is the equal micro-batches' rows (None where every leaf divides by k
  as it is: each is split into k parts, whatever its rows); `tail` the last
  micro-batch's rows, 0 where there is none.
  """

  parts: int
  rows: int | None
  tail: int


def cut_of(batches: dict[int | str, Any], k: int) -> Cut:
  """The cut of a call's batches: k equal micro-batches, or ceil(B / k) rows each and a tail.

  A batch of B rows that k does not divide gives micro-batches of
  `ceil(B / k)` rows and a last, shorter one; every batch leaf must then hold
  the same B rows.
  """
  leaves = [
    (f"{label(name)} at {_validation.place(path)}", x)
    for name, batch in batches.items()
    for path, x in jax.tree_util.tree_flatten_with_path(batch)[0]
  ]
  if all(_validation.unsplittable(x, k) is None for _, x in leaves):
    return Cut(k, None, 0)
  sizes: dict[int, str] = {}
  for where, x in leaves:
    if not jnp.shape(x):
      raise ValueError(
        f"`{WHERE}(k=...)` must split every batch leaf along its first axis: {where} "
        "has no batch axis; pass it whole (batch_argnums, batch_argnames)."
      )
    sizes.setdefault(jnp.shape(x)[0], where)
  if len(sizes) > 1:
    (first, one), (second, other) = list(sizes.items())[:2]
    raise ValueError(
      f"`{WHERE}(k={k})` cuts a batch whose rows k does not divide into micro-batches of "
      f"ceil(rows / k) rows and a shorter last one, which needs every batch leaf to hold "
      f"the same rows: {one} has {first}, {other} has {second}."
    )
  (total,) = sizes
  rows = -(-total // k)
  parts = total // rows
  return Cut(parts, rows, total - parts * rows)


def _split(tree: PyTree, cut: Cut) -> Any:
  """Each leaf `[B, ...]` as `[B / parts, parts, ...]`: micro-batch i is column i.

  Strided rows, so that a batch sharded along its first axis splits where it
  lies; where the cut has a tail, of the rows before it.
  """

  def split_leaf(x: jax.Array) -> jax.Array:
    shape = jnp.shape(x)
    if cut.rows is not None:
      x, shape = x[: cut.parts * cut.rows], (cut.parts * cut.rows, *shape[1:])
    return jnp.reshape(x, (shape[0] // cut.parts, cut.parts, *shape[1:]))

  return jax.tree.map(split_leaf, tree)


def label(name: int | str) -> str:
  return f"argument {name!r}" if isinstance(name, str) else f"argument {name}"


def check_not_empty(batches: dict[int | str, Any]) -> None:
  """Raises where a batch leaf has 0 rows: an empty batch has no mean loss or gradient.

  Refused whether or not the batch is split among replicas, so that one device
  and a mesh agree (a mean over no rows would be NaN; a split of 0 rows among
  replicas is not even a program).
  """
  for name, batch in batches.items():
    for path, x in jax.tree_util.tree_flatten_with_path(batch)[0]:
      shape = jnp.shape(x)
      if shape and shape[0] == 0:
        raise ValueError(
          f"`{WHERE}(...)` got a batch of 0 rows: {label(name)} at "
          f"{_validation.place(path)} has shape {shape}, and an empty "
          "batch has no micro-batch to take a loss or gradients of. Skip the call, or pass "
          "at least one row per micro-batch."
        )


def _split_batches(
  plan: _arguments.Plan, args: tuple, kwargs: dict, k: int
) -> tuple[dict[int | str, Any], dict[int | str, Any] | None, Cut]:
  """Each batch argument split by `_split`; the tail's rows, or None; and the cut."""
  batches = _arguments.batches(plan, args, kwargs)
  check_not_empty(batches)
  cut = cut_of(batches, k)
  split = {name: _split(batch, cut) for name, batch in batches.items()}
  if not cut.tail:
    return split, None, cut
  start = cut.parts * (cut.rows or 0)
  tail = {name: jax.tree.map(lambda x: x[start:], batch) for name, batch in batches.items()}
  return split, tail, cut


def _microbatch_keys(
  settings: Settings, plan: _arguments.Plan, args: tuple, kwargs: dict, replica: jax.Array | None
) -> Any:
  """The key argument split into one key per micro-batch, or None without one.

  Each replica (`replica`: its index under mesh axes) draws its own
  dropout masks.
  """
  key = _arguments.key(WHERE, plan, args, kwargs)
  if key is None:
    return None
  key = settings.replicas.fold_key(key, replica)
  return jax.random.split(key, settings.k)


def _vary_whole_arguments(
  plan: _arguments.Plan, args: tuple, kwargs: dict, replicas: _replicas.Replicas
) -> tuple[tuple, dict]:
  """The arguments passed whole to every micro-batch, marked as varying over a named axis.

  Under shard_map with check_vma, gradients with respect to a replicated
  argument come back summed across replicas: one all-reduce per micro-batch.
  Marked per replica, they stay local until the one psum.
  """
  args = tuple(replicas.vary(a) if plan.passes_whole(i) else a for i, a in enumerate(args))
  kwargs = {n: replicas.vary(v) if plan.passes_whole(n) else v for n, v in kwargs.items()}
  return args, kwargs


def _microbatch_arguments(
  plan: _arguments.Plan, args: tuple, kwargs: dict, values: dict, key: jax.Array | None
) -> tuple[list, dict]:
  """The arguments of one micro-batch: its rows of each batch (`values`), and its key."""
  if plan.key_arg is not None:
    values = {**values, plan.key_arg: key}
  return _arguments.replaced(args, kwargs, values)


def _column(batches: dict, index: jax.Array) -> dict:
  """Micro-batch `index` of split batches: column `index` of each leaf."""
  column = lambda x: jax.lax.dynamic_index_in_dim(x, index, axis=1, keepdims=False)  # noqa: E731
  return {name: jax.tree.map(column, batch) for name, batch in batches.items()}


def _unpack(out: object, has_aux: bool) -> tuple[Any, Any, Any]:
  """`(loss, aux, grads)` from what `fn` returned, checked against `has_aux`."""
  if not (isinstance(out, tuple) and len(out) == 2):
    raise TypeError(
      f"`{WHERE}(fn=...)` must return `(loss, grads)` as `jax.value_and_grad` does, "
      f"got {type(out).__name__}."
    )
  value, grads = out
  if not has_aux:
    if isinstance(value, tuple):
      raise TypeError(
        f"`{WHERE}(fn=...)` returned a tuple as its loss; pass has_aux=True if it is `(loss, aux)`."
      )
    return value, None, grads
  if not (isinstance(value, tuple) and len(value) == 2):
    raise TypeError(
      f"`{WHERE}(has_aux=True)` needs `fn` to return `((loss, aux), grads)`, got a "
      f"first output of type {type(value).__name__}."
    )
  loss, aux = value
  return loss, aux, grads


def _per_example(
  settings: Settings,
  plan: _arguments.Plan,
  args: tuple,
  kwargs: dict,
  values: dict,
  key: jax.Array | None,
) -> tuple[Any, Any, Any]:
  """One micro-batch in per-example mode: `(loss, metrics, grads)` over its examples.

  `fn` runs on each example as a batch of one row, under `jax.vmap`; each
  example's gradients go through `settings.per_example`. The loss and the
  transformed gradients are averaged (`"mean"`) or summed over the examples;
  the metrics keep one entry per example.
  """
  assert settings.per_example is not None
  transform = settings.per_example
  rows = jnp.shape(jax.tree.leaves(values)[0])[0]

  def one(example: dict, index: jax.Array) -> tuple[Any, Any, Any]:
    single = jax.tree.map(lambda x: x[None], example)
    own_key = None if key is None else jax.random.fold_in(key, index)
    example_args, example_kwargs = _microbatch_arguments(plan, args, kwargs, single, own_key)
    loss, _, grads = _unpack(settings.fn(*example_args, **example_kwargs), False)
    out = transform(grads)
    if not (isinstance(out, tuple) and len(out) == 2):
      raise TypeError(
        f"`{WHERE}(per_example=...)` must return `(grads, metrics)` for one example's "
        f"gradients, got {_validation.shown(out)}."
      )
    if jax.tree.structure(out[0]) != jax.tree.structure(grads):  # type: ignore[operator]
      raise ValueError(
        f"`{WHERE}(per_example=...)` must return gradients of the structure it was given, "
        f"got {jax.tree.structure(out[0])} for {jax.tree.structure(grads)}."
      )
    return loss, out[1], out[0]

  losses, metrics, grads = jax.vmap(one)(values, jnp.arange(rows))
  combine = functools.partial(jnp.mean if settings.reduction == "mean" else jnp.sum, axis=0)
  return combine(losses), metrics, jax.tree.map(combine, grads)


Call = Callable[[Any, Any, Any], tuple[tuple[Any, Any, Any], Any, Any]]
Tail = Callable[[Any, Any], tuple[tuple[Any, Any, Any], Any, Any]]


def _check_gradients(grads: PyTree, batch: PyTree, whole: PyTree) -> None:
  """Raises where `fn` returned a gradient that a sum over micro-batches cannot hold.

  A float0 gradient (`jax.grad(..., allow_int=True)` of an integer leaf) has
  no sum; a gradient shaped like a micro-batch's rows of a batch argument, and
  like no argument passed whole, is one with respect to that batch, whose rows
  are other examples in each micro-batch.
  """
  shapes = lambda tree: {x.shape for x in jax.tree.leaves(tree) if hasattr(x, "shape")}  # noqa: E731
  rows, kept = shapes(batch), shapes(whole)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    if getattr(g, "dtype", None) == jax.dtypes.float0:
      raise TypeError(
        f"`{WHERE}(fn=...)` returned a float0 gradient at {_validation.place(path)} (as "
        "`jax.grad(..., allow_int=True)` gives for an integer leaf), which cannot be summed "
        "over micro-batches; differentiate with respect to floating leaves only."
      )
    if getattr(g, "shape", None) in rows and g.shape not in kept:
      raise ValueError(
        f"`{WHERE}(fn=...)` returned a gradient at {_validation.place(path)} shaped like a "
        f"micro-batch's rows of a batch argument, {g.shape}: a gradient with respect to "
        "the batch, whose rows are other examples in each micro-batch, cannot be summed over "
        "them; differentiate with respect to the arguments passed whole (the parameters, "
        "`jax.value_and_grad(loss)`'s default argnums=0)."
      )


def microbatch_call(
  settings: Settings,
  args: tuple,
  kwargs: dict,
  replica: jax.Array | None,
  graph: _nnx.Graph | None,
) -> tuple[Call, Any, Tail | None, Cut]:
  """`call(index, key, state)`, which runs `fn` on micro-batch `index`; the keys; the tail.

  `call` returns `(loss, aux, grads)`, the weight and the NNX objects' state
  after it; `tail(key, state)` the same for the shorter last micro-batch,
  where the cut has one. Without `weight_fn`, micro-batches weigh their rows
  where the cut has a tail (so that the mean is the batch's), and 1 each
  under `num_real` (so that the mean is over the real ones).
  """
  plan = _arguments.plan(WHERE, settings.arguments, args, kwargs)
  if settings.per_example is not None and graph is not None:
    raise ValueError(
      f"`{WHERE}(per_example=...)` runs `fn` on one example at a time under `jax.vmap`, "
      f"which takes no NNX module; got one at argument {graph.names[0]!r}: pass "
      "`nnx.split(model)`'s state and merge it in `fn`."
    )
  batches, tail_rows, cut = _split_batches(plan, args, kwargs, settings.k)
  if settings.num_real is not None and cut.tail:
    raise ValueError(
      f"`{WHERE}(num_real=...)` counts micro-batches of equal rows, but the batch does not "
      f"split into k={settings.k} of them; pad it to a multiple of k."
    )
  keys = _microbatch_keys(settings, plan, args, kwargs, replica)
  args, kwargs = _vary_whole_arguments(plan, args, kwargs, settings.replicas)
  by_rows = cut.tail and settings.reduction == "mean"
  counted = settings.num_real is not None
  whole = list(_arguments.whole(plan, args, kwargs).values())

  def run(values: dict, key: jax.Array | None, state: PyTree, rows: int) -> Any:
    micro_args, micro_kwargs = _microbatch_arguments(plan, args, kwargs, values, key)
    if graph is not None:
      micro_args, micro_kwargs, objects = graph.merged(micro_args, micro_kwargs, state)
    with jax.named_scope(_spans.MICRO_BATCH):
      if settings.per_example is None:
        loss, aux, grads = _unpack(settings.fn(*micro_args, **micro_kwargs), settings.has_aux)
      else:
        loss, aux, grads = _per_example(settings, plan, args, kwargs, values, key)
    _check_gradients(grads, list(values.values()), (whole, state))
    grads, overwritten = _overwrite.split(grads)  # Flax's fp8 statistics: aux, taken largest
    aux = (aux, overwritten)
    weight = None
    if settings.weight_fn is not None:
      weight = _validation.as_scalar(
        WHERE, "weight_fn", settings.weight_fn(*micro_args, **micro_kwargs), jnp.float32
      )
    elif by_rows or counted:
      weight = jnp.float32(rows if by_rows else 1)
    if graph is not None:
      state = graph.state_of(objects, state)
    return (loss, aux, grads), weight, state

  def call(index: jax.Array, key: jax.Array | None, state: PyTree) -> Any:
    return run(_column(batches, index), key, state, cut.rows or 0)

  def tail(key: jax.Array | None, state: PyTree) -> Any:
    return run(tail_rows or {}, key, state, cut.tail)

  return call, keys, tail if cut.tail else None, cut

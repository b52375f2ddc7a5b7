"""`microbatch`'s arguments, and the slicing of one call into k micro-batch calls."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from optaccum import _accumulator, _arguments, _aux, _nnx, _replicas, _spans, _validation
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
  )


# --- Slicing one call into micro-batch calls --------------------------------------------


def _split(tree: PyTree, k: int, argument: str) -> Any:
  """Reshapes each leaf `[B, ...]` to `[B / k, k, ...]`: micro-batch i is column i.

  Strided rows, so that a batch sharded along its first axis splits where it lies.
  """

  def split_leaf(path: jax.tree_util.KeyPath, x: jax.Array) -> jax.Array:
    size = _validation.unsplittable(x, k)
    if size is not None:
      raise ValueError(
        f"`{WHERE}(k=...)` must divide the batch: {argument} at "
        f"{_validation.place(path)} has {size}, which does not split "
        f"into k={k} equal micro-batches."
      )
    shape = jnp.shape(x)
    return jnp.reshape(x, (shape[0] // k, k, *shape[1:]))

  return jax.tree_util.tree_map_with_path(split_leaf, tree)


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
) -> dict[int | str, Any]:
  """Each batch argument, by position or keyword, split by `_split`."""
  batches = _arguments.batches(plan, args, kwargs)
  check_not_empty(batches)
  return {name: _split(batch, k, label(name)) for name, batch in batches.items()}


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
  plan: _arguments.Plan,
  args: tuple,
  kwargs: dict,
  batches: dict,
  index: jax.Array,
  key: jax.Array | None,
) -> tuple[list, dict]:
  """The arguments of micro-batch `index`: column `index` of each batch, and its key."""
  column = lambda x: jax.lax.dynamic_index_in_dim(x, index, axis=1, keepdims=False)  # noqa: E731
  values = {name: jax.tree.map(column, batch) for name, batch in batches.items()}
  if plan.key_arg is not None:
    values[plan.key_arg] = key
  return _arguments.replaced(args, kwargs, values)


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


Call = Callable[[Any, Any, Any], tuple[tuple[Any, Any, Any], Any, Any]]


def microbatch_call(
  settings: Settings,
  args: tuple,
  kwargs: dict,
  replica: jax.Array | None,
  graph: _nnx.Graph | None,
) -> tuple[Call, Any]:
  """`call(index, key, state)`, which runs `fn` on micro-batch `index`, and the keys.

  `call` returns `(loss, aux, grads)`, the weight and the NNX objects' state after it.
  """
  plan = _arguments.plan(WHERE, settings.arguments, args, kwargs)
  batches = _split_batches(plan, args, kwargs, settings.k)
  keys = _microbatch_keys(settings, plan, args, kwargs, replica)
  args, kwargs = _vary_whole_arguments(plan, args, kwargs, settings.replicas)

  def call(
    index: jax.Array, key: jax.Array | None, state: PyTree
  ) -> tuple[tuple[Any, Any, Any], Any, Any]:
    micro_args, micro_kwargs = _microbatch_arguments(plan, args, kwargs, batches, index, key)
    if graph is not None:
      micro_args, micro_kwargs, objects = graph.merged(micro_args, micro_kwargs, state)
    with jax.named_scope(_spans.MICRO_BATCH):
      out = settings.fn(*micro_args, **micro_kwargs)
    loss, aux, grads = _unpack(out, settings.has_aux)
    weight = None
    if settings.weight_fn is not None:
      weight = _validation.as_scalar(
        WHERE, "weight_fn", settings.weight_fn(*micro_args, **micro_kwargs), jnp.float32
      )
    if graph is not None:
      state = graph.state_of(objects, state)
    return (loss, aux, grads), weight, state

  return call, keys

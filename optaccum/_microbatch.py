"""In-step micro-batching: one optimizer step over a batch, a slice at a time."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from optaccum import _validation
from optaccum._sharding import vary

_REDUCTIONS = ("mean", "sum")
_AUX_REDUCTIONS = ("mean", "sum", "stack", "concat")
_IS_SPEC = lambda x: isinstance(x, str) or callable(x)  # noqa: E731
_WHERE = "microbatch"


def _as_argnames(value: Any) -> tuple[str, ...]:
  names = (value,) if isinstance(value, str) else value
  if not isinstance(names, Sequence) or not all(isinstance(n, str) for n in names):
    raise TypeError(
      f"`{_WHERE}(batch_argnames=...)` must be a str or a sequence of str, "
      f"got batch_argnames={value!r}."
    )
  return tuple(names)


def _check_aux_reduction(value: Any) -> None:
  for spec in jax.tree.leaves(value, is_leaf=_IS_SPEC):
    if not (callable(spec) or spec in _AUX_REDUCTIONS):
      raise ValueError(
        f"`{_WHERE}(aux_reduction=...)` must be one of {', '.join(map(repr, _AUX_REDUCTIONS))}, "
        f"a callable, or a tree of them, got aux_reduction={value!r}."
      )


@dataclasses.dataclass(frozen=True)
class _Plan:
  """What one call does with each argument: which are split, which is the key."""

  batch_argnums: tuple[int, ...]
  batch_argnames: tuple[str, ...]
  key_arg: int | str | None


def _plan(
  args: tuple, kwargs: dict, batch_argnums: Any, batch_argnames: Any, key_arg: Any
) -> _Plan:
  """Resolves the defaults against the call's arguments and checks they exist."""
  if batch_argnums is None:
    batch_argnums = tuple(i for i in range(1, len(args)) if i != key_arg)
  for n in batch_argnums:
    if n >= len(args):
      raise ValueError(
        f"`{_WHERE}(batch_argnums=...)` names argument {n}, but the call has "
        f"{len(args)} positional arguments."
      )
  for name in batch_argnames:
    if name not in kwargs:
      raise ValueError(
        f"`{_WHERE}(batch_argnames=...)` names {name!r}, which the call does not pass; "
        f"it passes {sorted(kwargs)}."
      )
  if isinstance(key_arg, int) and key_arg >= len(args):
    raise ValueError(
      f"`{_WHERE}(key_arg=...)` names argument {key_arg}, but the call has "
      f"{len(args)} positional arguments."
    )
  if isinstance(key_arg, str) and key_arg not in kwargs:
    raise ValueError(
      f"`{_WHERE}(key_arg=...)` names {key_arg!r}, which the call does not pass; "
      f"it passes {sorted(kwargs)}."
    )
  return _Plan(batch_argnums, batch_argnames, key_arg)


def _split(tree: Any, num_microbatches: int, argument: str) -> Any:
  """Reshapes each leaf `[B, ...]` to `[B / k, k, ...]`: micro-batch i is column i.

  Micro-batch i holds rows i, i + k, i + 2k, ... rather than a contiguous block,
  so that a batch sharded along its first axis splits where it lies: every
  device keeps its own rows in every micro-batch and no data moves.
  """

  def split_leaf(path: Any, x: Any) -> jax.Array:
    shape = jnp.shape(x)
    if not shape or shape[0] % num_microbatches:
      size = "no batch axis" if not shape else f"a batch of {shape[0]}"
      raise ValueError(
        f"`{_WHERE}(num_microbatches=...)` must divide the batch: {argument} at "
        f"{jax.tree_util.keystr(path) or 'the root'} has {size}, which does not split "
        f"into num_microbatches={num_microbatches} equal micro-batches."
      )
    return jnp.reshape(x, (shape[0] // num_microbatches, num_microbatches, *shape[1:]))

  return jax.tree_util.tree_map_with_path(split_leaf, tree)


def _check_key(key: Any, key_arg: int | str) -> None:
  dtype = jnp.result_type(key)
  is_typed = jnp.issubdtype(dtype, jax.dtypes.prng_key) and jnp.shape(key) == ()
  is_raw = dtype == jnp.uint32 and jnp.shape(key) == (2,)
  if not (is_typed or is_raw):
    raise TypeError(
      f"`{_WHERE}(key_arg=...)` names argument {key_arg!r}, which must be a single PRNG key, "
      f"got {dtype} of shape {jnp.shape(key)}."
    )


def _aux_modes(aux: Any, aux_reduction: Any) -> list[Any]:
  """One reduction per aux leaf, from a single choice or a tree prefix of `aux`."""
  try:
    modes = jax.tree.map(
      lambda spec, sub: jax.tree.map(lambda _: spec, sub), aux_reduction, aux, is_leaf=_IS_SPEC
    )
  except ValueError as error:
    raise ValueError(
      f"`{_WHERE}(aux_reduction=...)` must be one choice or a tree prefix of the aux "
      f"output.\n  aux_reduction: {aux_reduction!r}\n  aux: {jax.tree.structure(aux)}"
    ) from error
  return jax.tree.structure(aux).flatten_up_to(modes)  # type: ignore[attr-defined]  # PyTreeDef


def _unpack(out: Any, has_aux: bool) -> tuple[Any, Any, Any]:
  """`(loss, aux, grads)` from what `fn` returned, checked against `has_aux`."""
  if not (isinstance(out, tuple) and len(out) == 2):
    raise TypeError(
      f"`{_WHERE}(fn=...)` must return `(loss, grads)` as `jax.value_and_grad` does, "
      f"got {type(out).__name__}."
    )
  value, grads = out
  if not has_aux:
    if isinstance(value, tuple):
      raise TypeError(
        f"`{_WHERE}(fn=...)` returned a tuple as its loss; pass has_aux=True if it "
        "is `(loss, aux)`."
      )
    return value, None, grads
  if not (isinstance(value, tuple) and len(value) == 2):
    raise TypeError(
      f"`{_WHERE}(has_aux=True)` needs `fn` to return `((loss, aux), grads)`, got a "
      f"first output of type {type(value).__name__}."
    )
  loss, aux = value
  return loss, aux, grads


def _combine_stacked(mode: Any, stack: jax.Array) -> Any:
  """An aux leaf from its `[k, ...]` stack of micro-batch values."""
  if mode == "stack":
    return stack
  if mode == "concat":
    # [k, m, ...] -> [m, k, ...] -> [m * k, ...]: row r = a * k + i was row a
    # of micro-batch i, so this restores the batch's order.
    return jnp.reshape(jnp.swapaxes(stack, 0, 1), (-1, *stack.shape[2:]))
  return mode(stack)


def _accumulator(leaf: Any, dtype: Any) -> jax.Array:
  # zeros_like keeps the sharding (and, under shard_map, the per-replica type)
  # of what the micro-batch returns, so the carry lies where the gradients do.
  if not jnp.issubdtype(leaf.dtype, jnp.inexact):
    return jnp.zeros_like(leaf)  # Integer leaves (counts) sum exactly as they are.
  return jnp.zeros_like(leaf, _validation.accumulator_dtype_for(leaf.dtype, dtype))


def _add(acc: jax.Array, x: jax.Array, weight: jax.Array | None) -> jax.Array:
  if weight is not None:
    # Weigh in at least float32, so token counts stay exact.
    wide = _validation.at_least_float32(acc.dtype)
    x = x.astype(wide) * weight.astype(wide)
  return acc + x.astype(acc.dtype)


def microbatch(
  fn: Callable[..., Any],
  num_microbatches: int,
  *,
  has_aux: bool = False,
  batch_argnums: int | Sequence[int] | None = None,
  batch_argnames: str | Sequence[str] = (),
  key_arg: int | str | None = None,
  reduction: str = "mean",
  weight_fn: Callable[..., Any] | None = None,
  accumulator_dtype: Any = None,
  aux_reduction: Any = "mean",
  axis_name: Hashable | None = None,
) -> Callable[..., Any]:
  """Splits a gradient function's batch into micro-batches and scans over them.

  `fn` is a function like `jax.value_and_grad(loss)`: it returns `(loss, grads)`,
  or `((loss, aux), grads)` with `has_aux=True`. The returned function has the
  same signature and returns the same structure, with the values of the whole
  batch, but runs `fn` on one micro-batch at a time inside a `jax.lax.scan`,
  summing the gradients into a carry: the activations of only one micro-batch
  are alive at once. The optimizer then runs once per step, on the gradient of
  the whole batch, so a train state's `step` stays the optimizer step (unlike
  `optaccum.accumulate`, which spreads a window over several steps).

  Arguments: the first is the parameters and is passed whole to every
  micro-batch; by default every other positional argument is a batch, a pytree
  of arrays split along axis 0 (`batch_argnums` and `batch_argnames` choose
  others); keyword arguments are passed whole unless named in `batch_argnames`.
  Micro-batch i holds rows i, i + k, i + 2k, ... of each batch (not a
  contiguous block), so a batch sharded along its first axis splits without
  moving data between devices.

  Reductions, with `w_i` the weight of micro-batch i (1 without `weight_fn`):

  * `reduction="mean"` (default): loss and grads are `sum(w_i x_i) / sum(w_i)`.
    Unweighted, that is the plain mean, equal to the unsplit call for a loss
    that is a mean over the batch. With `weight_fn` returning the micro-batch's
    number of valid tokens and a loss that is the mean over its valid tokens,
    it equals the mean over all valid tokens of the batch. A batch whose
    weights sum to zero gives zeros.
  * `reduction="sum"`: `sum(w_i x_i)`, for a loss that is a sum over examples.

  Aux outputs (metrics) are combined per leaf by `aux_reduction`: `"mean"`
  (default; weighted like the loss, for floating leaves), `"sum"` (e.g. counts),
  `"stack"` (a new leading axis of length k, in micro-batch order), `"concat"`
  (per-example leaves, joined back into the batch's row order), or a callable
  given the stacked leaf, `[k, ...]`. Pass one choice for every leaf or a tree
  prefix of the aux output, e.g. `{"accuracy": "mean", "logits": "concat"}`.
  Mean and sum are accumulated in the carry; the others keep every micro-batch's
  leaf until the end of the step, so keep those small.

  Args:
    fn: the function to split, returning `(loss, grads)` or
      `((loss, aux), grads)`.
    num_microbatches: k, the number of micro-batches; must divide the batch.
    has_aux: whether `fn` returns aux outputs, as for `jax.value_and_grad`.
    batch_argnums: positional arguments to split; None (default) means every
      one after the first, except the key.
    batch_argnames: keyword arguments to split.
    key_arg: the position (int) or keyword (str) of a PRNG key argument, if
      any. It is split into k keys, one per micro-batch, so that dropout
      differs between micro-batches and is reproducible from the one key.
    reduction: `"mean"` or `"sum"`, see above.
    weight_fn: called with each micro-batch's arguments exactly as `fn` is, it
      returns the micro-batch's scalar weight (e.g. its number of valid tokens).
    accumulator_dtype: dtype in which loss, grads and mean/sum aux leaves are
      summed. None (default) widens each leaf's dtype to at least 32 bits
      (float32 for bfloat16, so bfloat16 gradients lose nothing across
      micro-batches; float64 and complex kept); a dtype sets the precision and
      each leaf keeps its kind (complex stays complex), as in
      `optaccum.accumulate`. Results come back in the dtypes `fn` returns.
    aux_reduction: how aux leaves are combined, see above.
    axis_name: for data-parallel training inside `jax.shard_map` (or
      `optaccum.data_parallel`): the mapped axis over which replicas hold
      different batches. Each replica scans its own micro-batches without
      communication, then the sums of loss, grads, weights and mean/sum aux
      leaves are reduced across the axis once, in one `psum`: one all-reduce per
      step rather than one per micro-batch. Results are then those of the
      global batch. The PRNG key is folded with the replica index first, so
      replicas draw different dropout masks. `"stack"`, `"concat"` and
      callable aux leaves stay per replica.

  Returns:
    A function with the signature and output structure of `fn`.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optaccum
    >>> def loss(w, x):
    ...   return jnp.mean((x @ w) ** 2)
    >>> grad_fn = jax.value_and_grad(loss)
    >>> w, x = jnp.ones(3), jnp.arange(24.0).reshape(8, 3)
    >>> value, grads = optaccum.microbatch(grad_fn, 4)(w, x)
    >>> bool(jnp.allclose(value, grad_fn(w, x)[0]))
    True
    >>> bool(jnp.allclose(grads, grad_fn(w, x)[1]))
    True
  """
  if not callable(fn):
    raise TypeError(f"`{_WHERE}(fn=...)` must be callable, got fn={fn!r}.")
  _validation.check_positive_int(_WHERE, "num_microbatches", num_microbatches)
  num_microbatches = int(num_microbatches)
  if not isinstance(has_aux, bool):
    raise TypeError(f"`{_WHERE}(has_aux=...)` must be a bool, got has_aux={has_aux!r}.")
  if batch_argnums is not None:
    batch_argnums = _validation.as_argnums(_WHERE, "batch_argnums", batch_argnums)
  batch_argnames = _as_argnames(batch_argnames)
  if key_arg is not None and (
    isinstance(key_arg, bool) or not isinstance(key_arg, (int, str)) or key_arg in (0, "")
  ):
    raise TypeError(
      f"`{_WHERE}(key_arg=...)` must be None, a positive int (a position) or a str (a "
      f"keyword), got key_arg={key_arg!r}."
    )
  if key_arg is not None and (key_arg in (batch_argnums or ()) or key_arg in batch_argnames):
    raise ValueError(
      f"`{_WHERE}(key_arg=...)` names a batch argument; a key is split, not sliced, "
      f"got key_arg={key_arg!r}."
    )
  _validation.check_choice(_WHERE, "reduction", reduction, _REDUCTIONS)
  _validation.check_callable_or_none(_WHERE, "weight_fn", weight_fn)
  accumulator_dtype = _validation.floating_dtype(
    _WHERE, "accumulator_dtype", accumulator_dtype, allow_none=True
  )
  _check_aux_reduction(aux_reduction)
  if axis_name is not None and not isinstance(axis_name, Hashable):
    raise TypeError(f"`{_WHERE}(axis_name=...)` must be hashable, got axis_name={axis_name!r}.")

  @functools.wraps(fn)
  def split_fn(*args: Any, **kwargs: Any) -> Any:
    plan = _plan(args, kwargs, batch_argnums, batch_argnames, key_arg)
    kwargs = dict(kwargs)
    batches: dict[int | str, Any] = {
      n: _split(args[n], num_microbatches, f"argument {n}") for n in plan.batch_argnums
    }
    batches.update(
      {n: _split(kwargs[n], num_microbatches, f"argument {n!r}") for n in plan.batch_argnames}
    )
    keys = None
    if plan.key_arg is not None:
      key = args[plan.key_arg] if isinstance(plan.key_arg, int) else kwargs[plan.key_arg]
      _check_key(key, plan.key_arg)
      if axis_name is not None:
        key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
      keys = jax.random.split(key, num_microbatches)
    if axis_name is not None:
      # Under shard_map with check_vma, gradients with respect to a replicated
      # argument come back summed across replicas: one all-reduce per
      # micro-batch. Marked per replica, they stay local until the one psum.
      def whole(name: int | str) -> bool:
        return name not in batches and name != plan.key_arg

      args = tuple(vary(a, axis_name) if whole(i) else a for i, a in enumerate(args))
      kwargs = {n: vary(v, axis_name) if whole(n) else v for n, v in kwargs.items()}

    def call(index: Any, key: Any) -> tuple[tuple[Any, Any, Any], Any]:
      """Runs `fn` on micro-batch `index`; returns `(loss, aux, grads)` and its weight."""
      micro_args, micro_kwargs = list(args), dict(kwargs)
      for n, batch in batches.items():
        part = jax.tree.map(
          lambda x: jax.lax.dynamic_index_in_dim(x, index, axis=1, keepdims=False), batch
        )
        if isinstance(n, int):
          micro_args[n] = part
        else:
          micro_kwargs[n] = part
      if key is not None:
        if isinstance(plan.key_arg, int):
          micro_args[plan.key_arg] = key
        elif plan.key_arg is not None:
          micro_kwargs[plan.key_arg] = key
      loss, aux, grads = _unpack(fn(*micro_args, **micro_kwargs), has_aux)
      weight = None
      if weight_fn is not None:
        weight = _validation.as_scalar(
          _WHERE, "weight_fn", weight_fn(*micro_args, **micro_kwargs), jnp.float32
        )
      return (loss, aux, grads), weight

    first_key = None if keys is None else keys[0]
    (loss_shape, aux_shape, grads_shape), weight_shape = jax.eval_shape(
      call, jnp.int32(0), first_key
    )
    aux_leaves, aux_tree = jax.tree.flatten(aux_shape)
    modes = _aux_modes(aux_shape, aux_reduction)
    for mode, leaf in zip(modes, aux_leaves):
      if mode == "mean" and not jnp.issubdtype(leaf.dtype, jnp.inexact):
        raise TypeError(
          f"`{_WHERE}(aux_reduction=...)` is 'mean' for an aux leaf of dtype "
          f"{leaf.dtype}; choose 'sum' (or 'stack') for it with a tree of choices."
        )
      if mode == "concat" and not leaf.shape:
        raise ValueError(
          f"`{_WHERE}(aux_reduction=...)` is 'concat' for a scalar aux leaf; 'concat' "
          "joins per-example leaves, use 'stack' for scalars."
        )
    summed = [i for i, mode in enumerate(modes) if mode in ("mean", "sum")]
    stacked = [i for i, mode in enumerate(modes) if mode not in ("mean", "sum")]

    carry = (
      _accumulator(loss_shape, accumulator_dtype),
      jax.tree.map(lambda g: _accumulator(g, accumulator_dtype), grads_shape),
      [_accumulator(aux_leaves[i], accumulator_dtype) for i in summed],
      jnp.zeros((), jnp.float32) if weight_shape is None else _accumulator(weight_shape, None),
    )

    def body(carry: Any, xs: Any) -> tuple[Any, Any]:
      acc_loss, acc_grads, acc_aux, acc_weight = carry
      (loss, aux, grads), weight = call(*xs)
      aux = aux_tree.flatten_up_to(aux)  # type: ignore[attr-defined]  # PyTreeDef: no stubs
      acc_aux = [
        _add(acc, aux[i], weight if modes[i] == "mean" else None) for acc, i in zip(acc_aux, summed)
      ]
      carry = (
        _add(acc_loss, loss, weight),
        jax.tree.map(lambda acc, g: _add(acc, g, weight), acc_grads, grads),
        acc_aux,
        acc_weight + (jnp.ones((), jnp.float32) if weight is None else weight),
      )
      return carry, [aux[i] for i in stacked]

    xs = (jnp.arange(num_microbatches, dtype=jnp.int32), keys)
    carry, aux_stacks = jax.lax.scan(body, carry, xs)
    if axis_name is not None:
      # The one cross-replica reduction of the step.
      carry = jax.lax.psum(carry, axis_name)
    acc_loss, acc_grads, acc_aux, total_weight = carry

    def finish(acc: jax.Array, like: Any, mean: bool) -> jax.Array:
      if mean:
        # A batch of zero total weight gives zeros, not 0 / 0.
        safe = jnp.where(total_weight > 0, total_weight, jnp.ones((), jnp.float32))
        acc = jnp.where(total_weight > 0, acc / safe.astype(acc.dtype), jnp.zeros_like(acc))
      return acc.astype(like.dtype)

    is_mean = reduction == "mean"
    loss = finish(acc_loss, loss_shape, is_mean)
    grads = jax.tree.map(lambda a, g: finish(a, g, is_mean), acc_grads, grads_shape)
    if not has_aux:
      return loss, grads
    aux: list[Any] = [None] * len(aux_leaves)
    for acc, i in zip(acc_aux, summed):
      aux[i] = finish(acc, aux_leaves[i], modes[i] == "mean")
    for stack, i in zip(aux_stacks, stacked):
      aux[i] = _combine_stacked(modes[i], stack)
    return (loss, aux_tree.unflatten(aux)), grads  # type: ignore[attr-defined]  # PyTreeDef

  return split_fn

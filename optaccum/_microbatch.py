"""In-step micro-batching: one optimizer step over a batch, a slice at a time."""

from __future__ import annotations

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
  _slicing,
  _spans,
  _window,
)
from optaccum._types import DTypeLike, PyTree

_WHERE = _slicing.WHERE
# The micro-batch weights sum in float32, whatever `accumulator=` says.
_WEIGHTS = _accumulator.Accumulator()


# --- The scan ---------------------------------------------------------------------------


def _init_carry(
  accumulator: _accumulator.Accumulator,
  loss: jax.ShapeDtypeStruct,
  grads: PyTree,
  aux: _aux.Layout,
  weight: jax.ShapeDtypeStruct | None,
) -> tuple[Any, Any, list, jax.Array | None]:
  """The scan's carry, zeros: sums of loss, grads, summed aux, weights (None unweighted)."""
  zeros = functools.partial(accumulator.zeros_like, _WHERE)
  zero_weight = None if weight is None else _WEIGHTS.zeros_like(_WHERE, weight)
  return (
    zeros(loss),
    jax.tree.map(zeros, grads),
    [zeros(aux.leaves[i]) for i in aux.summed],
    zero_weight,
  )


def _add(accumulator: _accumulator.Accumulator, aux: _aux.Layout, sums: Any, out: Any) -> Any:
  """`sums` with one micro-batch's `((loss, aux, grads), weight)` added; its stacked aux."""
  acc_loss, acc_grads, acc_aux, acc_weight = sums
  (loss, aux_out, grads), weight = out
  leaves = aux.flatten(aux_out)
  with jax.named_scope(_spans.WINDOW_ADD):
    # The weight rule of every form: a NaN, infinite or negative weight skips.
    skip, admitted = _window.admit(weight)
    weight = None if weight is None else admitted
    add = lambda acc, x, w: _window.add(accumulator, acc, x, w, skip)  # noqa: E731
    acc_aux = [
      add(acc, leaves[i], weight if aux.modes[i] == "mean" else None)
      for acc, i in zip(acc_aux, aux.summed)
    ]
    sums = (
      add(acc_loss, loss, weight),
      jax.tree.map(lambda acc, g: add(acc, g, weight), acc_grads, grads),
      acc_aux,
      None if acc_weight is None else acc_weight + admitted,
    )
  return sums, [leaves[i] for i in aux.stacked]


def _scan_body(
  settings: _slicing.Settings, call: _slicing.Call, aux: _aux.Layout, count: int
) -> Callable[[Any, Any], tuple[Any, list]]:
  """The scan's step: one micro-batch into the carry (none past `num_real`); its stacked aux."""

  def run(operand: tuple, index: jax.Array, key: jax.Array | None) -> tuple[Any, list]:
    sums, state = operand
    out, weight, state = call(index, key, state)
    sums, stacked = _add(settings.accumulator, aux, sums, (out, weight))
    return (sums, state), stacked

  def body(carry: PyTree, key: jax.Array | None) -> tuple[Any, list]:
    # Carried, XLA merges the index with the loop's counter; an arange(k) is a temporary.
    sums, state, index = carry
    if settings.num_real is None:
      operand, stacked = run((sums, state), index, key)
    else:
      real = index < jnp.clip(jnp.asarray(settings.num_real, jnp.int32), 0, count)
      empty = [jnp.zeros(aux.leaves[i].shape, aux.leaves[i].dtype) for i in aux.stacked]
      operand, stacked = jax.lax.cond(
        real, lambda o: run(o, index, key), lambda o: (o, empty), (sums, state)
      )
    return (*operand, index + 1), stacked

  return body


# --- Finishing --------------------------------------------------------------------------


def _finisher(total_weight: jax.Array, weighted: bool) -> Callable[[str, Any, Any], jax.Array]:
  """`finish(reduction, acc, like)`: a sum's mean or sum, in the dtype of `like`."""
  values = {r: _window.finisher(r, total_weight) for r in _accumulator.REDUCTIONS}

  def finish(reduction: str, acc: jax.Array, like: jax.ShapeDtypeStruct) -> jax.Array:
    value = values[reduction](acc, like.dtype)
    if reduction == "mean" and weighted:
      # A batch of zero total weight gives zeros, also where `fn` returned NaN
      # for it (a mean over 0 tokens), which a multiply by 0 would keep.
      value = jnp.where(total_weight > 0, value, jnp.zeros_like(value))
    return value

  return finish


class _Shapes(NamedTuple):
  """The shapes and dtypes of one micro-batch's loss and gradients, and the aux layout."""

  loss: jax.ShapeDtypeStruct
  grads: PyTree
  aux: _aux.Layout


def _finish(settings: _slicing.Settings, carry: PyTree, combined: list, shapes: _Shapes) -> Any:
  """What the split function returns, from the final sums and the combined stacked aux."""
  acc_loss, acc_grads, acc_aux, total_weight = carry
  weighted = settings.weight_fn is not None or settings.num_real is not None
  finish = _finisher(total_weight, weighted)
  loss = finish(settings.reduction, acc_loss, shapes.loss)
  grads = jax.tree.map(lambda acc, g: finish(settings.reduction, acc, g), acc_grads, shapes.grads)
  aux = shapes.aux
  leaves: list[Any] = [None] * len(aux.leaves)
  for acc, i in zip(acc_aux, aux.summed):
    leaves[i] = finish(aux.modes[i], acc, aux.leaves[i])
  for value, i in zip(combined, aux.stacked):
    leaves[i] = value
  aux_out, overwritten = aux.unflatten(leaves)
  grads = _overwrite.join(grads, settings.replicas.largest(overwritten))
  return ((loss, aux_out), grads) if settings.has_aux else (loss, grads)


def _local_sums(
  settings: _slicing.Settings,
  args: tuple,
  kwargs: dict,
  replica: jax.Array | None = None,
  graph: _nnx.Graph | None = None,
) -> tuple[Any, list, _Shapes]:
  """The sums of this call's micro-batches (a replica's), combined stacked aux, and shapes."""
  call, keys, tail, cut = _slicing.microbatch_call(settings, args, kwargs, replica, graph)
  first_key = None if keys is None else keys[0]
  state = None if graph is None else graph.state
  if graph is not None:
    # Computed from each replica's rows, the carried state varies over the axis.
    state = settings.replicas.vary(state)
  (loss_shape, aux_shape, grads_shape), weight_shape, _ = jax.eval_shape(
    call, jnp.int32(0), first_key, state
  )
  aux = _aux.layout(aux_shape, (settings.aux_reduction, _overwrite.largest))
  if tail is not None:
    _aux.check_unequal(aux, settings.k, cut.tail)
  carry = _init_carry(settings.accumulator, loss_shape, grads_shape, aux, weight_shape)
  body = _scan_body(settings, call, aux, cut.parts)
  scan_keys = None if keys is None else keys[: cut.parts]
  (carry, state, _), stacks = jax.lax.scan(
    body, (carry, state, jnp.zeros((), jnp.int32)), scan_keys, length=cut.parts
  )
  combined = [_aux.combine_stacked(aux.modes[i], stack) for stack, i in zip(stacks, aux.stacked)]
  if tail is not None:  # the shorter last micro-batch; its "concat" rows come last
    out, weight, state = tail(None if keys is None else keys[cut.parts], state)
    carry, ends = _add(settings.accumulator, aux, carry, (out, weight))
    combined = [jnp.concatenate([rows, end]) for rows, end in zip(combined, ends)]
  if carry[3] is None:
    carry = (*carry[:3], jnp.full((), cut.parts + (tail is not None), jnp.float32))
  if graph is not None:
    graph.write_back(state)
  return carry, combined, _Shapes(loss_shape, grads_shape, aux)


def _split_call(settings: _slicing.Settings, args: tuple, kwargs: dict) -> Any:
  """One call of the split function: slice, scan over the micro-batches, reduce, finish."""
  args, kwargs, graph = _nnx.split_graph(_WHERE, args, kwargs)
  axes = settings.replicas.axes
  _replicas.check_gather_at_call(_WHERE, settings.gather_dtype, settings.replicas, args)
  if axes is None:
    carry, combined, shapes = _local_sums(settings, args, kwargs, graph=graph)
  elif graph is not None:
    # nnx.Rngs would draw the same dropout masks on every replica.
    raise ValueError(
      f"`{_WHERE}(axis_name=...)` under plain `jax.jit` does not take NNX modules as "
      f"arguments, got axis_name={_replicas.shown_axes(axes)} with one at argument "
      f"{graph.names[0]!r}; pass `nnx.split(model)`'s state and merge it in `fn`, or call it "
      "inside `shard_map`."
    )
  else:
    carry, combined, shapes = _per_replica_sums(settings, axes, args, kwargs)
  carry, _ = settings.replicas.reduce(carry, ())
  with jax.named_scope(_spans.WINDOW_CLOSE):
    return _finish(settings, carry, combined, shapes)


def _per_replica_sums(
  settings: _slicing.Settings, axes: tuple[str, ...], args: tuple, kwargs: dict
) -> tuple[Any, list, _Shapes]:
  """Under mesh axes, each replica's sums, not yet reduced ("concat" aux in row order)."""
  replicas = _replicas.count(_WHERE, axes)
  plan = _arguments.plan(_WHERE, settings.arguments, args, kwargs)
  params = args[0] if args else None
  args, kwargs = _replicas.gather_whole(args, kwargs, plan, axes, settings.gather_dtype)
  batches = _arguments.batches(plan, args, kwargs)
  _slicing.check_not_empty(batches)
  parts = _replicas.split_batches(_WHERE, batches, axes, replicas)
  found: list[_Shapes] = []

  def local(parts: dict, replica: jax.Array) -> tuple[Any, list]:
    local_args, local_kwargs = _arguments.replaced(args, kwargs, parts)
    carry, combined, shapes = _local_sums(settings, tuple(local_args), local_kwargs, replica)
    found.append(shapes)
    return carry, combined

  indices = _replicas.indices(axes, replicas)
  carry, combined = _replicas.vmap(local, axes, in_axes=(0, 0))(parts, indices)
  grads = _replicas.grads_like_before_gather(_WHERE, found[-1].grads, params, settings.gather_dtype)
  shapes = found[-1]._replace(grads=grads)
  combined = [
    jnp.reshape(value, (-1, *value.shape[2:])) if shapes.aux.modes[i] == "concat" else value
    for value, i in zip(combined, shapes.aux.stacked)
  ]
  return carry, combined, shapes


# --- The public function ----------------------------------------------------------------


def microbatch(
  fn: Callable[..., Any],
  k: int,
  *,
  has_aux: bool = False,
  batch_argnums: int | Sequence[int] | None = None,
  batch_argnames: str | Sequence[str] = (),
  key_arg: int | str | None = None,
  reduction: str = "mean",
  weight_fn: Callable[..., Any] | None = None,
  accumulator: _accumulator.Accumulator | DTypeLike | None = None,
  aux_reduction: PyTree = "mean",
  axis_name: Hashable | None = None,
  num_real: int | jax.Array | None = None,
  per_example: Callable[[PyTree], tuple[PyTree, PyTree]] | None = None,
  gather_dtype: DTypeLike | None = None,
) -> Callable[..., Any]:
  """Splits a gradient function's batch into micro-batches and scans over them.

  `fn` is a function like `jax.value_and_grad(loss)`, returning `(loss, grads)`,
  or `((loss, aux), grads)` with `has_aux=True`. The returned function has the
  same signature and output structure, with the values of the whole batch, but
  runs `fn` on one micro-batch at a time inside a `jax.lax.scan`, summing into a
  carry: only one micro-batch's activations are alive. The first argument (the
  parameters) goes whole to every micro-batch; batch arguments are split along
  axis 0, micro-batch i holding rows i, i + k, i + 2k, ... With `w_i` the weight
  of micro-batch i (1 without `weight_fn`; a NaN, infinite or negative one skips
  it), `"mean"` gives `sum(w_i x_i) / sum(w_i)` (zeros where the weights sum to
  zero) and `"sum"` gives `sum(w_i x_i)`. Flax NNX modules may be passed as they
  are. Guide: [in-step micro-batching][1-in-step-micro-batching-optaccummicrobatch].

  Args:
    fn: the function to split, returning `(loss, grads)` or `((loss, aux), grads)`.
    k: the number of micro-batches. A batch of B rows that k does not divide is
      cut into micro-batches of ceil(B / k) rows and a shorter last one, each
      weighted by its rows for `"mean"`, so the result is the unsplit batch's.
      The batch must not be empty.
    has_aux: whether `fn` returns aux outputs, as for `jax.value_and_grad`.
    batch_argnums: positional arguments to split; None (default) means every one
      after the first, except the key.
    batch_argnames: keyword arguments to split (others are passed whole).
    key_arg: the position (int) or keyword (str) of a PRNG key argument, split
      into one key per micro-batch.
    reduction: `"mean"` (default) or `"sum"`.
    weight_fn: called with each micro-batch's arguments as `fn` is, it returns
      the micro-batch's scalar weight (e.g. its number of valid tokens).
    accumulator: the dtype of the sums; None (default) widens each leaf's dtype to
      at least 32 bits. Results come back in the dtypes `fn` returns.
    aux_reduction: how each aux leaf is combined: `"mean"` (default), `"sum"`,
      `"stack"`, `"concat"`, a callable given the stacked leaf, or a tree prefix
      of the aux output holding these.
    axis_name: the replicas' axis (a name or a tuple), inside `jax.shard_map` or
      under plain `jax.jit` with a mesh in context: each replica scans its own
      rows, then the sums are reduced across replicas once.
    num_real: how many micro-batches are real, the rest padding (an int, or a
      scalar integer array, traced inside `jax.jit`: no recompilation, clamped
      to [0, k]). Micro-batches from `num_real` on run nothing and add nothing;
      `"mean"` is over the real ones (zeros where there are none); their
      stacked aux leaves are zeros. Needs a batch that k divides.
    per_example: `transform(grads) -> (grads, metrics)` for one example's
      gradients (e.g. DP-SGD's clipping): `fn` then runs on each example as a
      batch of one row (`jax.vmap` within a micro-batch), and the result is the
      mean (or sum) of the transformed gradients; the returned function gives
      `((loss, metrics), grads)`, the metrics per example in batch order.
    gather_dtype: with `axis_name` under plain `jax.jit` over a mesh, where the
      parameters (the first argument) sharded over the replicas are gathered
      once per call (by XLA on an Auto mesh), a floating dtype such as
      `jnp.bfloat16` to cast their wider floating leaves to before the gather:
      fewer bytes gathered, `fn` given the parameters in that dtype, the
      gradients returned in the parameters' own dtypes.

  Returns:
    A function with the signature and output structure of `fn`.

  Raises:
    TypeError: for an argument of the wrong type (`fn` not callable, ...).
    ValueError: for a bad value (`k`, `reduction`, a stochastic accumulator, ...);
      at the call, for a batch argument with 0 rows, or batch leaves of unequal rows
      that k does not divide.

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
  settings = _slicing.check_arguments(
    fn,
    k,
    has_aux=has_aux,
    batch_argnums=batch_argnums,
    batch_argnames=batch_argnames,
    key_arg=key_arg,
    reduction=reduction,
    weight_fn=weight_fn,
    accumulator=accumulator,
    aux_reduction=aux_reduction,
    axis_name=axis_name,
    num_real=num_real,
    per_example=per_example,
    gather_dtype=gather_dtype,
  )

  @_arguments.named_like(fn)
  def split_fn(*args: PyTree, **kwargs: PyTree) -> Any:
    return _split_call(settings, args, kwargs)

  return split_fn

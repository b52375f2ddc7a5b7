"""In-step micro-batching: one optimizer step over a batch, a slice at a time."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from optaccum import _accumulator, _arguments, _aux, _nnx, _replicas, _spans, _validation, _window
from optaccum._types import DTypeLike, PyTree, Scalar

_WHERE = "microbatch"
# The micro-batch weights sum in float32, whatever `accumulator=` says.
_WEIGHTS = _accumulator.Accumulator()


# --- Arguments --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Settings:
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


def _check_arguments(
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
) -> _Settings:
  """`microbatch`'s arguments as `_Settings`; raises, naming the argument, at the first bad one."""
  if not callable(fn):
    raise TypeError(f"`{_WHERE}(fn=...)` must be callable, got fn={fn!r}.")
  _validation.check_positive_int(_WHERE, "k", k)
  if not isinstance(has_aux, bool):
    raise TypeError(f"`{_WHERE}(has_aux=...)` must be a bool, got has_aux={has_aux!r}.")
  arguments = _arguments.check(_WHERE, batch_argnums, batch_argnames, key_arg)
  _validation.check_choice(_WHERE, "reduction", reduction, _accumulator.REDUCTIONS)
  _validation.check_callable_or_none(_WHERE, "weight_fn", weight_fn)
  accumulator = _accumulator.as_accumulator(_WHERE, accumulator, stochastic=False)
  _aux.check_reduction(aux_reduction)
  replicas = _replicas.Replicas.of(_WHERE, axis_name)
  return _Settings(
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

  Micro-batch i holds rows i, i + k, i + 2k, ... rather than a contiguous block,
  so that a batch sharded along its first axis splits where it lies: every
  device keeps its own rows in every micro-batch and no data moves.
  """

  def split_leaf(path: jax.tree_util.KeyPath, x: jax.Array) -> jax.Array:
    size = _validation.unsplittable(x, k)
    if size is not None:
      raise ValueError(
        f"`{_WHERE}(k=...)` must divide the batch: {argument} at "
        f"{_validation.place(path)} has {size}, which does not split "
        f"into k={k} equal micro-batches."
      )
    shape = jnp.shape(x)
    return jnp.reshape(x, (shape[0] // k, k, *shape[1:]))

  return jax.tree_util.tree_map_with_path(split_leaf, tree)


def _label(name: int | str) -> str:
  return f"argument {name!r}" if isinstance(name, str) else f"argument {name}"


def _check_not_empty(batches: dict[int | str, Any]) -> None:
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
          f"`{_WHERE}(...)` got a batch of 0 rows: {_label(name)} at "
          f"{_validation.place(path)} has shape {shape}, and an empty "
          "batch has no micro-batch to take a loss or gradients of. Skip the call, or pass "
          "at least one row per micro-batch."
        )


def _split_batches(
  plan: _arguments.Plan, args: tuple, kwargs: dict, k: int
) -> dict[int | str, Any]:
  """Each batch argument, by position or keyword, split by `_split`."""
  batches = _arguments.batches(plan, args, kwargs)
  _check_not_empty(batches)
  return {name: _split(batch, k, _label(name)) for name, batch in batches.items()}


def _microbatch_keys(
  settings: _Settings, plan: _arguments.Plan, args: tuple, kwargs: dict, replica: jax.Array | None
) -> Any:
  """The key argument split into one key per micro-batch, or None without one.

  Each replica (`replica`: its index under mesh axes) draws its own
  dropout masks.
  """
  key = _arguments.key(_WHERE, plan, args, kwargs)
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


_Call = Callable[[Any, Any, Any], tuple[tuple[Any, Any, Any], Any, Any]]


def _microbatch_call(
  settings: _Settings,
  args: tuple,
  kwargs: dict,
  replica: jax.Array | None,
  graph: _nnx.Graph | None,
) -> tuple[_Call, Any]:
  """`call(index, key, state)`, which runs `fn` on micro-batch `index`, and the keys.

  `call` returns `(loss, aux, grads)`, the micro-batch's weight (None without
  `weight_fn`) and the state of the NNX objects in the arguments (`graph`)
  after the call, which the next micro-batch starts from (None without).
  """
  plan = _arguments.plan(_WHERE, settings.arguments, args, kwargs)
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
        _WHERE, "weight_fn", settings.weight_fn(*micro_args, **micro_kwargs), jnp.float32
      )
    if graph is not None:
      state = graph.state_of(objects, state)
    return (loss, aux, grads), weight, state

  return call, keys


# --- The scan ---------------------------------------------------------------------------


def _init_carry(
  accumulator: _accumulator.Accumulator,
  loss: jax.ShapeDtypeStruct,
  grads: PyTree,
  aux: _aux.Layout,
  weight: jax.ShapeDtypeStruct | None,
) -> tuple[Any, Any, list, jax.Array | None]:
  """The scan's carry, all zeros: the sums of loss, grads, summed aux leaves and weights.

  Unweighted, the weights sum to k: no carry (no temporary) for it.
  """
  zeros = functools.partial(accumulator.zeros_like, _WHERE)
  zero_weight = None if weight is None else _WEIGHTS.zeros_like(_WHERE, weight)
  return (
    zeros(loss),
    jax.tree.map(zeros, grads),
    [zeros(aux.leaves[i]) for i in aux.summed],
    zero_weight,
  )


def _scan_body(
  accumulator: _accumulator.Accumulator, call: _Call, aux: _aux.Layout
) -> Callable[[Any, Any], tuple[Any, list]]:
  """The scan's step: runs one micro-batch, adds it into the carry, emits its stacked aux."""

  def body(carry: PyTree, key: jax.Array | None) -> tuple[Any, list]:
    # Carried, XLA merges the index with the loop's counter; an arange(k) is a temporary.
    (acc_loss, acc_grads, acc_aux, acc_weight), state, index = carry
    (loss, aux_out, grads), weight, state = call(index, key, state)
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
    return (sums, state, index + 1), [leaves[i] for i in aux.stacked]

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


def _finish(settings: _Settings, carry: PyTree, combined: list, shapes: _Shapes) -> Any:
  """What the split function returns, from the final sums and the combined stacked aux."""
  acc_loss, acc_grads, acc_aux, total_weight = carry
  finish = _finisher(total_weight, weighted=settings.weight_fn is not None)
  loss = finish(settings.reduction, acc_loss, shapes.loss)
  grads = jax.tree.map(lambda acc, g: finish(settings.reduction, acc, g), acc_grads, shapes.grads)
  if not settings.has_aux:
    return loss, grads
  aux = shapes.aux
  leaves: list[Any] = [None] * len(aux.leaves)
  for acc, i in zip(acc_aux, aux.summed):
    leaves[i] = finish(aux.modes[i], acc, aux.leaves[i])
  for value, i in zip(combined, aux.stacked):
    leaves[i] = value
  return (loss, aux.unflatten(leaves)), grads


def _local_sums(
  settings: _Settings,
  args: tuple,
  kwargs: dict,
  replica: jax.Array | None = None,
  graph: _nnx.Graph | None = None,
) -> tuple[Any, list, _Shapes]:
  """The scan over this call's micro-batches (one replica's, under mesh axes).

  Returns the final carry (the sums), the stacked aux leaves combined, and the
  shapes. With NNX objects among the arguments (`graph`), it writes back into
  them the state the last micro-batch left.
  """
  call, keys = _microbatch_call(settings, args, kwargs, replica, graph)
  first_key = None if keys is None else keys[0]
  state = None if graph is None else graph.state
  if graph is not None:
    # Computed from each replica's rows, the carried state varies over the axis.
    state = settings.replicas.vary(state)
  (loss_shape, aux_shape, grads_shape), weight_shape, _ = jax.eval_shape(
    call, jnp.int32(0), first_key, state
  )
  aux = _aux.layout(aux_shape, settings.aux_reduction)
  carry = _init_carry(settings.accumulator, loss_shape, grads_shape, aux, weight_shape)
  body = _scan_body(settings.accumulator, call, aux)
  (carry, state, _), stacks = jax.lax.scan(
    body, (carry, state, jnp.zeros((), jnp.int32)), keys, length=settings.k
  )
  if carry[3] is None:
    carry = (*carry[:3], jnp.full((), settings.k, jnp.float32))
  if graph is not None:
    graph.write_back(state)
  combined = [_aux.combine_stacked(aux.modes[i], stack) for stack, i in zip(stacks, aux.stacked)]
  return carry, combined, _Shapes(loss_shape, grads_shape, aux)


def _split_call(settings: _Settings, args: tuple, kwargs: dict) -> Any:
  """One call of the split function: slice, scan over the micro-batches, reduce, finish."""
  args, kwargs, graph = _nnx.split_graph(_WHERE, args, kwargs)
  axes = settings.replicas.axes
  if axes is None:
    carry, combined, shapes = _local_sums(settings, args, kwargs, graph=graph)
  elif graph is not None:
    # nnx.Rngs would draw the same dropout masks on every replica.
    raise ValueError(
      f"`{_WHERE}(axis_name=...)` under plain `jax.jit` does not take NNX modules as "
      f"arguments, got axis_name={axes!r} with one at argument {graph.names[0]!r}; pass "
      "`nnx.split(model)`'s state and merge it in `fn`, or call it inside `shard_map`."
    )
  else:
    carry, combined, shapes = _per_replica_sums(settings, axes, args, kwargs)
  carry, _ = settings.replicas.reduce(carry, ())
  with jax.named_scope(_spans.WINDOW_CLOSE):
    return _finish(settings, carry, combined, shapes)


def _check_rows_per_replica(
  k: int, batches: dict[int | str, Any], axes: tuple[str, ...], replicas: int
) -> None:
  """Checks that each replica's rows split into k micro-batches, naming the whole batch.

  Checked before the split among replicas, so that the message gives the batch
  size the caller passed, not one replica's share of it. A batch that does not
  divide among the replicas is left to `_replicas.split`'s message.
  """
  for name, batch in batches.items():
    for path, x in jax.tree_util.tree_flatten_with_path(batch)[0]:
      shape = jnp.shape(x)
      if not shape or shape[0] % replicas or not (shape[0] // replicas) % k:
        continue
      rows, share = shape[0], shape[0] // replicas
      held = "the 1 replica holds" if replicas == 1 else f"the {replicas} replicas hold"
      raise ValueError(
        f"`{_WHERE}(k={k}, axis_name={axes!r})` splits each replica's rows into k "
        f"micro-batches, but {_label(name)} at {_validation.place(path)} "
        f"has a batch of {rows} rows, which {held} as {share} rows each, and {share} "
        f"does not split into k={k} equal micro-batches. Pass a batch whose size is a "
        f"multiple of {replicas * k} ({replicas} replicas x k={k}), or a k that divides "
        f"{share}."
      )


def _per_replica_sums(
  settings: _Settings, axes: tuple[str, ...], args: tuple, kwargs: dict
) -> tuple[Any, list, _Shapes]:
  """Under mesh axes: each replica scans its own rows; its sums, not yet reduced.

  See `optaccum/_replicas.py`. "concat" aux leaves are joined back into the
  batch's row order; "stack" and callable ones keep a leading replica axis.
  """
  replicas = _replicas.count(_WHERE, axes)
  plan = _arguments.plan(_WHERE, settings.arguments, args, kwargs)
  _replicas.check_not_sharded_over(_WHERE, args, kwargs, plan, axes)
  batches = _arguments.batches(plan, args, kwargs)
  _check_not_empty(batches)
  _check_rows_per_replica(settings.k, batches, axes, replicas)
  parts = _replicas.split_batches(_WHERE, batches, axes, replicas)
  found: list[_Shapes] = []

  def local(parts: dict, replica: jax.Array) -> tuple[Any, list]:
    local_args, local_kwargs = _arguments.replaced(args, kwargs, parts)
    carry, combined, shapes = _local_sums(settings, tuple(local_args), local_kwargs, replica)
    found.append(shapes)
    return carry, combined

  indices = _replicas.indices(axes, replicas)
  carry, combined = _replicas.vmap(local, axes, in_axes=(0, 0))(parts, indices)
  shapes = found[-1]
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

  Flax NNX modules may be passed as they are, e.g.
  `microbatch(nnx.value_and_grad(loss), k)(model, x, y)`: an argument that
  holds a module (or another NNX graph node) is split outside the scan; its
  `nnx.Param`s are passed whole to every micro-batch and every other Variable
  is carried from one micro-batch to the next. The module then ends as k calls
  of `fn`, one per micro-batch in turn, would leave it: its `nnx.Rngs` counts
  advanced once per micro-batch (each draws its own dropout masks), its
  BatchNorm running statistics updated once per micro-batch, from that
  micro-batch's statistics (a large batch would update them once). The
  gradients are the `nnx.State` that `nnx.value_and_grad` returns. What `fn`
  writes to a Param is not kept (the Params are the same for every
  micro-batch); `fn` may be wrapped in `nnx.jit`; under plain `jax.jit`,
  `axis_name` does not take modules.

  Reductions, with `w_i` the weight of micro-batch i (1 without `weight_fn`):

  * `reduction="mean"` (default): loss and grads are `sum(w_i x_i) / sum(w_i)`.
    Unweighted, that is the plain mean, equal to the unsplit call for a loss
    that is a mean over the batch. With `weight_fn` returning the micro-batch's
    number of valid tokens and a loss that is the mean over its valid tokens,
    it equals the mean over all valid tokens of the batch. A batch whose
    weights sum to zero gives zeros.
  * `reduction="sum"`: `sum(w_i x_i)`, for a loss that is a sum over examples.

  A weight that is NaN, infinite or negative skips its micro-batch, as in
  `optaccum.accumulate`: its loss, gradients and mean/sum aux leaves add
  nothing (not even their own NaN) and its weight counts as 0; its "stack" and
  "concat" aux leaves are kept as returned.

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
    k: the number of micro-batches; must divide the batch, which must not
      be empty.
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
    accumulator: dtype in which loss, grads and mean/sum aux leaves are
      summed. None (default) widens each leaf's dtype to at least 32 bits
      (float32 for bfloat16, so bfloat16 gradients lose nothing across
      micro-batches; float64 and complex kept); a dtype sets the precision and
      each leaf keeps its kind (complex stays complex), as in
      `optaccum.accumulate`. Results come back in the dtypes `fn` returns.
      `optaccum.stochastic_bfloat16(...)` is refused: a sum within one step
      has no window over which its rounding would be unbiased.
    aux_reduction: how aux leaves are combined, see above.
    axis_name: for data-parallel training: the axis (a name, or a tuple of
      names) over which replicas hold different rows. Each replica scans its
      own micro-batches without communication, then the sums of loss, grads,
      weights and mean/sum aux leaves are reduced across the replicas once:
      one all-reduce per step rather than one per micro-batch. Results are
      those of the global batch; the PRNG key is folded with the replica
      index. Inside `jax.shard_map` (or `optaccum.parallel.data_parallel`)
      the reduction is a `psum` over the mapped axis, and `"stack"`,
      `"concat"` and callable aux leaves stay per replica. Under plain
      `jax.jit` with a mesh in context (`with jax.set_mesh(mesh):`) whose axes
      of that name are Auto or Explicit, each of the R replicas scans its own
      contiguous block of `B / R` rows; other mesh axes (FSDP's) are left to
      XLA; `"concat"` aux leaves come back in the batch's row order, `"stack"`
      and callable ones with a leading axis of R replicas. See
      docs/distributed.md.

  Returns:
    A function with the signature and output structure of `fn`.

  Raises:
    TypeError: if an argument has the wrong type (`fn` or `weight_fn` not
      callable, `has_aux` not a bool, ...).
    ValueError: if an argument has a bad value (`k` not a positive int, an
      unknown `reduction`, ...); and at the call, if a batch argument has 0
      rows (refused alike on one device and under mesh axes), or its rows
      do not split into k micro-batches (under mesh axes, among the
      replicas and then into k).

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
  settings = _check_arguments(
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
  )

  @_arguments.named_like(fn)
  def split_fn(*args: PyTree, **kwargs: PyTree) -> Any:
    return _split_call(settings, args, kwargs)

  return split_fn

"""Choosing k from the memory there is: compile each candidate step, read XLA's memory analysis.

Nothing runs: each candidate's training step is traced and compiled on
abstract shapes (`jax.ShapeDtypeStruct` leaves are enough), and XLA's compiled
memory analysis says what one step holds: its temporaries (activations,
gradients), its arguments (parameters, optimizer state, the batch), its
outputs, less what the donated arguments lend the outputs.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Protocol, TypeAlias, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike

from optaccum import _replicas, _validation
from optaccum._accumulate import accumulate
from optaccum._apply import apply_gradients
from optaccum._microbatch import microbatch
from optaccum._per_replica import per_replica
from optaccum._types import OptState, Params, PyTree, Updates

FORMS = ("microbatch", "accumulate")
_WHERE = "plan"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*$")

#: A function like `jax.value_and_grad(loss)`: `(params, *batch) -> (loss, grads)`, the
#: loss `(loss, aux)` where it has aux outputs.
ValueAndGradFn: TypeAlias = Callable[..., tuple[PyTree, Updates]]
#: A training step: `(params, opt_state, *batch) -> (params, opt_state, loss)`.
Step: TypeAlias = Callable[..., tuple[Params, OptState, PyTree]]


class MemoryAnalysis(Protocol):
  """What XLA's compiled memory analysis reports, in bytes (`Compiled.memory_analysis()`)."""

  temp_size_in_bytes: int
  argument_size_in_bytes: int
  output_size_in_bytes: int
  alias_size_in_bytes: int


@dataclasses.dataclass(frozen=True)
class PlanRow:
  """One compiled candidate: its form, k, micro-batch size and XLA's memory analysis, in bytes.

  `total` is what the step holds at once: arguments + outputs - the donated
  arguments' buffers the outputs reuse + temporaries.
  """

  # "unsplit" (k = 1: the plain optimizer step), "microbatch" or "accumulate", and with
  # `plan(axis_name=...)` "microbatch(axis_name)" and "accumulate(axis_name)".
  form: str
  k: int
  micro_batch_size: int
  temporaries: int
  arguments: int
  outputs: int
  aliased: int
  total: int
  fits: bool


@dataclasses.dataclass(frozen=True)
class Plan:
  """What `optaccum.planning.plan` chose, and the table it chose from.

  Attributes:
    microbatch: the smallest k that fits for the in-step form,
      `optaccum.microbatch(grad_fn, k)` (1: the unsplit step fits).
    accumulate: the smallest k that fits for the across-steps form,
      `optaccum.accumulate(optimizer, k)` fed micro-batches of B / k.
    budget: the budget in bytes.
    batch_size: B, the global batch.
    rows: every compiled candidate, by k.
    microbatch_deferred: with `plan(axis_name=...)`, the smallest k that fits
      for `optaccum.microbatch(grad_fn, k, axis_name=...)`, whose replicas
      reduce once per step (else None).
    accumulate_deferred: with `plan(axis_name=...)`, the smallest k that fits
      for `optaccum.accumulate(optimizer, k, axis_name=...)` fed by
      `optaccum.parallel.per_replica(grad_fn, axis_name=...)`, whose replicas
      reduce once per window (else None).
  """

  microbatch: int | None
  accumulate: int | None
  budget: int
  batch_size: int
  rows: tuple[PlanRow, ...]
  microbatch_deferred: int | None = None
  accumulate_deferred: int | None = None

  def table(self) -> str:
    """The rows as a Markdown table."""
    lines = [
      f"Budget {size_text(self.budget)} for a batch of {self.batch_size}.",
      "",
      "| form | k | micro-batch | temporaries | arguments | outputs | donated | total | fits |",
      "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in self.rows:
      sizes = (row.temporaries, row.arguments, row.outputs, row.aliased, row.total)
      cells = " | ".join(map(size_text, sizes))
      fits = "yes" if row.fits else "no"
      lines.append(f"| {row.form} | {row.k} | {row.micro_batch_size} | {cells} | {fits} |")
    return "\n".join(lines)


def size_text(size: int) -> str:
  """A byte count for people: "512 B", "208.4 KiB", "1.5 GiB"."""
  for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if abs(size) >= scale:
      return f"{size / scale:,.1f} {unit}"
  return f"{size} B"


def parse_bytes(where: str, name: str, value: object) -> int:
  """A size in bytes from an int or a string such as "300KiB", "1.5 GiB" or "2GB"."""
  if isinstance(value, bool) or not isinstance(value, int | float | str):
    raise TypeError(
      f"`{where}({name}=...)` must be a number of bytes or a size such as '300KiB', "
      f"got {name}={value!r}."
    )
  size: float
  if isinstance(value, str):
    match = _SIZE.match(value)
    if match is None or match.group(2).upper() not in _UNITS:
      raise ValueError(
        f"`{where}({name}=...)` must be a size such as '300KiB', '1.5GiB' or '2GB' "
        f"(units B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), got {name}={value!r}."
      )
    size = float(match.group(1)) * _UNITS[match.group(2).upper()]
  else:
    size = value
  if not size >= 1 or size == float("inf"):
    raise ValueError(f"`{where}({name}=...)` must be at least 1 byte and finite, got {value!r}.")
  return int(size)


def device_budget(where: str) -> int:
  """The first local device's memory limit, where JAX reports one; else a ValueError."""
  device = jax.local_devices()[0]
  stats = device.memory_stats() or {}
  if "bytes_limit" not in stats:
    raise ValueError(
      f"`{where}(budget=...)` is required here: the {device.platform} device {device} "
      "reports no memory limit (memory_stats()['bytes_limit']); give the budget in bytes "
      "or as a size such as '300KiB'."
    )
  return int(stats["bytes_limit"])


def batch_size_of(
  where: str, batch: object, *, name: str = "batch", index: int | None = None, shapes: bool = True
) -> int:
  """B, the leading axis that every leaf of `batch` shares, at least 1.

  `name` and `index` say where the batch came from in messages ("`evaluate(
  batches=...)` batch 2"); `shapes=False` refuses `jax.ShapeDtypeStruct` leaves,
  for a call that runs the batch.
  """
  label = f"`{where}({name}=...)`" + ("" if index is None else f" batch {index}")
  if not isinstance(batch, tuple) or not jax.tree.leaves(batch):
    raise TypeError(
      f"{label} must be a tuple of the arguments after the parameters, holding arrays "
      f"(or jax.ShapeDtypeStruct) with a leading batch axis, got {_kind_of(batch)}."
    )
  check_array_leaves(label, batch, shapes=shapes)
  leaves = jax.tree_util.tree_flatten_with_path(batch)[0]
  for path, leaf in leaves:
    if not leaf.shape:
      raise ValueError(
        f"{label} leaves need a leading batch axis, but the leaf at {_validation.place(path)} is a "
        f"scalar ({leaf_text(leaf)})."
      )
  sizes = sorted({int(leaf.shape[0]) for _, leaf in leaves})
  if len(sizes) != 1:
    raise ValueError(
      f"{label} leaves must share one leading batch axis, got leading sizes "
      f"{', '.join(map(str, sizes))}."
    )
  if sizes[0] == 0:
    raise ValueError(f"{label} has no examples: its leading batch axis has size 0.")
  return sizes[0]


def _kind_of(value: object) -> str:
  """What `value` is, in a few words, for a message: "a list", "a jax.Array of shape (8, 4)"."""
  if isinstance(value, tuple):
    return f"a tuple with no arrays: {value!r}"
  names = {jax.Array: "jax.Array", np.ndarray: "numpy.ndarray"}
  kind = next((name for cls, name in names.items() if isinstance(value, cls)), type(value).__name__)
  shape = getattr(value, "shape", None)
  article = "an" if kind[:1].lower() in "aeiou" else "a"
  return f"{article} {kind}" + ("" if shape is None else f" of shape {tuple(shape)}")


class _Text(str):
  """A string that shows itself without quotes inside a container's repr."""

  def __repr__(self) -> str:
    return str(self)


def leaf_text(leaf: ArrayLike | jax.ShapeDtypeStruct) -> str:
  """An array's dtype and shape, "float32[8, 4]"; "float32[]" for a scalar."""
  return f"{jnp.dtype(leaf.dtype).name}{list(jnp.shape(leaf))}"  # type: ignore[union-attr]


def tree_text(tree: PyTree) -> str:
  """A tree with each array leaf as its dtype and shape: "(float32[], {'w': float32[4]})"."""
  return repr(jax.tree.map(lambda leaf: _Text(leaf_text(leaf)), tree))


def check_array_leaves(label: str, tree: PyTree, *, shapes: bool) -> None:
  """Checks that every leaf of `tree` is an array of numbers (or, where `shapes`, a shape).

  `label` names the argument ("`plan(params=...)`"). A Python number or list
  leaf is refused rather than guessed at: its dtype would be JAX's choice.
  """
  kinds: tuple[type, ...] = (jax.Array, np.ndarray)
  if shapes:
    kinds += (jax.ShapeDtypeStruct,)
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if isinstance(leaf, kinds) and (not isinstance(leaf, np.ndarray) or leaf.dtype.kind in "biufc"):
      continue
    if isinstance(leaf, jax.ShapeDtypeStruct):
      shown = f"a jax.ShapeDtypeStruct, {leaf_text(leaf)}"
      hint = (
        ": this call runs the step, so it needs values (`optaccum.planning.plan` takes shapes)."
      )
    elif isinstance(leaf, np.ndarray):
      shown, hint = f"a numpy.ndarray of dtype {leaf.dtype}", "."
    else:
      text = repr(leaf)
      shown = f"{_kind_of(leaf)}: {text if len(text) <= 60 else text[:57] + '...'}"
      hint = ". Pass jnp.asarray(...) of the dtype you mean."
    raise TypeError(
      f"{label} must hold arrays{' or jax.ShapeDtypeStruct' if shapes else ''} of numbers, but "
      f"the leaf at {_validation.place(path)} is {shown}{hint}"
    )


def abstract(tree: PyTree) -> PyTree:
  """`tree` with each array leaf as a `jax.ShapeDtypeStruct` (its sharding kept)."""

  def leaf(x: ArrayLike | jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
    if isinstance(x, jax.ShapeDtypeStruct):
      return x
    return jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x), sharding=_sharding(x))

  return jax.tree.map(leaf, tree)


def _sharding(x: ArrayLike) -> jax.sharding.NamedSharding | None:
  sharding = getattr(x, "sharding", None)
  return sharding if isinstance(sharding, jax.sharding.NamedSharding) else None


def micro_batch(batch: tuple[PyTree, ...], k: int) -> tuple[PyTree, ...]:
  """The abstract shape of one micro-batch of `batch`: the leading axis divided by k.

  It keeps the batch's sharding: a micro-batch of a batch sharded over the
  data axis lies sharded the same way.
  """

  def leaf(x: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
    shape = (x.shape[0] // k, *x.shape[1:])
    return jax.ShapeDtypeStruct(shape, x.dtype, sharding=x.sharding)

  return jax.tree.map(leaf, abstract(batch))


def unsplit_step(grad_fn: ValueAndGradFn, optimizer: optax.GradientTransformation) -> Step:
  """The plain training step: `(params, opt_state, *batch) -> (params, opt_state, loss)`."""

  def step(params: Params, opt_state: OptState, *batch: PyTree) -> tuple[Params, OptState, PyTree]:
    loss, grads = grad_fn(params, *batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def accumulate_step(grad_fn: ValueAndGradFn, tx: optax.GradientTransformation) -> Step:
  """The across-steps form: one micro-batch into `tx = accumulate(...)`, by the fast path."""

  def step(params: Params, opt_state: OptState, *batch: PyTree) -> tuple[Params, OptState, PyTree]:
    loss, grads = grad_fn(params, *batch)
    params, opt_state = apply_gradients(tx, grads, opt_state, params)
    return params, opt_state, loss

  return step


def compile_step(
  form: str,
  k: int,
  grad_fn: ValueAndGradFn,
  params: Params,
  optimizer: optax.GradientTransformation,
  batch: tuple[PyTree, ...],
  has_aux: bool,
  axis_name: str | tuple[str, ...] | None = None,
) -> tuple[jax.stages.Compiled, optax.GradientTransformation]:
  """One configuration's step compiled for these shapes, and the transformation it steps.

  `form` is "unsplit" (k = 1), "microbatch" or "accumulate" (whose step takes
  one micro-batch), each with its replicas reduced once per step or window
  where `axis_name` is given. The parameters and the optimizer state are
  donated, as `jax.jit(step, donate_argnums=(0, 1))` donates them.
  """
  params, batch = abstract(params), abstract(batch)
  tx: optax.GradientTransformation = optimizer
  if form == "unsplit":
    step = unsplit_step(grad_fn, optimizer)
  elif form == "microbatch":
    split = microbatch(grad_fn, k, has_aux=has_aux, axis_name=axis_name)
    step = unsplit_step(split, optimizer)
  else:
    tx = accumulate(optimizer, k, axis_name=axis_name)
    if axis_name is not None:
      grad_fn = per_replica(grad_fn, axis_name=axis_name)
    step, batch = accumulate_step(grad_fn, tx), micro_batch(batch, k)
  opt_state = _abstract_state(tx, params, placed=axis_name is not None)
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, *batch).compile()
  return compiled, tx


def _abstract_state(tx: optax.GradientTransformation, params: Params, *, placed: bool) -> OptState:
  """`tx.init(params)`'s shapes; `placed`: with the shardings the compiled `init` gives them.

  Per-replica accumulators lie over the replica axes; on an Auto mesh only
  the compiled `init` knows where.
  """
  shapes = jax.eval_shape(tx.init, params)
  if not placed:
    return shapes
  shardings = jax.jit(tx.init).lower(params).compile().output_shardings
  return jax.tree.map(
    lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
    shapes,
    shardings,
  )


def _row(form: str, k: int, batch_size: int, memory: MemoryAnalysis, budget: int) -> PlanRow:
  sizes = dict(
    temporaries=int(memory.temp_size_in_bytes),
    arguments=int(memory.argument_size_in_bytes),
    outputs=int(memory.output_size_in_bytes),
    aliased=int(memory.alias_size_in_bytes),
  )
  total = memory_total(memory)
  return PlanRow(form, k, batch_size // k, **sizes, total=total, fits=total <= budget)


def memory_analysis(compiled: jax.stages.Compiled) -> MemoryAnalysis:
  """XLA's memory analysis of a compiled step.

  JAX types it as optional, None on a backend that has none; CPU, GPU and TPU have one.
  """
  return cast(MemoryAnalysis, compiled.memory_analysis())


def memory_total(memory: MemoryAnalysis) -> int:
  """What a compiled step holds at once: arguments + outputs - donated and reused + temporaries."""
  return int(
    memory.argument_size_in_bytes
    + memory.output_size_in_bytes
    - memory.alias_size_in_bytes
    + memory.temp_size_in_bytes
  )


def _candidates(batch_size: int, candidates: object, replicas: int) -> list[int]:
  """The candidate k's, ascending: every divisor of the batch by default.

  Across replicas, each k must leave micro-batches that divide among them.
  """
  if candidates is None:
    ks = [k for k in range(1, batch_size + 1) if batch_size % k == 0]
    ks = [k for k in ks if (batch_size // k) % replicas == 0]
    if not ks:
      raise ValueError(
        f"`{_WHERE}(batch=...)` of {batch_size} examples does not divide among the "
        f"{replicas} replicas of axis_name."
      )
    return ks
  ks = dividing_ks(_WHERE, "candidates", candidates, batch_size)
  for k in ks:
    if (batch_size // k) % replicas:
      raise ValueError(
        f"`{_WHERE}(candidates=...)`: k={k} leaves micro-batches of {batch_size // k} "
        f"examples, which do not divide among the {replicas} replicas of axis_name."
      )
  return ks


def dividing_ks(where: str, name: str, values: object, batch_size: int) -> list[int]:
  """`values`, a non-empty sequence of positive ints that divide the batch, sorted and unique."""
  if isinstance(values, int | str) or not isinstance(values, Sequence) or not values:
    raise TypeError(
      f"`{where}({name}=...)` must be a non-empty sequence of positive ints, got {name}={values!r}."
    )
  for k in values:
    _validation.check_positive_int(where, name, k)
    if batch_size % k:
      raise ValueError(f"`{where}({name}=...)` must divide the batch of {batch_size}, got {k}.")
  return sorted(set(int(k) for k in values))


def _chosen(rows: list[PlanRow], form: str, budget: int) -> int:
  """The smallest k of `form` (or unsplit) that fits; a ValueError when none does."""
  own = [row for row in rows if row.form in (form, "unsplit")]
  fitting = [row.k for row in own if row.fits]
  if fitting:
    return min(fitting)
  smallest = min(own, key=lambda row: row.total)
  raise ValueError(
    f"`{_WHERE}(budget=...)` of {budget:,} bytes is less than any {form} step needs: the "
    f"smallest total seen is {smallest.total:,} bytes, at k={smallest.k} (micro-batches of "
    f"{smallest.micro_batch_size}). Give more memory, a smaller model or optimizer state, "
    "or a smaller batch."
  )


def plan(
  grad_fn: ValueAndGradFn,
  params: Params,
  optimizer: optax.GradientTransformation,
  batch: tuple[PyTree, ...],
  *,
  budget: int | str | None = None,
  has_aux: bool = False,
  candidates: Sequence[int] | None = None,
  forms: Sequence[str] = FORMS,
  axis_name: str | Sequence[str] | None = None,
) -> Plan:
  """Chooses the number of micro-batches k from a memory budget, by compiling, never running.

  For each candidate k (by default every divisor of the batch B), it compiles
  one training step for these shapes and reads XLA's compiled memory
  analysis: the unsplit step (k = 1, the optimizer every step), the in-step
  form (`optaccum.microbatch(grad_fn, k)` then the optimizer) and the
  across-steps form (a micro-batch of B / k through `optaccum.accumulate(
  optimizer, k)`'s fast path, `optaccum.apply_gradients`). Parameters and
  optimizer state are donated, as `jax.jit(step, donate_argnums=(0, 1))`
  would donate them, so a step's total is its arguments and outputs, less
  the buffers the outputs reuse, plus its temporaries. For each form it
  returns the smallest k whose total fits: the largest micro-batch.

  Args:
    grad_fn: a function like `jax.value_and_grad(loss)`: `(params, *batch) ->
      (loss, grads)`, or `((loss, aux), grads)` with `has_aux=True`.
    params: the parameters, as arrays or `jax.ShapeDtypeStruct` leaves.
    optimizer: the optax optimizer (the inner optimizer of the accumulation).
    batch: a tuple of the arguments after the parameters, a global batch:
      arrays or `jax.ShapeDtypeStruct` with a shared leading axis B.
    budget: bytes the step may hold, an int or a size such as "300KiB" or
      "16GiB". None (default): the device's limit, where JAX reports one
      (`memory_stats()["bytes_limit"]` on GPU and TPU); on the CPU it must be
      given.
    has_aux: whether `grad_fn` returns aux outputs.
    candidates: the k to compile, each dividing B; None (default) compiles
      every divisor.
    forms: which forms to plan, any of "microbatch" and "accumulate".
    axis_name: a mesh axis (or tuple of axes) of the mesh in context
      (`jax.set_mesh`) over which the batch is split among replicas. Each
      planned form is then compiled twice for each k: as it is (the gradient
      reduced over the replicas on every micro-batch, as XLA places it) and
      with the reduction deferred to once per window (`axis_name=`, rows
      "microbatch(axis_name)" and "accumulate(axis_name)"). Under pure FSDP the
      deferred form holds a full-size gradient per device: compare their
      totals (guide: docs/distributed.md). Candidates must leave a micro-batch
      that divides among the replicas.

  Returns:
    A `Plan`: the k chosen for each form planned (None for one not planned),
    and every compiled row (`Plan.table()` prints them).

  Raises:
    TypeError: for a `grad_fn` that does not return `(loss, grads)` (checked
      by `jax.eval_shape` on the first micro-batch, before anything compiles:
      `jax.grad(loss)` is refused, naming `jax.value_and_grad(loss)`; so is a
      loss that is a Python number, not an array), a leaf of `params` or
      `batch` that is not an array or shape, or a leaf of `params` that is
      not floating-point or complex (`grad_fn` differentiates them).
    ValueError: for a bad budget or candidate, a batch with no examples or
      without one shared leading axis, or when no candidate of a planned form
      fits the budget (the message gives the smallest total seen).

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optaccum
    >>> def loss(w, x):
    ...   return jnp.mean(jnp.tanh(x @ w) ** 2)
    >>> w = jax.ShapeDtypeStruct((64, 64), jnp.float32)
    >>> x = jax.ShapeDtypeStruct((256, 64), jnp.float32)
    >>> chosen = optaccum.planning.plan(
    ...   jax.value_and_grad(loss), w, optax.sgd(0.1, momentum=0.9), (x,),
    ...   budget="180KiB", candidates=[1, 2, 4, 8],
    ... )
    >>> chosen.microbatch, chosen.accumulate  # the accumulate form's batch argument is smaller
    (4, 2)
  """
  check_step_arguments(_WHERE, grad_fn, optimizer, has_aux)
  plan_forms = _check_forms(forms)
  check_array_leaves(f"`{_WHERE}(params=...)`", params, shapes=True)
  batch_size = batch_size_of(_WHERE, batch)
  budget = device_budget(_WHERE) if budget is None else parse_bytes(_WHERE, "budget", budget)
  axes = None if axis_name is None else _replicas.check_axes(_WHERE, axis_name)
  ks = _candidates(batch_size, candidates, 1 if axes is None else _replicas.count(_WHERE, axes))
  check_grad_fn(_WHERE, grad_fn, params, micro_batch(batch, ks[0]), has_aux)
  params = abstract(params)
  rows = []
  for k in ks:
    rows += [
      _row(form, k, batch_size, memory, budget)
      for form, memory in _compile_candidate(
        grad_fn, params, optimizer, batch, k, has_aux, plan_forms, axes
      )
    ]
  planned = plan_forms + (() if axes is None else tuple(f"{f}(axis_name)" for f in plan_forms))
  chosen = {form: _chosen(rows, form, budget) for form in planned}
  return Plan(
    chosen.get("microbatch"),
    chosen.get("accumulate"),
    budget,
    batch_size,
    tuple(rows),
    microbatch_deferred=chosen.get("microbatch(axis_name)"),
    accumulate_deferred=chosen.get("accumulate(axis_name)"),
  )


def check_step_arguments(where: str, grad_fn: object, optimizer: object, has_aux: object) -> None:
  """Checks the arguments `plan` and `evaluate` share, naming `where` in each message."""
  if not callable(grad_fn):
    raise TypeError(f"`{where}(grad_fn=...)` must be callable, got grad_fn={grad_fn!r}.")
  if not isinstance(optimizer, optax.GradientTransformation):
    raise TypeError(
      f"`{where}(optimizer=...)` must be an optax.GradientTransformation, "
      f"got optimizer={optimizer!r}."
    )
  if not isinstance(has_aux, bool):
    raise TypeError(f"`{where}(has_aux=...)` must be a bool, got has_aux={has_aux!r}.")


def check_grad_fn(
  where: str, grad_fn: ValueAndGradFn, params: Params, batch: tuple[PyTree, ...], has_aux: bool
) -> None:
  """Checks `params`, and by `jax.eval_shape` on one micro-batch that `grad_fn` suits them.

  `grad_fn` must return `(loss, grads)`.

  Run before anything compiles, so that `jax.grad(loss)` in place of
  `jax.value_and_grad(loss)` is named here rather than failing to unpack inside a step.
  `plan` and `evaluate` share it: both take `params` of floating-point (or
  complex) leaves, which `grad_fn` differentiates, and both refuse a loss that
  is a Python number rather than an array computed from the batch (the
  in-step form sums the micro-batches' losses as arrays).
  """
  check_differentiable(where, params)
  returned: list[object] = []

  def probe(*args: PyTree) -> PyTree:
    out = grad_fn(*args)
    returned.append(_loss_in(out, has_aux))
    return out

  out = jax.eval_shape(probe, abstract(params), *abstract(batch))
  expected, call = ("(loss, grads)", "jax.value_and_grad(loss)")
  if has_aux:
    expected, call = ("((loss, aux), grads)", "jax.value_and_grad(loss, has_aux=True)")
  problem = _grad_fn_problem(out, abstract(params), has_aux, call)
  if problem is None and not isinstance(returned[0], jax.Array):
    problem = (
      f"its loss is {_kind_of(returned[0])} ({returned[0]!r}), not an array computed from the "
      "batch: return the loss as JAX computes it."
    )
  if problem is None:
    return
  raise TypeError(
    f"`{where}(grad_fn=...)` must return {expected} like {call}, but on the first "
    f"micro-batch {problem}"
  )


def check_differentiable(where: str, params: Params) -> None:
  """Raises naming `where(params=...)` where a leaf is not floating-point or complex.

  `grad_fn` differentiates the parameters, and `jax.grad` refuses integer and
  bool inputs from deep inside the trace.
  """
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    if not jnp.issubdtype(leaf.dtype, jnp.inexact):
      raise TypeError(
        f"`{where}(params=...)` must hold floating-point (or complex) arrays, which grad_fn "
        f"differentiates, but the leaf at {_validation.place(path)} is {leaf_text(leaf)}."
      )


def _loss_in(out: PyTree, has_aux: bool) -> object:
  """The loss in `grad_fn`'s output `out`, as returned; None where `out` holds none."""
  if not (isinstance(out, tuple | list) and len(out) == 2):
    return None
  value = out[0]
  if has_aux:
    value = value[0] if isinstance(value, tuple | list) and len(value) == 2 else None
  return value


def _grad_fn_problem(out: PyTree, params: PyTree, has_aux: bool, call: str) -> str | None:
  """What is wrong with `grad_fn`'s abstract output `out`, with the fix; None if nothing."""
  value_and_grad = f"jax.grad(loss) returns the gradients alone: pass {call}"
  if not (isinstance(out, tuple | list) and len(out) == 2):
    return f"it returned {tree_text(out)}. {value_and_grad}."
  value, grads = out
  if has_aux and not (isinstance(value, tuple | list) and len(value) == 2):
    return f"its first output is {tree_text(value)}, not (loss, aux)."
  if not has_aux and isinstance(value, tuple | list):
    return f"its first output is {tree_text(value)}: pass has_aux=True if it is (loss, aux)."
  loss = value[0] if has_aux else value
  if not isinstance(loss, jax.ShapeDtypeStruct) or loss.shape != ():
    return f"its loss is {tree_text(loss)}, not a scalar. {value_and_grad}."
  structure = jax.tree.structure(grads)
  same = structure == jax.tree.structure(params) and all(  # type: ignore[operator]  # no stubs
    jnp.shape(g) == p.shape for g, p in zip(jax.tree.leaves(grads), jax.tree.leaves(params))
  )
  if not same:
    return (
      f"its gradients {tree_text(grads)} do not match params {tree_text(params)}. {value_and_grad}."
    )
  return None


def _check_forms(forms: Sequence[str]) -> tuple[str, ...]:
  if isinstance(forms, str) or not forms or any(form not in FORMS for form in forms):
    raise ValueError(
      f"`{_WHERE}(forms=...)` must be a non-empty sequence of {', '.join(map(repr, FORMS))}, "
      f"got forms={forms!r}."
    )
  return tuple(dict.fromkeys(forms))


def _compile_candidate(
  grad_fn: ValueAndGradFn,
  params: Params,
  optimizer: optax.GradientTransformation,
  batch: tuple[PyTree, ...],
  k: int,
  has_aux: bool,
  forms: tuple[str, ...],
  axes: tuple[str, ...] | None = None,
) -> list[tuple[str, MemoryAnalysis]]:
  """(form, memory analysis) for each form at k; at k = 1 the one unsplit step.

  With `axes`, each form as it is and with its reduction deferred, in that order.
  """
  variants: list[tuple[str, tuple[str, ...] | None]] = [(form, None) for form in forms]
  if axes is not None:
    variants = [v for form in forms for v in ((form, None), (f"{form}(axis_name)", axes))]
  if k == 1:
    variants = [("unsplit", None)]
  out = []
  for label, axis_name in variants:
    form = label.split("(")[0]
    step = compile_step(form, k, grad_fn, params, optimizer, batch, has_aux, axis_name)[0]
    out.append((label, memory_analysis(step)))
  return out

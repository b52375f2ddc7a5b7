"""The ways to train that the benchmarks compare, each built from one gradient function.

A method is a few pure programs `(params, state, batch) -> (params, state)`
and a plan: which program runs on which micro-batch during one window of k
micro-steps. Every method gets the same `grad_fn(params, batch) -> (loss,
grads)`: a model's `value_and_grad` for end-to-end training, or a function
that returns the batch itself as the gradients for the optimizer-only micro-step.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

import optaccum

GradFn = Callable[[Any, Any], tuple[Any, Any]]
Program = Callable[[Any, Any, Any], tuple[Any, Any]]

# The branching strategy `accumulate` uses unless told otherwise.
DEFAULT_STRATEGY = inspect.signature(optaccum.accumulate).parameters["strategy"].default

# A plan entry names a program and its batch: micro-batch i, the whole
# window's batch ("whole"), or no batch (None).
WHOLE = "whole"


@dataclasses.dataclass(frozen=True)
class Workload:
  """What the methods train: parameters, one window of data, a gradient function.

  Attributes:
    key: a short identifier (command line, file names).
    title: the section heading.
    description: the configuration, in words.
    params: initial parameters.
    micro_batches: the window's k micro-batches.
    whole_batch: the same data as one batch of k micro-batches, or None.
    grad_fn: `(params, batch) -> (loss, grads)`.
    with_model: whether batches are model inputs (else they are the gradients).
  """

  key: str
  title: str
  description: str
  params: Any
  micro_batches: list[Any]
  whole_batch: Any
  grad_fn: GradFn
  with_model: bool


@dataclasses.dataclass(frozen=True)
class Method:
  """One way to train: its programs and the calls that make one window.

  Attributes:
    name: the label in tables and charts.
    family: what the row shows: "reference", "optaccum", "alternative" or
      "strategy" (a branching strategy other than the backend's default).
    init: `params -> state`.
    programs: name -> pure `(params, state, batch) -> (params, state)`.
    plan: one window's calls, in order, as (program name, batch).
    form: which limit the method is held to: "fast" (parameters written only
      when a window closes: the floor plus the amortized optimizer),
      "transformation" (a functional transformation, whose caller writes the
      parameters on every micro-step: that write on top), or "" (none).
  """

  name: str
  family: str
  init: Callable[[Any], Any]
  programs: dict[str, Program]
  plan: tuple[tuple[str, Any], ...]
  form: str = ""


def _every_micro_step(every_k: int) -> tuple[tuple[str, Any], ...]:
  return tuple(("step", index) for index in range(every_k))


def plain(inner: optax.GradientTransformation, grad_fn: GradFn, every_k: int) -> Method:
  """No accumulation: the optimizer runs on every micro-batch."""

  def step(params: Any, state: Any, batch: Any) -> tuple[Any, Any]:
    _, grads = grad_fn(params, batch)
    updates, state = inner.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return Method(
    "plain: optimizer every micro-step",
    "reference",
    inner.init,
    {"step": step},
    _every_micro_step(every_k),
  )


def floor(grad_fn: GradFn, every_k: int) -> Method:
  """The least any accumulation does per micro-step: the gradient and `acc + g`."""

  def step(params: Any, acc: Any, batch: Any) -> tuple[Any, Any]:
    _, grads = grad_fn(params, batch)
    return params, jax.tree.map(lambda a, g: a + g.astype(a.dtype), acc, grads)

  def init(params: Any) -> Any:
    return jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)

  return Method(
    "floor: acc + g, no optimizer", "reference", init, {"step": step}, _every_micro_step(every_k)
  )


def parameter_write(every_k: int) -> Method:
  """What a functional transformation's caller adds to every micro-step: `p + where(emitted, u, 0)`.

  Alone, on updates kept in the state: the floor's gradient and add are timed
  by `floor`, and the limit of the transformation form is the two together.
  """

  def step(params: Any, state: Any, batch: Any) -> tuple[Any, Any]:
    updates, emitted = state
    masked = jax.tree.map(lambda u: jnp.where(emitted, u, jnp.zeros((), u.dtype)), updates)
    return optax.apply_updates(params, masked), state

  def init(params: Any) -> Any:
    return jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.bool_)

  return Method(
    "parameter write: p + where(emitted, u, 0)",
    "reference",
    init,
    {"step": step},
    _every_micro_step(every_k),
  )


def transformation(
  name: str, family: str, tx: optax.GradientTransformation, grad_fn: GradFn, every_k: int
) -> Method:
  """`tx.update` then `optax.apply_updates` on every micro-step."""

  def step(params: Any, state: Any, batch: Any) -> tuple[Any, Any]:
    _, grads = grad_fn(params, batch)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return Method(name, family, tx.init, {"step": step}, _every_micro_step(every_k), "transformation")


def fast_path(
  name: str, family: str, tx: optax.GradientTransformation, grad_fn: GradFn, every_k: int
) -> Method:
  """`optaccum.apply_gradients` on every micro-step."""

  def step(params: Any, state: Any, batch: Any) -> tuple[Any, Any]:
    _, grads = grad_fn(params, batch)
    return optaccum.apply_gradients(tx, grads, state, params)

  return Method(name, family, tx.init, {"step": step}, _every_micro_step(every_k), "fast")


def hand_written(inner: optax.GradientTransformation, grad_fn: GradFn, every_k: int) -> Method:
  """What a user writes by hand: sum into a float32 tree, update every k-th step.

  Two jitted programs and a Python-level branch: the cheapest possible
  non-emitting micro-step, paid for with a second dispatch on the emitting one.
  """

  def accumulate(params: Any, state: Any, batch: Any) -> tuple[Any, Any]:
    opt_state, acc = state
    _, grads = grad_fn(params, batch)
    return params, (opt_state, jax.tree.map(lambda a, g: a + g.astype(a.dtype), acc, grads))

  def update(params: Any, state: Any, _: Any) -> tuple[Any, Any]:
    opt_state, acc = state
    mean = jax.tree.map(lambda a, p: (a / every_k).astype(p.dtype), acc, params)
    updates, opt_state = inner.update(mean, opt_state, params)
    return optax.apply_updates(params, updates), (opt_state, jax.tree.map(jnp.zeros_like, acc))

  def init(params: Any) -> Any:
    return inner.init(params), jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)

  plan = tuple(("accumulate", index) for index in range(every_k)) + (("update", None),)
  return Method(
    "hand-written loop (Python branch)",
    "alternative",
    init,
    {"accumulate": accumulate, "update": update},
    plan,
    "fast",
  )


def in_step_microbatching(
  inner: optax.GradientTransformation, grad_fn: GradFn, every_k: int
) -> Method | None:
  """`optaccum.microbatch`: one step over the window's whole batch, scanned in k slices.

  None where this version of optaccum has no `microbatch`.
  """
  microbatch = getattr(optaccum, "microbatch", None)
  if microbatch is None:
    return None
  split_grad_fn = microbatch(grad_fn, every_k)

  def step(params: Any, state: Any, batch: Any) -> tuple[Any, Any]:
    _, grads = split_grad_fn(params, batch)
    updates, state = inner.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return Method(
    "optaccum.microbatch (in-step)", "optaccum", inner.init, {"step": step}, (("step", WHOLE),)
  )


def all_methods(
  workload: Workload,
  make_inner: Callable[[], optax.GradientTransformation],
  *,
  complete: bool = True,
) -> list[Method]:
  """Every compared method for `workload`, in table order.

  Args:
    workload: what to train; its number of micro-batches is k.
    make_inner: builds the optimizer (adamw) each method wraps.
    complete: all methods, and the branching strategies other than the
      default; else only plain training, optaccum's methods and
      optax.MultiSteps (for quick runs: each method is one more compilation).
  """
  grad_fn, every_k = workload.grad_fn, len(workload.micro_batches)
  inner = make_inner()
  default = DEFAULT_STRATEGY
  methods = [plain(inner, grad_fn, every_k), floor(grad_fn, every_k)]
  methods.append(parameter_write(every_k))
  methods += [
    fast_path(
      f'optaccum.apply_gradients (default: "{default}")',
      "optaccum",
      optaccum.accumulate(inner, every_k),
      grad_fn,
      every_k,
    ),
    transformation(
      f'optaccum.accumulate (default: "{default}")',
      "optaccum",
      optaccum.accumulate(inner, every_k),
      grad_fn,
      every_k,
    ),
  ]
  if complete:
    # The per-micro-batch guard on top of the default, and no guard at all (as
    # the hand-written loop and optax run): what the default's safety costs.
    per_micro_batch = optaccum.accumulate(inner, every_k, skip=optaccum.skip.not_finite)
    unguarded = optaccum.accumulate(inner, every_k, window_guard=False)
    for label, tx in (
      ("skip=skip_not_finite", per_micro_batch),
      ("window_guard=False", unguarded),
    ):
      methods.append(
        fast_path(f"optaccum.apply_gradients({label})", "optaccum", tx, grad_fn, every_k)
      )
      methods.append(
        transformation(f"optaccum.accumulate({label})", "optaccum", tx, grad_fn, every_k)
      )
  if workload.with_model:
    split = in_step_microbatching(inner, grad_fn, every_k)
    if split is not None:
      methods.append(split)
  methods.append(
    transformation(
      "optax.MultiSteps",
      "alternative",
      optax.MultiSteps(inner, every_k).gradient_transformation(),
      grad_fn,
      every_k,
    )
  )
  if not complete:
    return methods
  methods += [
    transformation(
      "optax.chain(adamw, apply_every(k))",
      "alternative",
      optax.chain(make_inner(), optax.apply_every(every_k)),
      grad_fn,
      every_k,
    ),
    hand_written(inner, grad_fn, every_k),
  ]
  for strategy in ("loop", "cond", "select"):
    if strategy == default:
      continue
    tx = optaccum.accumulate(inner, every_k, strategy=strategy)
    methods.append(
      fast_path(
        f'optaccum.apply_gradients (strategy="{strategy}")', "strategy", tx, grad_fn, every_k
      )
    )
    methods.append(
      transformation(
        f'optaccum.accumulate (strategy="{strategy}")', "strategy", tx, grad_fn, every_k
      )
    )
  return methods

"""optaccum beside its peers in Optax: measured side by side, and checked by running them.

Two workloads, an activation-heavy MLP and a small decoder-only language model,
each at a fixed batch of B examples split into k micro-batches (k in 2, 4, 8).
For each k, one process compiles and times, interleaved, the ways to train on
that batch:

* the large batch: one AdamW step on all B examples (the reference);
* in one step: `optaccum.microbatch` and `optax.microbatching.microbatch`
  (a `lax.scan` or `lax.fori_loop` over the k slices), then AdamW;
* across k steps: `optaccum.apply_gradients`, `optaccum.accumulate` and
  `optax.MultiSteps` around AdamW, one micro-batch per step.

Each row gives the time to train on the B examples (median over interleaved
rounds, as a ratio), the compiled temporaries of its program (XLA's memory
analysis) and the largest parameter difference from the large batch after the
same windows. Then each behaviour the README states about Optax is run
against the installed Optax: k = 0, strict dtype promotion, NaN micro-batches,
weights, bfloat16 sums, PRNG keys, NNX modules, how often the inner optimizer
runs, and all-reduces per step on 8 simulated devices (in a child process).

Run: python -m benchmarks.peers [--quick] [--rounds N]. Prints markdown tables,
then everything as one JSON line. `--quick` runs tiny sizes for CI, marked as
not being measurements.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax import microbatching

import optaccum
from benchmarks import _measure, _methods, lm
from benchmarks._methods import WHOLE, Method, Workload

ROOT = Path(__file__).resolve().parent.parent
MEAN = microbatching.AccumulationType.MEAN


@dataclasses.dataclass(frozen=True)
class MlpConfig:
  """An MLP applied at every position of each example: activations outweigh parameters."""

  batch: int
  positions: int
  features: int
  hidden: int
  depth: int


MLP = MlpConfig(batch=256, positions=16, features=64, hidden=256, depth=3)
QUICK_MLP = MlpConfig(batch=16, positions=2, features=8, hidden=16, depth=2)
# The language model's batch, in sequences.
LM = lm.LanguageModelConfig(512, 128, 2, 4, 64, micro_batch=32)
QUICK_LM = lm.LanguageModelConfig(64, 16, 1, 2, 8, micro_batch=8)
KS, QUICK_KS = (2, 4, 8), (2,)


def _make_inner() -> optax.GradientTransformation:
  return optax.adamw(1e-3)


# --- Workloads ------------------------------------------------------------------------------


def mlp_workload(config: MlpConfig, k: int) -> Workload:
  """The MLP's batch of `config.batch` examples as k micro-batches."""
  rng = np.random.default_rng(0)
  sizes = [config.features] + [config.hidden] * config.depth + [config.features]
  params = [
    jnp.asarray(rng.normal(size=(n, m)) / np.sqrt(n), jnp.float32) for n, m in zip(sizes, sizes[1:])
  ]
  shape = (config.batch, config.positions, config.features)
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  y = jnp.asarray(rng.normal(size=shape), jnp.float32)

  def loss(params: Any, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
    h, target = batch
    for w in params[:-1]:
      h = jnp.tanh(h @ w)
    return jnp.mean((h @ params[-1] - target) ** 2)

  size = config.batch // k
  num_params = sum(w.size for w in params)
  return Workload(
    key="mlp",
    title="(a) MLP, activation-heavy",
    description=(
      f"{num_params / 1e3:.0f}k float32 params: {config.depth} tanh layers of {config.hidden} "
      f"at each of {config.positions} positions of {config.features} features; "
      f"batch {config.batch}; adamw"
    ),
    params=params,
    micro_batches=[(x[i * size : (i + 1) * size], y[i * size : (i + 1) * size]) for i in range(k)],
    whole_batch=(x, y),
    grad_fn=jax.value_and_grad(loss),
    with_model=True,
  )


def lm_workload(config: lm.LanguageModelConfig, k: int) -> Workload:
  """The language model's batch of `config.micro_batch` sequences as k micro-batches."""
  split = dataclasses.replace(config, micro_batch=config.micro_batch // k)
  workload = lm.workload("lm", "(b) Transformer LM", split, k)
  num_params = sum(leaf.size for leaf in jax.tree.leaves(workload.params))
  description = (
    f"{num_params / 1e6:.2f}M float32 params: vocab {config.vocab_size}, d_model "
    f"{config.d_model}, {config.num_layers} block(s) of {config.num_heads} heads, seq "
    f"{config.seq_len}; batch {config.micro_batch} sequences; adamw"
  )
  return dataclasses.replace(workload, description=description)


# --- Methods ----------------------------------------------------------------------------------


def _one_step(name: str, family: str, inner: optax.GradientTransformation, grad_fn: Any) -> Method:
  """One optimizer step on the whole batch, its gradient from `grad_fn`."""

  def step(params: Any, state: Any, batch: Any) -> tuple[Any, Any]:
    _, grads = grad_fn(params, batch)
    updates, state = inner.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return Method(name, family, inner.init, {"step": step}, (("step", WHOLE),))


def methods(workload: Workload) -> list[Method]:
  """The large batch, then the in-step and the across-steps forms, for `workload`'s k."""
  grad_fn, k = workload.grad_fn, len(workload.micro_batches)
  batch = jax.tree.leaves(workload.whole_batch)[0].shape[0]
  inner = _make_inner()
  optax_split = microbatching.microbatch(
    grad_fn, argnums=1, microbatch_size=batch // k, accumulator=MEAN
  )
  tx = optaccum.accumulate(inner, k)
  return [
    _one_step("large batch", "reference", inner, grad_fn),
    _one_step("optaccum.microbatch", "in-step", inner, optaccum.microbatch(grad_fn, k)),
    _one_step("optax.microbatching.microbatch", "in-step", inner, optax_split),
    _methods.fast_path("optaccum.apply_gradients", "across", tx, grad_fn, k),
    _methods.transformation("optaccum.accumulate", "across", tx, grad_fn, k),
    _methods.transformation(
      "optax.MultiSteps", "across", optax.MultiSteps(inner, k).gradient_transformation(), grad_fn, k
    ),
  ]


# --- Measuring --------------------------------------------------------------------------------


def measure(
  workload: Workload, rounds: int, compiler_options: dict[str, Any] | None
) -> list[dict[str, Any]]:
  """Compiles each method once, times its window interleaved, compares its parameters.

  Every method trains its own copy of the parameters (donated) on the same
  batch: a warm-up window, then one window per round, so all end after the
  same windows and their parameters are compared with the large batch's.
  """
  table = methods(workload)

  def batch_for(key: Any) -> Any:
    return workload.whole_batch if key == WHOLE else workload.micro_batches[key]

  executables, live, memory = {}, {}, {}
  for method in table:
    params = jax.tree.map(jnp.copy, workload.params)
    state = jax.jit(method.init)(params)
    (program,) = method.programs.values()
    lowered = jax.jit(program, donate_argnums=(0, 1)).lower(
      params, state, batch_for(method.plan[0][1])
    )
    compiled = lowered.compile(compiler_options) if compiler_options else lowered.compile()
    executables[method.name] = compiled
    memory[method.name] = _measure.memory_of(executables[method.name])["temp"]
    live[method.name] = [params, state]

  def window(method: Method) -> float:
    holder, run = live[method.name], executables[method.name]

    def train() -> Any:
      for _, key in method.plan:
        holder[0], holder[1] = run(holder[0], holder[1], batch_for(key))
      return holder

    return _measure.timed(train)

  for method in table:
    window(method)
  seconds = _measure.interleaved_medians(
    {m.name: functools.partial(window, m) for m in table}, rounds
  )
  reference = live["large batch"][0]
  return [
    {
      "method": method.name,
      "family": method.family,
      "seconds": seconds[method.name],
      "temp_bytes": memory[method.name],
      **_largest_difference(live[method.name][0], reference),
      "windows": rounds + 1,
    }
    for method in table
  ]


def _largest_difference(params: Any, reference: Any) -> dict[str, Any]:
  """The largest absolute difference between two parameter trees, and the leaf it is in."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(params)
  value, leaf = max(
    (
      float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))),
      jax.tree_util.keystr(path),
    )
    for (path, a), b in zip(leaves, jax.tree.leaves(reference))
  )
  return {"max_param_difference": value, "max_param_difference_leaf": leaf}


# --- Behaviour, checked against the installed Optax -------------------------------------------


@dataclasses.dataclass(frozen=True)
class Check:
  """One behaviour, as run: what optaccum and Optax did, in words and as values."""

  feature: str
  optaccum: str
  optax: str
  facts: dict[str, Any]


class ClaimError(AssertionError):
  """A behaviour this script states no longer holds for the installed versions."""


def _claim(holds: bool, claim: str, facts: dict[str, Any]) -> None:
  if not holds:
    raise ClaimError(f"no longer true with optax {optax.__version__}: {claim}; found {facts}")


def _error(fn: Callable[[], Any]) -> str | None:
  """The name of the exception `fn` raises, or None."""
  try:
    fn()
  except Exception as error:  # any failure is the finding
    return type(error).__name__
  return None


def _window(tx: optax.GradientTransformation, grads: list[jax.Array], **extra: Any) -> list[Any]:
  """Each micro-step's `(updates, params)` of `tx` from ones(3) of the grads' dtype, jitted."""
  params = {"w": jnp.ones(3, grads[0].dtype)}
  state = tx.init(params)
  step = jax.jit(lambda g, s, p: tx.update({"w": g}, s, p, **extra))
  out = []
  for g in grads:
    updates, state = step(g, state, params)
    params = optax.apply_updates(params, updates)
    out.append((updates["w"], params["w"]))
  return out


def check_zero_k() -> Check:
  ones = [jnp.ones(3)] * 3
  multisteps = _window(optax.MultiSteps(optax.sgd(0.1), 0).gradient_transformation(), ones)
  every = _window(optax.chain(optax.sgd(0.1), optax.apply_every(0)), ones)
  facts = {
    "optaccum.accumulate": _error(lambda: optaccum.accumulate(optax.sgd(0.1), 0)),
    "optaccum.microbatch": _error(lambda: optaccum.microbatch(jax.value_and_grad(jnp.sum), 0)),
    "optax.MultiSteps emits only zeros": all(not jnp.any(u) for u, _ in multisteps),
    "optax.apply_every emits only zeros": all(not jnp.any(u) for u, _ in every),
    "optax.microbatching.microbatch": _error(
      lambda: microbatching.microbatch(jnp.sum, 0, 0)(jnp.ones(4))
    ),
  }
  _claim(
    list(facts.values()) == ["ValueError", "ValueError", True, True, "ZeroDivisionError"],
    "k = 0",
    facts,
  )
  return Check(
    "k = 0",
    "`ValueError` when built (`accumulate`, `microbatch`)",
    "`MultiSteps(opt, 0)`, `apply_every(0)`: accepted, then zero updates forever; "
    "`microbatch(microbatch_size=0)`: `ZeroDivisionError` at the call",
    facts,
  )


def _counting(inner: optax.GradientTransformation, calls: list[int]) -> Any:
  def update(updates: Any, state: Any, params: Any = None) -> Any:
    jax.debug.callback(lambda: calls.append(1))
    return inner.update(updates, state, params)

  return optax.GradientTransformation(inner.init, update)


def check_inner_runs() -> Check:
  facts = {}
  for name, wrap in (
    ("optaccum.accumulate", lambda inner: optaccum.accumulate(inner, 4)),
    ("optax.MultiSteps", lambda inner: optax.MultiSteps(inner, 4).gradient_transformation()),
    ("optax.apply_every", lambda inner: optax.chain(inner, optax.apply_every(4))),
  ):
    calls: list[int] = []
    _window(wrap(_counting(optax.adam(0.1), calls)), [jnp.ones(3)] * 8)
    jax.effects_barrier()
    facts[name] = len(calls)
  _claim(list(facts.values()) == [2, 8, 8], "inner runs 2, 8, 8 times", facts)
  return Check(
    "the inner optimizer runs, over 2 windows of 4 (a callback in it counts)",
    "2 times: once per window",
    "`MultiSteps`: 8 times, its result masked; `apply_every`: 8 times, summing Adam's updates",
    facts,
  )


def check_strict_promotion() -> Check:
  sgd = optax.sgd(1e-3, momentum=0.9)
  forms = {
    "optaccum.accumulate": optaccum.accumulate(sgd, 4),
    "optaccum.compat.MultiSteps": optaccum.compat.MultiSteps(sgd, 4).gradient_transformation(),
    "optax.MultiSteps": optax.MultiSteps(sgd, 4).gradient_transformation(),
    "optax.apply_every": optax.chain(sgd, optax.apply_every(4)),
    "SGD alone": sgd,
  }
  facts = {}
  for dtype in ("float32", "bfloat16"):
    for name, tx in forms.items():
      with jax.numpy_dtype_promotion("strict"):
        facts[f"{name}, {dtype}"] = _error(lambda: _window(tx, [jnp.ones(3, dtype)] * 4))
  grad_fn = jax.value_and_grad(lambda w, x: jnp.mean((x * w) ** 2))
  in_step = {
    "optaccum.microbatch": optaccum.microbatch(grad_fn, 4),
    "optax.microbatching.microbatch": microbatching.microbatch(
      grad_fn, argnums=1, microbatch_size=2, accumulator=MEAN
    ),
  }
  for name, fn in in_step.items():
    with jax.numpy_dtype_promotion("strict"):
      facts[f"{name}, bfloat16"] = _error(
        lambda: jax.jit(fn)(jnp.ones((), jnp.bfloat16), jnp.ones(8, jnp.bfloat16))
      )
  expected = [None, None, "TypePromotionError", "TypePromotionError", None] * 2 + [None] * 2
  _claim(list(facts.values()) == expected, "strict promotion outcomes", facts)
  return Check(
    "strict dtype promotion, float32 or bfloat16 grads and params (SGD with momentum, "
    "which passes alone)",
    "passes (`accumulate`, `compat.MultiSteps`, `microbatch`)",
    "`MultiSteps`, `apply_every`: `TypePromotionError` on the first `update`, both dtypes; "
    "`microbatching.microbatch`: passes",
    facts,
  )


def check_nan_across_steps() -> Check:
  """A NaN in micro-batch 2 of window 1, k = 4, then a clean window 2."""
  grads = [jnp.ones(3), jnp.array([jnp.nan, 1.0, 1.0])] + [jnp.ones(3)] * 6

  def first_bad(out: list[Any]) -> int | None:
    bad = [i + 1 for i, (_, p) in enumerate(out) if not jnp.all(jnp.isfinite(p))]
    return bad[0] if bad else None

  multisteps = _window(optax.MultiSteps(optax.adam(0.1), 4).gradient_transformation(), grads)
  skipping = optax.MultiSteps(optax.adam(0.1), 4, should_skip_update_fn=optax.skip_not_finite)
  tx = optaccum.accumulate(optax.adam(0.1), 4)
  params, state = {"w": jnp.ones(3)}, tx.init({"w": jnp.ones(3)})
  for g in grads:
    params, state = optaccum.apply_gradients(tx, {"w": g}, state, params)
  status = optaccum.status(state)
  facts = {
    "MultiSteps: params NaN from micro-step": first_bad(multisteps),
    "MultiSteps: window 2's update finite": bool(jnp.all(jnp.isfinite(multisteps[-1][0]))),
    "MultiSteps(skip_not_finite): params NaN from micro-step": first_bad(
      _window(skipping.gradient_transformation(), grads)
    ),
    "apply_every: params NaN from micro-step": first_bad(
      _window(optax.chain(optax.adam(0.1), optax.apply_every(4)), grads)
    ),
    "optaccum: params finite": bool(jnp.all(jnp.isfinite(params["w"]))),
    "optaccum: num_skipped_windows": int(status.num_skipped_windows),
    "optaccum: gradient_step": int(status.gradient_step),
  }
  _claim(list(facts.values()) == [2, False, None, 2, True, 1, 1], "NaN outcomes", facts)
  return Check(
    "a NaN in micro-batch 2 of a window of 4, then a clean window",
    "window 1 dropped and counted (`num_skipped_windows`), window 2 applied",
    "`MultiSteps`, `apply_every`: parameters NaN from micro-step 2 on (the masked update is "
    "0 × NaN); `MultiSteps`' window 2 is NaN too (its accumulator is reset by multiplying "
    "by 0); with `should_skip_update_fn=optax.skip_not_finite`: finite",
    facts,
  )


def check_nan_in_step() -> Check:
  x = jnp.ones((8, 3)).at[5, 0].set(jnp.nan)
  grad_fn = jax.value_and_grad(lambda w, x: jnp.mean((x @ w) ** 2))
  split = microbatching.microbatch(grad_fn, argnums=1, microbatch_size=2, accumulator=MEAN)
  facts = {
    "optaccum.microbatch grads finite": bool(
      jnp.all(jnp.isfinite(optaccum.microbatch(grad_fn, 4)(jnp.ones(3), x)[1]))
    ),
    "optax.microbatching grads finite": bool(jnp.all(jnp.isfinite(split(jnp.ones(3), x)[1]))),
  }
  _claim(not any(facts.values()), "both in-step forms return NaN gradients", facts)
  return Check(
    "a NaN in one micro-batch of a step",
    "NaN gradients, as unsplit (the optimizer's to guard: `optax.apply_if_finite`)",
    "NaN gradients, the same",
    facts,
  )


def check_weights() -> Check:
  """Gradients 1 and 3 with weights 10 and 1 (SGD, learning rate 1): the weighted mean is 13/11."""
  grads, weights = [jnp.ones(3), 3 * jnp.ones(3)], [10.0, 1.0]
  forms = {
    "optaccum.accumulate": optaccum.accumulate(optax.sgd(1.0), 2),
    "optax.MultiSteps": optax.MultiSteps(optax.sgd(1.0), 2).gradient_transformation(),
    "optax.apply_every": optax.chain(optax.sgd(1.0), optax.apply_every(2)),
  }
  facts: dict[str, Any] = {}
  for name, tx in forms.items():
    state = tx.init(jnp.zeros(3))
    for g, w in zip(grads, weights):
      updates, state = tx.update(g, state, jnp.zeros(3), weight=w)
    facts[f"{name}(weight=)"] = -float(updates[0])
  facts["optax.microbatching.microbatch takes a weight"] = any(
    "weight" in name for name in inspect.signature(microbatching.microbatch).parameters
  )
  _claim(
    abs(facts["optaccum.accumulate(weight=)"] - 13 / 11) < 1e-6
    and facts["optax.MultiSteps(weight=)"] == 2.0
    and facts["optax.apply_every(weight=)"] == 4.0
    and not facts["optax.microbatching.microbatch takes a weight"],
    "weights",
    facts,
  )
  return Check(
    "token weights: gradients 1 and 3 with weights 10 and 1 (weighted mean 1.18)",
    "`update(..., weight=)`: 1.18; in one step, `microbatch(weight_fn=)`",
    "`weight=` accepted and ignored: `MultiSteps` 2.00 (the mean), `apply_every` 4.00 (the "
    "sum); `microbatching.microbatch`: no weight argument",
    facts,
  )


def check_default_reduction() -> Check:
  grad_fn = jax.value_and_grad(lambda w, x: jnp.mean((x * w) ** 2))
  x = jnp.arange(8.0)
  unsplit = float(grad_fn(1.0, x)[1])
  theirs = microbatching.microbatch(grad_fn, argnums=1, microbatch_size=2)
  facts = {
    "optaccum.microbatch / unsplit": float(optaccum.microbatch(grad_fn, 4)(1.0, x)[1]) / unsplit,
    "optax.microbatching default / unsplit": float(theirs(1.0, x)[1]) / unsplit,
  }
  _claim(list(facts.values()) == [1.0, 4.0], "default reductions", facts)
  return Check(
    "default reduction, `value_and_grad` of a mean loss in 4 micro-batches",
    "mean: the unsplit gradient",
    "`SUM`: 4 × the unsplit gradient (pass `accumulator=AccumulationType.MEAN`)",
    facts,
  )


def check_bfloat16_sums() -> Check:
  """bfloat16 gradients of 64 rows summed in k slices; error against float32, / max |g|."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(64, 256)), jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=256), jnp.bfloat16)
  grad_fn = jax.value_and_grad(lambda w, x: jnp.mean(jnp.astype(x @ w, jnp.float32) ** 2))
  exact = jax.grad(lambda w, x: jnp.mean((x @ w) ** 2))(
    w.astype(jnp.float32), x.astype(jnp.float32)
  )

  def error(grads: jax.Array) -> float:
    return float(jnp.max(jnp.abs(grads.astype(jnp.float32) - exact)) / jnp.max(jnp.abs(exact)))

  facts: dict[str, Any] = {"unsplit": error(grad_fn(w, x)[1])}
  multisteps_state = optax.MultiSteps(optax.sgd(0.1), 4).init(w)
  facts["optax.MultiSteps accumulator"] = jnp.dtype(multisteps_state.acc_grads.dtype).name
  for k in (8, 32):
    split = microbatching.microbatch(grad_fn, argnums=1, microbatch_size=64 // k, accumulator=MEAN)
    facts[f"optaccum, k={k}"] = error(optaccum.microbatch(grad_fn, k)(w, x)[1])
    facts[f"optax, k={k}"] = error(split(w, x)[1])
  _claim(
    max(facts["optaccum, k=8"], facts["optaccum, k=32"]) <= facts["unsplit"] * 1.01
    and facts["optaccum, k=32"] < facts["optax, k=8"] < facts["optax, k=32"]
    and facts["optax.MultiSteps accumulator"] == "float32",
    "bfloat16 sums",
    facts,
  )
  return Check(
    "bfloat16 grads summed over k micro-batches: largest error over largest gradient, k = 8, 32",
    f"{facts['optaccum, k=8']:.1e}, {facts['optaccum, k=32']:.1e}: summed in float32, "
    f"as unsplit ({facts['unsplit']:.1e})",
    f"`microbatching.microbatch`: {facts['optax, k=8']:.1e}, {facts['optax, k=32']:.1e}, "
    "summed in bfloat16 (`MultiSteps` accumulates in float32)",
    facts,
  )


def check_keys() -> Check:
  def loss(w: jax.Array, x: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    draw = jax.random.uniform(key)
    return w * jnp.mean(x) * draw, draw

  grad_fn = jax.value_and_grad(loss, has_aux=True)
  x, key = jnp.ones((8, 2)), jax.random.key(0)
  ours = optaccum.microbatch(grad_fn, 4, has_aux=True, key_arg=2, aux_reduction="stack")
  concat = microbatching.AccumulationType.CONCAT
  theirs = microbatching.microbatch(
    grad_fn, argnums=1, microbatch_size=2, accumulator=((MEAN, concat), MEAN)
  )
  facts = {
    "optaccum: distinct draws of 4": len(set(np.asarray(ours(1.0, x, key)[0][1]).tolist())),
    "optax: distinct draws of 4": len(set(np.asarray(theirs(1.0, x, key)[0][1]).tolist())),
  }
  _claim(list(facts.values()) == [4, 1], "keys", facts)
  return Check(
    "a PRNG key argument (dropout), 4 micro-batches",
    "`key_arg=` splits it: 4 different draws",
    "the same key to every micro-batch: 1 draw, 4 times",
    facts,
  )


class _Net:
  """NNX models for `check_nnx`, built when called (Flax is imported there)."""

  @staticmethod
  def make(kind: str) -> Any:
    from flax import nnx

    rngs = nnx.Rngs(0)
    layers = [nnx.Linear(3, 2, rngs=rngs)]
    if kind == "BatchNorm and Dropout":
      layers += [nnx.BatchNorm(2, rngs=rngs), nnx.Dropout(0.5, rngs=rngs)]
    return nnx.Sequential(*layers)


def check_nnx() -> Check:
  from flax import nnx

  def loss(model: Any, x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean((model(x) - y) ** 2)

  x, y = jax.random.normal(jax.random.key(1), (8, 3)), jnp.zeros((8, 2))
  grad_fn = nnx.value_and_grad(loss)
  split = microbatching.microbatch(grad_fn, argnums=(1, 2), microbatch_size=2, accumulator=MEAN)
  unsplit = float(grad_fn(_Net.make("Linear"), x, y)[0])
  facts = {
    "optaccum, Linear: loss - unsplit": abs(
      float(optaccum.microbatch(grad_fn, 4)(_Net.make("Linear"), x, y)[0]) - unsplit
    ),
  }
  for kind in ("Linear", "BatchNorm and Dropout"):
    facts[f"optaccum, {kind}"] = _error(
      lambda: optaccum.microbatch(grad_fn, 4)(_Net.make(kind), x, y)
    )
    facts[f"optax, {kind}"] = _error(lambda: split(_Net.make(kind), x, y))
  _claim(
    facts["optaccum, Linear: loss - unsplit"] < 1e-6
    and facts["optaccum, Linear"] is None
    and facts["optaccum, BatchNorm and Dropout"] is None
    and facts["optax, Linear"] == facts["optax, BatchNorm and Dropout"] == "ValueError",
    "NNX modules",
    facts,
  )
  return Check(
    "an NNX module as argument (`nnx.value_and_grad`; a Linear, or with BatchNorm and Dropout)",
    "runs: Params shared, BatchNorm statistics and `nnx.Rngs` carried from micro-batch to "
    "micro-batch",
    "`ValueError`: a graph node from another trace level",
    facts,
  )


def check_aux_reductions() -> Check:
  facts = {
    "optaccum default": inspect.signature(optaccum.microbatch).parameters["aux_reduction"].default,
    "optax": [t.name for t in microbatching.AccumulationType],
    "optax.microbatching has micro_grad, micro_vmap, num_real_microbatches": (
      callable(getattr(microbatching, "micro_grad", None))
      and callable(getattr(microbatching, "micro_vmap", None))
      and "num_real_microbatches" in inspect.signature(microbatching.microbatch).parameters
    ),
  }
  _claim(
    facts["optaccum default"] == "mean"
    and facts["optax.microbatching has micro_grad, micro_vmap, num_real_microbatches"],
    "aux reductions",
    facts,
  )
  return Check(
    "aux outputs (metrics), per leaf",
    '`aux_reduction=`: "mean" (default, weighted like the loss), "sum", "stack", "concat", '
    "a callable",
    f"`accumulator=` tree: {', '.join(facts['optax'])}, or an `Accumulator`",
    facts,
  )


CHECKS = (
  check_zero_k,
  check_inner_runs,
  check_strict_promotion,
  check_nan_across_steps,
  check_nan_in_step,
  check_weights,
  check_default_reduction,
  check_bfloat16_sums,
  check_keys,
  check_nnx,
  check_aux_reductions,
)


# --- Replicas: all-reduces on 8 simulated devices (a child process) ------------------------------


def all_reduces(k: int = 4) -> dict[str, int]:
  """All-reduces over `data` per batch of k micro-batches, data-parallel under plain `jax.jit`.

  Runs where JAX sees 8 devices (see `_all_reduces_in_child`).
  """
  from jax.sharding import AxisType, NamedSharding
  from jax.sharding import PartitionSpec as P

  from tests.checks import plain_jit

  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
  rng = np.random.default_rng(0)
  params = {
    "w1": jnp.asarray(rng.normal(size=(16, 32)), jnp.float32),
    "w2": jnp.asarray(rng.normal(size=(32, 4)), jnp.float32),
  }
  params = jax.device_put(params, NamedSharding(mesh, P()))
  # Each micro-batch of 16 rows is split over the 8 replicas, as is the batch.
  x, y = rng.normal(size=(16 * k, 16)), rng.normal(size=(16 * k, 4))
  rows = NamedSharding(mesh, P("data"))
  batch, micro_batch = (
    jax.device_put((jnp.asarray(x[:n], jnp.float32), jnp.asarray(y[:n], jnp.float32)), rows)
    for n in (16 * k, 16)
  )

  def loss(params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean((jnp.tanh(x @ params["w1"]) @ params["w2"] - y) ** 2)

  grad_fn = jax.value_and_grad(loss)
  in_step = {
    "large batch": grad_fn,
    "optaccum.microbatch(axis_name=('data',))": optaccum.microbatch(
      grad_fn, k, axis_name=("data",)
    ),
    "optaccum.microbatch": optaccum.microbatch(grad_fn, k),
    "optax.microbatching.microbatch": microbatching.microbatch(
      grad_fn, argnums=(1, 2), microbatch_size=16, accumulator=MEAN
    ),
  }
  ours = optaccum.accumulate(optax.sgd(0.1), k, axis_name=("data",))
  ours_without = optaccum.accumulate(optax.sgd(0.1), k)
  per_replica = optaccum.parallel.per_replica(jax.grad(loss), axis_name=("data",))
  multisteps = optax.MultiSteps(optax.sgd(0.1), k)

  def step(tx: Any, grads_of: Any) -> Any:
    def run(params: Any, state: Any, x: jax.Array, y: jax.Array) -> Any:
      updates, state = tx.update(grads_of(params, x, y), state, params)
      return optax.apply_updates(params, updates), state

    return run

  counts = {}
  with jax.set_mesh(mesh):
    for name, fn in in_step.items():
      text = jax.jit(fn).lower(params, *batch).compile().as_text()
      counts[name] = plain_jit.per_window(text, (8,), 0, 1)[0]
    for name, tx, grads_of in (
      ("optaccum.accumulate(axis_name=('data',)) + parallel.per_replica", ours, per_replica),
      ("optaccum.accumulate", ours_without, jax.grad(loss)),
      ("optax.MultiSteps", multisteps, jax.grad(loss)),
    ):
      state = tx.init(params)
      lowered = jax.jit(step(tx, grads_of)).lower(params, state, *micro_batch)
      counts[name] = plain_jit.per_window(lowered.compile().as_text(), (8,), 0, k)[0]
  return counts


def _all_reduces_in_child(timeout: float = 300) -> dict[str, int]:
  # The caller's XLA flags (a faster compile, say) apply to the child too.
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()
  env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
  code = "import json; from benchmarks import peers; print(json.dumps(peers.all_reduces()))"
  completed = subprocess.run(
    [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
  )
  if completed.returncode != 0:
    raise RuntimeError(f"the 8-device child failed:\n{completed.stderr[-3000:]}")
  return json.loads(completed.stdout.strip().splitlines()[-1])


# --- Report -----------------------------------------------------------------------------------


def _ratio(value: float, reference: float) -> str:
  return f"{value / reference:.2f}x"


def timing_table(rows_by_k: dict[int, list[dict[str, Any]]]) -> str:
  """One row per (k, method): time and temporaries against the large batch and the Optax peer."""
  peer = {"in-step": "optax.microbatching.microbatch", "across": "optax.MultiSteps"}
  lines = [
    "| k | method | time per batch vs large batch | vs its Optax peer | temporaries (MiB) "
    "| temporaries vs large batch | max abs param difference vs large batch |",
    "|---|---|---|---|---|---|---|",
  ]
  for k, rows in rows_by_k.items():
    by_name = {row["method"]: row for row in rows}
    large = by_name["large batch"]
    for row in rows:
      if row is large and k != next(iter(rows_by_k)):
        continue
      versus = by_name.get(peer.get(row["family"], ""))
      lines.append(
        f"| {'–' if row is large else k} | {row['method']} | "
        f"{_ratio(row['seconds'], large['seconds'])} | "
        f"{_ratio(row['seconds'], versus['seconds']) if versus else '–'} | "
        f"{row['temp_bytes'] / 2**20:.2f} | {_ratio(row['temp_bytes'], large['temp_bytes'])} | "
        f"{row['max_param_difference']:.1e} |"
      )
  return "\n".join(lines)


def checks_table(checks: list[Check]) -> str:
  lines = ["| behaviour | optaccum | Optax |", "|---|---|---|"]
  lines += [f"| {c.feature} | {c.optaccum} | {c.optax} |" for c in checks]
  return "\n".join(lines)


def replicas_table(counts: dict[str, int]) -> str:
  lines = ["| form | all-reduces over `data` per batch of k = 4 |", "|---|---|"]
  lines += [f"| {name} | {count} |" for name, count in counts.items()]
  return "\n".join(lines)


# --- Command line ---------------------------------------------------------------------------


def _parse(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    prog="python -m benchmarks.peers", description=__doc__.splitlines()[0]
  )
  parser.add_argument("--quick", action="store_true", help="tiny sizes, few rounds (CI)")
  parser.add_argument("--rounds", type=int, help="timed rounds (default: 2 quick, 31 full)")
  parser.add_argument("--no-replicas", action="store_true", help="skip the 8-device child")
  args = parser.parse_args(argv)
  if args.rounds is not None and args.rounds < 1:
    parser.error(f"--rounds must be at least 1, got {args.rounds}")
  return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
  """Measures, checks, prints markdown and one JSON line; returns what the JSON holds."""
  args = _parse(argv)
  rounds = args.rounds or (2 if args.quick else 31)
  ks = QUICK_KS if args.quick else KS
  options = {"xla_backend_optimization_level": 0} if args.quick else None
  command = " ".join(["python -m benchmarks.peers", *(sys.argv[1:] if argv is None else argv)])
  started, load_before = time.perf_counter(), _measure.load_average()
  if args.quick:
    print("QUICK RUN: tiny sizes, not a measurement.\n")
  print(f"`{command}`; {_measure.machine_description()}; load before: {load_before}\n")
  report: dict[str, Any] = {"command": command, "quick": args.quick, "rounds": rounds}
  workloads = (
    (lambda k: mlp_workload(QUICK_MLP if args.quick else MLP, k)),
    (lambda k: lm_workload(QUICK_LM if args.quick else LM, k)),
  )
  report["workloads"] = {}
  for make in workloads:
    rows_by_k = {}
    for k in ks:
      workload = make(k)
      rows_by_k[k] = measure(workload, rounds, options)
    print(f"### {workload.title}\n\n{workload.description}\n\n{timing_table(rows_by_k)}\n")
    report["workloads"][workload.key] = {
      "title": workload.title,
      "description": workload.description,
      "rows": {str(k): rows for k, rows in rows_by_k.items()},
    }
  checks = [check() for check in CHECKS]
  print(f"### Behaviour, run against optax {optax.__version__}\n\n{checks_table(checks)}\n")
  report["checks"] = [dataclasses.asdict(c) for c in checks]
  if not args.no_replicas:
    report["all_reduces"] = counts = _all_reduces_in_child()
    _claim(list(counts.values()) == [1, 1, 4, 4, 1, 4, 4], "all-reduces per batch", counts)
    print(f"### Replicas (8 simulated devices)\n\n{replicas_table(report['all_reduces'])}\n")
  load_after = _measure.load_average()
  print(f"load after: {load_after}; {time.perf_counter() - started:.0f} s")
  print(json.dumps(report, default=str))
  return report


if __name__ == "__main__":
  main()

"""One optimizer micro-step, with no model: what accumulation itself costs.

~8M float32 parameters, AdamW, k=8; each method runs jitted `update +
optax.apply_updates` (or optaccum's fast path) with donated parameters and
state. Reports, per method, the median time of a non-emitting micro-step, of a
whole window divided by k, and compiled temporary memory; the floor is a bare
`acc + g` tree add in the same process.

Run: python -m benchmarks.microstep [--quick] (this table), or as workload (a) of
the suite: python -m benchmarks --workloads microstep
"""

from __future__ import annotations

import argparse
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optaccum
from benchmarks import _measure
from benchmarks._methods import Workload

EVERY_K = 8


def make_params(total: int) -> dict[str, jax.Array]:
  """Four equal float32 matrices holding about `total` parameters."""
  side = int(np.sqrt(total / 4))
  rng = np.random.default_rng(0)
  return {f"w{i}": jnp.asarray(rng.normal(size=(side, side)), jnp.float32) for i in range(4)}


def _gradients_are_the_batch(params: Any, batch: Any) -> tuple[jax.Array, Any]:
  del params
  return jnp.zeros((), jnp.float32), batch


def workload(total_params: int, every_k: int) -> Workload:
  """The optimizer-only micro-step over about `total_params` parameters."""
  params = make_params(total_params)
  rng = np.random.default_rng(1)
  micro_batches = [
    jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * 1e-3, p.dtype), params)
    for _ in range(every_k)
  ]
  num_params = sum(leaf.size for leaf in jax.tree.leaves(params))
  return Workload(
    key="microstep",
    title="(a) Optimizer-only micro-step",
    description=(
      f"{num_params / 1e6:.1f}M float32 params in 4 matrices, gradients given; adamw, k={every_k}"
    ),
    params=params,
    micro_batches=micro_batches,
    whole_batch=None,
    grad_fn=_gradients_are_the_batch,
    with_model=False,
  )


def _update_step(tx: optax.GradientTransformation):
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return jax.jit(step, donate_argnums=(0, 1))


def _fast_step(tx: optax.GradientTransformation):
  def step(params, state, grads):
    return optaccum.apply_gradients(tx, grads, state, params)

  return jax.jit(step, donate_argnums=(0, 1))


def _floor_step():
  def step(params, acc, grads):
    return params, jax.tree.map(jnp.add, acc, grads)

  return jax.jit(step, donate_argnums=(0, 1))


def methods(inner: optax.GradientTransformation) -> dict[str, tuple[Any, Any]]:
  """name -> (jitted step(params, state, grads), init(params))."""
  ours = optaccum.accumulate(inner, EVERY_K)
  ours_unguarded = optaccum.accumulate(inner, EVERY_K, window_guard=False)
  ours_cond = optaccum.accumulate(inner, EVERY_K, strategy="cond")
  multisteps = optax.MultiSteps(inner, EVERY_K)
  return {
    "floor: acc + g": (_floor_step(), lambda p: jax.tree.map(jnp.zeros_like, p)),
    "optaccum.accumulate": (_update_step(ours), ours.init),
    "optaccum.accumulate(window_guard=False)": (_update_step(ours_unguarded), ours_unguarded.init),
    "optaccum.accumulate(strategy='cond')": (_update_step(ours_cond), ours_cond.init),
    "optaccum.apply_gradients": (_fast_step(ours), ours.init),
    "optaccum.apply_gradients(strategy='cond')": (_fast_step(ours_cond), ours_cond.init),
    "optax.MultiSteps": (_update_step(multisteps.gradient_transformation()), multisteps.init),
  }


def run(
  total_params: int, rounds: int, table: dict[str, tuple[Any, Any]] | None = None
) -> dict[str, dict[str, float]]:
  """Times and measures each method of `table` (default: `methods(adamw)`)."""
  params0 = make_params(total_params)
  grads = jax.tree.map(lambda p: p * 1e-3, params0)
  table = table or methods(optax.adamw(1e-3))
  live: dict[str, list[Any]] = {}
  results: dict[str, dict[str, float]] = {}
  for name, (step, init) in table.items():
    params = jax.tree.map(jnp.copy, params0)
    state = init(params)
    memory = _measure.compiled_memory(step, params, state, grads)
    results[name] = {"temp_bytes": memory["temp"]}
    # Compile and settle into a window boundary.
    for _ in range(EVERY_K):
      params, state = step(params, state, grads)
    jax.block_until_ready(params)
    live[name] = [params, state]

  def micro_step(name: str) -> float:
    step = table[name][0]
    holder = live[name]

    def call():
      holder[0], holder[1] = step(holder[0], holder[1], grads)
      return holder[0]

    return _measure.timed(call)

  def window(name: str) -> float:
    return sum(micro_step(name) for _ in range(EVERY_K)) / EVERY_K

  def non_emitting(name: str) -> float:
    # Time micro-step 1 of 8 (never emitting), then finish the window untimed.
    seconds = micro_step(name)
    for _ in range(EVERY_K - 1):
      micro_step(name)
    return seconds

  per_window = _measure.interleaved_medians(
    {name: functools.partial(window, name) for name in table}, rounds
  )
  per_non_emitting = _measure.interleaved_medians(
    {name: functools.partial(non_emitting, name) for name in table}, rounds
  )
  for name in table:
    results[name]["window_mean_s"] = per_window[name]
    results[name]["non_emitting_s"] = per_non_emitting[name]
  return results


def format_table(
  results: dict[str, dict[str, float]], total_params: int, reference_name: str = "optax.MultiSteps"
) -> str:
  reference = results[reference_name]
  versus = f"vs {reference_name}"
  lines = [
    f"Micro-step of ~{total_params / 1e6:.1f}M float32 params, adamw, k={EVERY_K} "
    f"({_measure.machine_description()})",
    "",
    f"| method | non-emitting micro-step (ms) | {versus} | mean micro-step over a "
    f"window (ms) | {versus} | compiled temp (MiB) |",
    "|---|---|---|---|---|---|",
  ]
  for name, row in results.items():
    lines.append(
      f"| {name} | {row['non_emitting_s'] * 1e3:.2f} | "
      f"{row['non_emitting_s'] / reference['non_emitting_s']:.2f}x | "
      f"{row['window_mean_s'] * 1e3:.2f} | "
      f"{row['window_mean_s'] / reference['window_mean_s']:.2f}x | "
      f"{row['temp_bytes'] / 2**20:.1f} |"
    )
  return "\n".join(lines)


def parse_arguments(argv: list[str] | None, description: str) -> tuple[int, int]:
  """`(total parameters, rounds)` from the command line of a micro-step benchmark."""
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("--quick", action="store_true", help="small params, few rounds")
  parser.add_argument("--params", type=int, default=8_000_000)
  parser.add_argument("--rounds", type=int, default=15)
  args = parser.parse_args(argv)
  return (400_000, 3) if args.quick else (args.params, args.rounds)


def main(argv: list[str] | None = None) -> None:
  total, rounds = parse_arguments(argv, __doc__.splitlines()[0])
  print(format_table(run(total, rounds), total))


if __name__ == "__main__":
  main()

"""How far a window's mean gradient strays from float64, per accumulator, for k from 2 to 64.

Two windows of k micro-batch gradients of mixed magnitudes, element j of
micro-batch i being s_j * m_i * (mean + spread * z_ij) with z ~ N(0, 1) and
coordinate scales s_j log-uniform over four decades:

* `mixed`: micro-batch magnitudes m_i log-uniform over two decades, noisy
  gradients (mean 0.5, spread 1): a loss spike, short micro-batches.
* `spike`: one micro-batch of magnitude 1, then k - 1 of magnitudes
  log-uniform over [10^-3.5, 10^-2.5], all of one sign (mean 1, spread 0.1):
  the worst case for rounding to nearest, which drops every gradient smaller
  than half a bfloat16 gap of the running sum.

The same window runs N times through `optaccum.accumulate` (identity inner
optimizer, so the emitted update is the window mean), each time with fresh
rounding bits, and is compared with the float64 mean G of the same float32
gradients:

* error: sqrt(mean over runs of |mean - G|^2) / |G|, the typical error of one
  window;
* bias: |mean over runs of (mean - G)| / |G|, the error that does not average
  away over windows. For an unbiased rounding it is the noise floor, error /
  sqrt(N); for a deterministic one it equals the error.

Run: python -m benchmarks.rounding_study [--quick]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optaccum
from benchmarks import _measure

WINDOW_LENGTHS = (2, 4, 8, 16, 32, 64)
SCENARIOS = ("mixed", "spike")


def accumulators(every_k: int) -> dict[str, optax.GradientTransformation]:
  inner = optax.identity()
  return {
    "float32": optaccum.accumulate(inner, every_k),
    "bfloat16 nearest": optaccum.accumulate(inner, every_k, accumulator=jnp.bfloat16),
    "bfloat16 stochastic": optaccum.accumulate(
      inner, every_k, accumulator=optaccum.stochastic_bfloat16(0)
    ),
  }


def window(scenario: str, every_k: int, size: int, seed: int) -> np.ndarray:
  """k micro-batch gradients of `size` float32 elements (see the module docstring)."""
  rng = np.random.default_rng(seed)
  coordinate_scale = 10.0 ** rng.uniform(-4, 0, size=size)
  if scenario == "mixed":
    micro_batch_scale = 10.0 ** rng.uniform(-2, 0, size=(every_k, 1))
    mean, spread = 0.5, 1.0
  else:
    micro_batch_scale = 10.0 ** rng.uniform(-3.5, -2.5, size=(every_k, 1))
    micro_batch_scale[0] = 1.0
    mean, spread = 1.0, 0.1
  noise = rng.normal(size=(every_k, size))
  return (coordinate_scale * micro_batch_scale * (mean + spread * noise)).astype(np.float32)


def window_means_runner(tx: optax.GradientTransformation, size: int, runs: int):
  """A jitted `grads (k, size) -> means (runs, size)`: `runs` passes of one window."""
  params = jnp.zeros(size, jnp.float32)

  def one_window(state, grads):
    def micro_step(state, g):
      updates, state = tx.update(g, state, params)
      return state, updates

    state, updates = jax.lax.scan(micro_step, state, grads)
    return state, updates[-1]

  return jax.jit(
    lambda grads: jax.lax.scan(lambda s, _: one_window(s, grads), tx.init(params), length=runs)[1]
  )


def study(size: int, runs: int, lengths: tuple[int, ...]) -> dict[str, dict[int, dict]]:
  """scenario -> k -> accumulator -> (error, bias), relative to the float64 window mean."""
  results: dict[str, dict[int, dict]] = {scenario: {} for scenario in SCENARIOS}
  for every_k in lengths:
    runners = {
      name: window_means_runner(tx, size, runs) for name, tx in accumulators(every_k).items()
    }
    for scenario in SCENARIOS:
      grads = window(scenario, every_k, size, seed=every_k)
      exact = grads.astype(np.float64).mean(axis=0)
      norm = np.linalg.norm(exact)
      row = results[scenario][every_k] = {}
      for name, runner in runners.items():
        deviations = np.asarray(runner(jnp.asarray(grads)), np.float64) - exact
        error = np.sqrt(np.mean(np.sum(deviations**2, axis=1))) / norm
        row[name] = (error, np.linalg.norm(deviations.mean(axis=0)) / norm)
  return results


def format_table(results: dict[int, dict[str, tuple]], title: str) -> str:
  names = list(next(iter(results.values())))
  lines = [
    title,
    "",
    "| k | "
    + " | ".join(f"{name} error" for name in names)
    + " | "
    + " | ".join(f"{name} bias" for name in names)
    + " |",
    "|---" * (1 + 2 * len(names)) + "|",
  ]
  for every_k, row in results.items():
    errors = " | ".join(f"{row[name][0]:.2e}" for name in names)
    biases = " | ".join(f"{row[name][1]:.2e}" for name in names)
    lines.append(f"| {every_k} | {errors} | {biases} |")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="fewer elements, runs and lengths")
  parser.add_argument("--size", type=int, default=4096)
  parser.add_argument("--runs", type=int, default=256)
  args = parser.parse_args(argv)
  if args.quick:
    size, runs, lengths = 512, 32, (2, 8, 64)
  else:
    size, runs, lengths = args.size, args.runs, WINDOW_LENGTHS
  start = time.perf_counter()
  results = study(size, runs, lengths)
  print(f"{size} elements, {runs} runs per window ({_measure.machine_description()})")
  for scenario, table in results.items():
    print()
    print(format_table(table, f"Scenario `{scenario}`: window mean vs float64, relative"))
  print(f"\n({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
  main()

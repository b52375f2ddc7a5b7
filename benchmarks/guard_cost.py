"""What the window guard costs the transformation form, micro-step by micro-step.

Same setting as the optimizer-only micro-step of `python -m benchmarks` (8M
float32 parameters in 4 matrices, AdamW, k = 8, jitted `update + apply_updates`
with donated parameters and state, the gradients a fresh input of each call).
One process, both variants in alternating rounds, medians: the non-emitting
micro-steps and the window-closing one, with `window_guard=True` (the default)
and `window_guard=False`.

Run: python -m benchmarks.guard_cost [--rounds N]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optaccum

EVERY_K = 8


def _step(guard: bool):
  tx = optaccum.accumulate(optax.adamw(1e-3), EVERY_K, window_guard=guard)

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return jax.jit(step, donate_argnums=(0, 1)), tx


def main() -> None:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.guard_cost")
  parser.add_argument("--rounds", type=int, default=6)
  rounds = parser.parse_args().rounds
  params = {f"w{i}": jnp.zeros((1000, 2000), jnp.float32) for i in range(4)}
  grads = {name: jnp.full_like(leaf, 1e-3) for name, leaf in params.items()}
  runs = {}
  for guard in (True, False):
    step, tx = _step(guard)
    own = jax.tree.map(jnp.copy, params)
    runs[guard] = [step, own, tx.init(own)]
  times: dict[bool, list[tuple[int, float]]] = {True: [], False: []}
  for round_index in range(rounds + 1):  # the first round compiles and warms up
    for guard, run in runs.items():
      step, p, s = run
      for micro_step in range(EVERY_K):
        g = jax.block_until_ready(jax.tree.map(jnp.copy, grads))
        start = time.perf_counter()
        p, s = jax.block_until_ready(step(p, s, g))
        if round_index:
          times[guard].append((micro_step, time.perf_counter() - start))
      run[1:] = [p, s]
  for guard, measured in times.items():
    table = np.asarray(measured)
    closing = table[:, 0] == EVERY_K - 1
    print(
      f"window_guard={guard}: non-emitting {np.median(table[~closing, 1]) * 1e3:.2f} ms, "
      f"window-closing {np.median(table[closing, 1]) * 1e3:.2f} ms"
    )


if __name__ == "__main__":
  main()

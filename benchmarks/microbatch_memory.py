"""Temporary memory of one gradient step, unsplit and split by `optaccum.microbatch`.

XLA's compiled memory analysis, side by side in one process, for an
activation-heavy MLP (a wide batch through narrow layers). Prints a table, then
the same rows as one JSON line (read by tests/test_microbatch.py).

Run: python benchmarks/microbatch_memory.py [k ...]   (default k: 2 4 8 16)
"""

import json
import sys

import jax
import jax.numpy as jnp

import optaccum

BATCH, WIDTH, DEPTH = 4096, 256, 4


def loss(params, x):
  for w in params:
    x = jnp.tanh(x @ w)
  return jnp.mean(x**2)


def main():
  params = [
    jax.random.normal(k, (WIDTH, WIDTH)) / WIDTH**0.5
    for k in jax.random.split(jax.random.key(0), DEPTH)
  ]
  x = jax.random.normal(jax.random.key(1), (BATCH, WIDTH))
  grad_fn = jax.value_and_grad(loss)
  rows = []
  counts = [int(k) for k in sys.argv[1:]] or [2, 4, 8, 16]
  for k in [None, *counts]:
    fn = grad_fn if k is None else optaccum.microbatch(grad_fn, k)
    memory = jax.jit(fn).lower(params, x).compile().memory_analysis()
    rows.append(
      {
        "num_microbatches": k,
        "temp_bytes": int(memory.temp_size_in_bytes),
        "argument_bytes": int(memory.argument_size_in_bytes),
        "output_bytes": int(memory.output_size_in_bytes),
      }
    )
  unsplit = rows[0]["temp_bytes"]
  print(f"batch {BATCH}, {DEPTH} tanh layers of {WIDTH}, float32, jax {jax.__version__}")
  print("num_microbatches | temp MiB | temp / unsplit")
  for row in rows:
    name = "unsplit" if row["num_microbatches"] is None else row["num_microbatches"]
    mib = row["temp_bytes"] / 2**20
    print(f"{name!s:>16} | {mib:8.2f} | {row['temp_bytes'] / unsplit:.3f}")
  print(json.dumps({"batch": BATCH, "width": WIDTH, "depth": DEPTH, "rows": rows}))


if __name__ == "__main__":
  main()

"""What bfloat16 accumulators and window statistics cost: micro-step time and state memory.

Same setting as benchmarks/microstep.py (~8M float32 parameters, AdamW, k=8,
jitted `update + apply_updates` with donated buffers), one process, interleaved
rounds, medians. The baseline is `optaccum.accumulate` with its default float32
accumulator; the statistics rows add one squared norm per micro-step, and are
timed once more head to head with the baseline, over three times the rounds of
8 micro-steps each of a window that never closes.
Two floors time a bare stochastically rounded bfloat16 `acc + g`: with
optaccum's hashed bits, and with threefry bits drawn for every element. Memory
is counted on the state itself (bytes of `acc_grads`, of the whole state) and
from XLA's compiled memory analysis of the step; a last table compiles a whole
train step (the gradient of an 8.4M-parameter MLP, accumulated, AdamW) in both
forms with float32 and bfloat16 accumulators, at a micro-batch of small and of
dominant activations, to show where the state's saving survives the step's
temporaries.

Run: python -m benchmarks.accumulator_cost [--quick]
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

import optaccum
from benchmarks import _measure, microstep
from optaccum import _rounding

BASELINE = "float32 accumulator"
STATISTICS = "float32 + statistics"


def _hash_rounding(total: jax.Array, key: jax.Array) -> jax.Array:
  """optaccum's rounding: two random words per leaf, hashed with each element's index."""
  return _rounding.stochastic_round(total, jax.random.bits(key, (2,), jnp.uint32))


def _threefry_rounding(total: jax.Array, key: jax.Array) -> jax.Array:
  """The obvious alternative: 16 threefry bits drawn for every element."""
  noise = jax.random.bits(key, total.shape, jnp.uint16).astype(jnp.uint32)
  return _rounding.round_with_noise(total, noise)


def _stochastic_floor(rounding: Any) -> tuple[Any, Any]:
  """A bare bfloat16 `acc + g`, the float32 sum rounded by `rounding(total, key)`."""

  def step(params, state, grads):
    acc, key = state
    key, step_key = jax.random.split(key)
    leaves, treedef = jax.tree.flatten(acc)
    keys = jax.random.split(step_key, len(leaves))
    summed = [
      rounding(a.astype(jnp.float32) + g, k)
      for a, g, k in zip(leaves, jax.tree.leaves(grads), keys)
    ]
    return params, (jax.tree.unflatten(treedef, summed), key)

  def init(params):
    return jax.tree.map(lambda p: jnp.zeros_like(p, jnp.bfloat16), params), jax.random.key(0)

  return jax.jit(step, donate_argnums=(0, 1)), init


def methods(inner: optax.GradientTransformation) -> dict[str, tuple[Any, Any]]:
  """name -> (jitted step(params, state, grads), init(params))."""
  k = microstep.EVERY_K
  bfloat16 = {"accumulator": jnp.bfloat16}
  stochastic = {"accumulator": optaccum.stochastic_bfloat16(0)}
  variants = {
    BASELINE: {},
    STATISTICS: {"statistics": True},
    "bfloat16, nearest": bfloat16,
    "bfloat16, stochastic": stochastic,
    "bfloat16, stochastic + statistics": {**stochastic, "statistics": True},
  }
  table = {
    "floor: acc + g": (microstep._floor_step(), lambda p: jax.tree.map(jnp.zeros_like, p)),
    "floor: bfloat16 acc + g, stochastic, hash bits": _stochastic_floor(_hash_rounding),
    "floor: bfloat16 acc + g, stochastic, threefry bits": _stochastic_floor(_threefry_rounding),
  }
  for name, kwargs in variants.items():
    tx = optaccum.accumulate(inner, k, **kwargs)
    table[name] = (microstep._update_step(tx), tx.init)
  return table


def statistics_overhead(total_params: int, rounds: int, steps: int = 8) -> dict[str, float]:
  """Seconds per non-emitting micro-step with statistics off and on, head to head.

  Each sample times `steps` consecutive micro-steps of a window that never
  closes, so that every sample holds the same work; the result per method is
  the median over `rounds` interleaved samples.
  """
  params0 = microstep.make_params(total_params)
  grads = jax.tree.map(lambda p: p * 1e-3, params0)
  runners = {}
  for name, kwargs in {BASELINE: {}, STATISTICS: {"statistics": True}}.items():
    tx = optaccum.accumulate(optax.adamw(1e-3), k=2**30, **kwargs)
    step = microstep._update_step(tx)
    params = jax.tree.map(jnp.copy, params0)
    holder = list(step(params, tx.init(params), grads))  # compile

    def run(step=step, holder=holder) -> float:
      def micro_steps():
        for _ in range(steps):
          holder[0], holder[1] = step(holder[0], holder[1], grads)
        return holder[0]

      return _measure.timed(micro_steps) / steps

    runners[name] = run
  return _measure.interleaved_medians(runners, rounds)


def format_overhead(seconds: dict[str, float]) -> str:
  ratio = seconds[STATISTICS] / seconds[BASELINE]
  return (
    f"Non-emitting micro-step, head to head: {seconds[BASELINE] * 1e3:.2f} ms without "
    f"statistics, {seconds[STATISTICS] * 1e3:.2f} ms with: {ratio:.3f}x"
  )


def _nbytes(tree: Any) -> int:
  return sum(leaf.nbytes for leaf in jax.tree.leaves(tree))


def memory(table: dict[str, tuple[Any, Any]], total_params: int) -> dict[str, dict[str, int]]:
  """Bytes of each accumulation's state, and its step's compiled argument size."""
  params = microstep.make_params(total_params)
  grads = jax.tree.map(lambda p: p * 1e-3, params)
  rows = {}
  for name, (step, init) in table.items():
    state = init(params)
    if not isinstance(state, optaccum.AccumulateState):
      continue
    compiled = _measure.compiled_memory(step, params, state, grads)
    rows[name] = {
      "accumulator": _nbytes(state.acc_grads),
      "state": _nbytes(state),
      "extra": _nbytes(state.rounding_key) + _nbytes(state.statistics),
      "arguments": compiled["argument"],
      "temp": compiled["temp"],
    }
  return rows


def format_memory(rows: dict[str, dict[str, int]]) -> str:
  baseline = rows[BASELINE]
  lines = [
    "| method | acc_grads (MiB) | vs float32 | whole state with AdamW (MiB) | "
    "key + statistics (bytes) | compiled arguments (MiB) | compiled temp (MiB) |",
    "|---|---|---|---|---|---|---|",
  ]
  for name, row in rows.items():
    lines.append(
      f"| {name} | {row['accumulator'] / 2**20:.2f} | "
      f"{row['accumulator'] / baseline['accumulator']:.3f}x | {row['state'] / 2**20:.2f} | "
      f"{row['extra']} | {row['arguments'] / 2**20:.2f} | {row['temp'] / 2**20:.2f} |"
    )
  return "\n".join(lines)


# The train step's model: DEPTH tanh layers of WIDTH x WIDTH (8.4M parameters).
WIDTH, DEPTH = 1024, 8
# A batch whose activations are small next to the parameters, and one where they dominate.
BATCHES = (64, 4096)
ACCUMULATORS = {"float32": None, "bfloat16": jnp.bfloat16}


def _mlp_loss(params: list[jax.Array], x: jax.Array) -> jax.Array:
  for w in params:
    x = jnp.tanh(x @ w)
  return jnp.mean(x**2)


def _train_step(form: str, tx: optax.GradientTransformation) -> Any:
  """A jitted micro-step that computes the gradient of one micro-batch and accumulates it."""

  def step(params, state, x):
    grads = jax.grad(_mlp_loss)(params, x)
    if form == "apply_gradients":
      return optaccum.apply_gradients(tx, grads, state, params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return jax.jit(step, donate_argnums=(0, 1))


def train_step_memory(width: int = WIDTH, depth: int = DEPTH, batches=BATCHES) -> list[dict]:
  """XLA's compiled memory of a whole train step, per form, accumulator and batch.

  The state's saving shows in the arguments; whether the step's temporaries give it
  back shows in temp. Rows: form, batch, accumulator, temp, argument (bytes).
  """
  keys = jax.random.split(jax.random.key(0), depth)
  params = [jax.random.normal(key, (width, width)) * 0.02 for key in keys]
  rows = []
  for batch in batches:
    x = jnp.ones((batch, width))
    for form in ("accumulate + apply_updates", "apply_gradients"):
      for name, dtype in ACCUMULATORS.items():
        tx = optaccum.accumulate(optax.adamw(1e-3), microstep.EVERY_K, accumulator=dtype)
        memory = _measure.compiled_memory(_train_step(form, tx), params, tx.init(params), x)
        rows.append({"form": form, "batch": batch, "accumulator": name, **memory})
  return rows


def format_train_step_memory(rows: list[dict]) -> str:
  lines = [
    "| form | micro-batch rows | accumulator | temp (MiB) | arguments (MiB) | "
    "temp + arguments (MiB) | vs float32 |",
    "|---|---|---|---|---|---|---|",
  ]
  totals = {(r["form"], r["batch"], r["accumulator"]): r["temp"] + r["argument"] for r in rows}
  for r in rows:
    total = totals[r["form"], r["batch"], r["accumulator"]]
    lines.append(
      f"| {r['form']} | {r['batch']} | {r['accumulator']} | {r['temp'] / 2**20:.2f} | "
      f"{r['argument'] / 2**20:.2f} | {total / 2**20:.2f} | "
      f"{(total - totals[r['form'], r['batch'], 'float32']) / 2**20:+.2f} MiB |"
    )
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
  total, rounds = microstep.parse_arguments(argv, __doc__.splitlines()[0])
  table = methods(optax.adamw(1e-3))
  print(microstep.format_table(microstep.run(total, rounds, table), total, BASELINE))
  print()
  print(format_overhead(statistics_overhead(total, 3 * rounds)))
  print()
  print(format_memory(memory(table, total)))
  print()
  print(format_train_step_memory(train_step_memory()))


if __name__ == "__main__":
  main()

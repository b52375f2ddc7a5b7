"""The fast path against its limit on the parameter-heavy LM, as issue 22 item 7 measured it.

The harness of the issue, rebuilt: `lm.PARAMETER_HEAVY` (vocab 32768, d_model
128, one block of 4 heads with a 4x MLP, seq 16, micro-batch 2), k = 8,
`optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(3e-4, weight_decay=0.1))`,
`jax.grad` inside each jitted step, parameters and state donated. Each round
runs `--steps` micro-steps of every method back to back (windows closing,
emission included) and blocks once at the end; rounds are interleaved and the
result is the median over rounds, divided by the steps.

Methods, per micro-step:

* plain: the optimizer on every micro-step;
* floor: the gradient and `acc + g`;
* floor + write: the floor, the accumulator restarted each window and
  `p + where(emitted, -acc / k, 0)` on every call (a parameter write without
  an optimizer, in one program);
* `optaccum.apply_gradients` (default strategy), and the same with
  `window_guard=False`;
* `optaccum.accumulate` then `optax.apply_updates`;
* `optax.MultiSteps`;
* a hand-written step that forms the window's mean in the closing
  micro-step's add, outside its conditional (does the clip then need a
  temporary of its own?).

Limit (the suite's, benchmarks/_report.py): floor + (plain - floor) / k.

`--optimizer suite` swaps in the suite's `optax.adamw(1e-3)` (no clipping),
to separate the harness from the optimizer. `--hlo` prints what the compiled
programs hold (copies, memory analysis).

Run: python -m benchmarks.fast_path_limit [--steps N] [--rounds R]
"""

from __future__ import annotations

import argparse
import functools
import re
import resource
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

import optaccum
from benchmarks import _measure, lm

EVERY_K = 8

Step = Callable[[Any, Any, Any], tuple[Any, Any]]


def make_inner(kind: str) -> optax.GradientTransformation:
  """The issue's optimizer ("issue") or the suite's ("suite")."""
  if kind == "issue":
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(3e-4, weight_decay=0.1))
  return optax.adamw(1e-3)


def methods(
  kind: str, grad_fn: Callable[[Any, Any], Any]
) -> dict[str, tuple[Callable[[Any], Any], Step]]:
  """name -> (init, step) for every timed method."""

  def gradient(params: Any, batch: Any) -> Any:
    return grad_fn(params, batch)[1]

  inner = make_inner(kind)

  def plain(params: Any, state: Any, batch: Any) -> tuple[Any, Any]:
    updates, state = inner.update(gradient(params, batch), state, params)
    return optax.apply_updates(params, updates), state

  def zeros(params: Any) -> Any:
    return jax.tree.map(jnp.zeros_like, params)

  def floor(params: Any, acc: Any, batch: Any) -> tuple[Any, Any]:
    return params, jax.tree.map(jnp.add, acc, gradient(params, batch))

  def write_init(params: Any) -> Any:
    return zeros(params), jnp.zeros((), jnp.int32)

  def floor_and_write(params: Any, state: Any, batch: Any) -> tuple[Any, Any]:
    acc, count = state
    grads = gradient(params, batch)
    acc = jax.tree.map(lambda a, g: jnp.where(count > 0, a, jnp.zeros((), a.dtype)) + g, acc, grads)
    count = count + 1
    emitted = count == EVERY_K
    params = jax.tree.map(
      lambda p, a: p + jnp.where(emitted, -a / EVERY_K, jnp.zeros((), a.dtype)), params, acc
    )
    return params, (acc, jnp.where(emitted, 0, count))

  def fast(tx: optax.GradientTransformation) -> tuple[Callable[[Any], Any], Step]:
    def step(params: Any, state: Any, batch: Any) -> tuple[Any, Any]:
      return optaccum.apply_gradients(tx, gradient(params, batch), state, params)

    return tx.init, step

  def transformation(tx: optax.GradientTransformation) -> tuple[Callable[[Any], Any], Step]:
    def step(params: Any, state: Any, batch: Any) -> tuple[Any, Any]:
      updates, state = tx.update(gradient(params, batch), state, params)
      return optax.apply_updates(params, updates), state

    return tx.init, step

  def prescaled_init(params: Any) -> Any:
    return zeros(params), inner.init(params), jnp.zeros((), jnp.int32)

  def prescaled(params: Any, state: Any, batch: Any) -> tuple[Any, Any]:
    # The window's mean formed in the closing micro-step's add, outside the
    # conditional, so that the inner optimizer reads the accumulator itself.
    acc, inner_state, count = state
    opened, count = count > 0, count + 1
    closing = count == EVERY_K
    scale = jnp.where(closing, jnp.float32(1 / EVERY_K), jnp.float32(1))
    acc = jax.tree.map(
      lambda a, g: (jnp.where(opened, a, jnp.zeros((), a.dtype)) + g) * scale,
      acc,
      gradient(params, batch),
    )

    def close(operand: tuple[Any, Any]) -> tuple[Any, Any]:
      updates, new_state = inner.update(acc, operand[1], operand[0])
      return optax.apply_updates(operand[0], updates), new_state

    params, inner_state = jax.lax.cond(closing, close, lambda o: o, (params, inner_state))
    return params, (acc, inner_state, jnp.where(closing, 0, count))

  return {
    "plain: optimizer every micro-step": (inner.init, plain),
    "floor: grad + acc + g": (zeros, floor),
    "floor + parameter write every call": (write_init, floor_and_write),
    "optaccum.apply_gradients (default)": fast(optaccum.accumulate(inner, EVERY_K)),
    "optaccum.apply_gradients(window_guard=False)": fast(
      optaccum.accumulate(inner, EVERY_K, window_guard=False)
    ),
    "optaccum.accumulate + apply_updates": transformation(optaccum.accumulate(inner, EVERY_K)),
    "optax.MultiSteps": transformation(optax.MultiSteps(inner, EVERY_K).gradient_transformation()),
    "hand-written: the mean formed in the closing add": (prescaled_init, prescaled),
  }


def hlo_summary(compiled: Any) -> str:
  """Copies (count, bytes), conditionals and memory analysis of a compiled program."""
  text = compiled.as_text()
  copies = re.findall(r"= (\w+)\[([\d,]*)\]\{[^}]*\} copy\(", text)
  size = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2, "pred": 1}
  copy_bytes = 0
  for dtype, dims in copies:
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    copy_bytes += n * size.get(dtype, 4)
  memory = _measure.memory_of(compiled)
  return (
    f"copies {len(copies)} ({copy_bytes / 2**20:.1f} MiB), "
    f"conditionals {text.count(' conditional(')}, whiles {text.count(' while(')}, "
    + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in memory.items())
  )


def main(argv: list[str] | None = None) -> dict[str, float]:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.fast_path_limit")
  parser.add_argument("--steps", type=int, default=2000, help="micro-steps per round")
  parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
  parser.add_argument("--optimizer", choices=("issue", "suite"), default="issue")
  parser.add_argument("--only", default="", help="comma-separated name prefixes to run")
  parser.add_argument("--hlo", action="store_true", help="print what each program holds")
  args = parser.parse_args(argv)
  if args.steps < 1 or args.rounds < 1:
    parser.error(f"--steps and --rounds must be at least 1, got {args.steps}, {args.rounds}")

  workload = lm.workload("lm-params", "", lm.PARAMETER_HEAVY, EVERY_K)
  print(f"{workload.description} | optimizer {args.optimizer} | {_measure.machine_description()}")
  batches = workload.micro_batches
  chosen = methods(args.optimizer, workload.grad_fn)
  if args.only:
    prefixes = [p.strip() for p in args.only.split(",")]
    chosen = {n: m for n, m in chosen.items() if any(n.startswith(p) for p in prefixes)}

  live: dict[str, list[Any]] = {}
  compiled: dict[str, Any] = {}
  for name, (init, step) in chosen.items():
    params = jax.tree.map(jnp.copy, workload.params)
    state = jax.jit(init)(params)
    started = time.perf_counter()
    compiled[name] = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, batches[0]).compile()
    if args.hlo:
      print(
        f"  {name}: compiled in {time.perf_counter() - started:.1f} s; "
        f"{hlo_summary(compiled[name])}",
        flush=True,
      )
    live[name] = [params, state, 0]

  def run(name: str, steps: int) -> Any:
    holder, program = live[name], compiled[name]
    for _ in range(steps):
      holder[0], holder[1] = program(holder[0], holder[1], batches[holder[2] % EVERY_K])
      holder[2] += 1
    return holder[:2]

  for name in chosen:
    jax.block_until_ready(run(name, EVERY_K))  # warm-up window
  faults = dict.fromkeys(chosen, 0)

  def timed_round(name: str) -> float:
    # Minor page faults: a temporary buffer that the allocator maps afresh on
    # every call (glibc serves blocks over 32 MiB with mmap) faults its pages in
    # on every call.
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    seconds = _measure.timed(lambda: run(name, args.steps)) / args.steps
    faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    return seconds

  medians = _measure.interleaved_medians(
    {name: functools.partial(timed_round, name) for name in chosen}, args.rounds
  )
  for name, s in medians.items():
    per_step = faults[name] / (args.steps * args.rounds)
    temp = _measure.memory_of(compiled[name])["temp"] / 2**20
    print(
      f"  {name:48s} {s * 1e3:7.2f} ms / micro-step, {per_step:7.0f} minor faults / micro-step, "
      f"temp {temp:5.1f} MiB"
    )
  plain = medians.get("plain: optimizer every micro-step")
  floor = medians.get("floor: grad + acc + g")
  if plain is not None and floor is not None:
    limit = floor + (plain - floor) / EVERY_K
    print(f"  {'limit = floor + (plain - floor) / k':48s} {limit * 1e3:7.2f} ms")
    for name, s in medians.items():
      if name.startswith(("optaccum", "optax", "floor +")):
        print(f"  {name:48s} {limit / s:5.2f}x of the limit")
  return medians


if __name__ == "__main__":
  main()

"""Trace and compile time of one jitted micro-step on a many-leaf model.

`python -m benchmarks.compile_time [--layers N] [--rounds R]`. The model is N
layers of a 16x16 matrix and a bias (2N leaves), the optimizer
`clip_by_global_norm` + `adamw`, k = 4; the step takes the gradients as an
argument (donated, as the temporaries of a gradient computed in the step
would be), so the time is the optimizer's and the accumulation's alone. Each
method's step is traced (`jax.jit(...).lower`) and compiled afresh in every
round, in rotating order; the table gives medians and the ratio to plain
training. A wrapper counts how many times the inner optimizer's `update` is
traced per step. The floor row is the least any accumulation compiles: a
hand-written `acc + g` and one `lax.cond` around the optimizer, with no guard,
skip or counters.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

import optaccum

EVERY_K = 4


@dataclasses.dataclass(frozen=True)
class Row:
  """One method's medians: seconds to trace and to compile, and inner traces per step."""

  name: str
  trace_s: float
  compile_s: float
  traces: int


def model(layers: int) -> dict[str, Any]:
  """`layers` dense layers of 16x16 and a bias: 2 * layers leaves."""
  return {f"layer{i}": {"w": jnp.zeros((16, 16)), "b": jnp.zeros(16)} for i in range(layers)}


class _Counted:
  """An optimizer whose `update` counts how often it is traced."""

  def __init__(self) -> None:
    self.traces = 0
    self.inner = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))

  def transformation(self) -> optax.GradientTransformation:
    def update(updates: Any, state: Any, params: Any = None) -> Any:
      self.traces += 1
      return self.inner.update(updates, state, params)

    return optax.GradientTransformation(self.inner.init, update)


def _with_updates(tx: optax.GradientTransformation) -> Callable[..., Any]:
  def step(params: Any, state: Any, grads: Any) -> Any:
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return step


def _hand_written(
  inner: optax.GradientTransformation,
) -> tuple[Callable[..., Any], Callable[..., Any]]:
  """The floor: the least an accumulation compiles, `acc + g` and one conditional.

  One `lax.cond` around the optimizer and the parameter write, the window's
  mean as `acc / k`, no window guard, no skip, no counters beyond the
  micro-step: what any accumulation must compile on top of plain training.
  """

  def init(params: Any) -> Any:
    return inner.init(params), optax.tree.zeros_like(params), jnp.zeros((), jnp.int32)

  def step(params: Any, state: Any, grads: Any) -> Any:
    inner_state, acc, mini_step = state
    acc = jax.tree.map(lambda a, g: jnp.where(mini_step > 0, a, 0) + g, acc, grads)
    mini_step = mini_step + 1

    def close(operand: Any) -> Any:
      current, opt_state = operand
      mean = jax.tree.map(lambda a: a / EVERY_K, acc)
      updates, opt_state = inner.update(mean, opt_state, current)
      return optax.apply_updates(current, updates), opt_state

    closes = mini_step >= EVERY_K
    params, inner_state = jax.lax.cond(closes, close, lambda o: o, (params, inner_state))
    return params, (inner_state, acc, jnp.where(closes, 0, mini_step))

  return init, step


def _methods(counter: _Counted) -> dict[str, tuple[Callable[..., Any], Callable[..., Any]]]:
  """Name -> (init, step), each around the counted optimizer."""
  inner = counter.transformation()
  accumulate = optaccum.accumulate(inner, EVERY_K)
  multisteps = optax.MultiSteps(inner, EVERY_K).gradient_transformation()

  def fast(params: Any, state: Any, grads: Any) -> Any:
    return optaccum.apply_gradients(accumulate, grads, state, params)

  return {
    "plain: optimizer every micro-step": (inner.init, _with_updates(inner)),
    "floor: hand-written acc + g, one lax.cond, no guard": _hand_written(inner),
    "optax.MultiSteps": (multisteps.init, _with_updates(multisteps)),
    "optaccum.accumulate": (accumulate.init, _with_updates(accumulate)),
    "optaccum.apply_gradients": (accumulate.init, fast),
  }


def _compile_once(name: str, params: Any, options: dict | None) -> tuple[float, float, int]:
  counter = _Counted()
  init, step = _methods(counter)[name]
  state = init(params)
  start = time.perf_counter()
  # optax's adamw and MultiSteps fail strict promotion; the suite's setting.
  with jax.numpy_dtype_promotion("standard"):
    grads = jax.tree.map(jnp.ones_like, params)
    lowered = jax.jit(step, donate_argnums=(0, 1, 2)).lower(params, state, grads)
  traced = time.perf_counter()
  lowered.compile(options) if options else lowered.compile()
  return traced - start, time.perf_counter() - traced, counter.traces


def measure(layers: int, rounds: int, options: dict | None = None) -> list[Row]:
  """Medians over `rounds` interleaved rounds of every method's trace and compile."""
  params = model(layers)
  names = list(_methods(_Counted()))
  samples: dict[str, list[tuple[float, float, int]]] = {name: [] for name in names}
  for round_index in range(rounds):
    shift = round_index % len(names)
    for name in names[shift:] + names[:shift]:
      samples[name].append(_compile_once(name, params, options))
  return [
    Row(
      name,
      statistics.median(s[0] for s in samples[name]),
      statistics.median(s[1] for s in samples[name]),
      samples[name][0][2],
    )
    for name in names
  ]


def table(rows: list[Row]) -> str:
  """Markdown: seconds, the ratio of trace + compile to plain's, inner traces per step."""
  plain = rows[0].trace_s + rows[0].compile_s
  lines = [
    "| method | trace (s) | compile (s) | trace + compile (s) | vs plain | inner traces |",
    "|---|---|---|---|---|---|",
  ]
  for row in rows:
    total = row.trace_s + row.compile_s
    lines.append(
      f"| {row.name} | {row.trace_s:.2f} | {row.compile_s:.2f} | {total:.2f} | "
      f"{total / plain:.2f}x | {row.traces} |"
    )
  return "\n".join(lines)


_PASS_TIME = re.compile(r"HLO pass: (\S+) time: ([\d.]+) (us|ms|s) ")
_SECONDS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def pass_times(name: str, layers: int) -> tuple[float, collections.Counter]:
  """XLA's own time per HLO pass for one compile of `name`, from its log; and the compile time.

  Runs the compile in a child process with XLA's pass-pipeline log on (the
  logging slows the compile itself a little, the same for every method).
  """
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="0", TF_CPP_VMODULE="hlo_pass_pipeline=1")
  command = [sys.executable, "-W", "ignore", "-m", "benchmarks.compile_time", "--one", name]
  child = subprocess.run(
    command + ["--layers", str(layers)],
    env=env,
    cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    capture_output=True,
    text=True,
    check=True,
  )
  passes: collections.Counter = collections.Counter()
  for match in _PASS_TIME.finditer(child.stderr):
    passes[match.group(1)] += float(match.group(2)) * _SECONDS[match.group(3)]
  return float(child.stdout.split()[-1]), passes


def passes_table(layers: int, names: list[str], top: int = 4) -> str:
  """Markdown: compile time, the time in HLO passes, and the passes that take longest."""
  lines = ["| method | compile (s) | HLO passes (s) | longest passes (s) |", "|---|---|---|---|"]
  for name in names:
    compile_s, passes = pass_times(name, layers)
    longest = ", ".join(f"{p} {t:.2f}" for p, t in passes.most_common(top))
    lines.append(f"| {name} | {compile_s:.2f} | {sum(passes.values()):.2f} | {longest} |")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.compile_time")
  parser.add_argument("--layers", type=int, default=300, help="dense layers (2 leaves each)")
  parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
  parser.add_argument(
    "--passes", action="store_true", help="time XLA's HLO passes per method (one compile each)"
  )
  parser.add_argument("--one", help=argparse.SUPPRESS)  # a child of --passes: compile one method
  args = parser.parse_args(argv)
  if args.one:
    print(_compile_once(args.one, model(args.layers), None)[1])
  elif args.passes:
    print(passes_table(args.layers, list(_methods(_Counted()))))
  else:
    print(table(measure(args.layers, args.rounds)))


if __name__ == "__main__":
  main()

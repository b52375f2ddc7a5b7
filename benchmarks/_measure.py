"""Timing and memory measurement shared by the benchmarks.

Timings are interleaved: each round runs every method once, in a rotating
order, and the result per method is the median over rounds, so slow phases of a
shared machine hit all methods alike. Memory comes from XLA's compiled memory
analysis, not from the allocator.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def compiled_memory(jitted: Any, *args: Any) -> dict[str, int]:
  """Bytes of temporaries, arguments and outputs of the compiled program."""
  return memory_of(jitted.lower(*args).compile())


def memory_of(compiled: Any) -> dict[str, int]:
  """Bytes of temporaries, arguments and outputs of a compiled executable."""
  analysis = compiled.memory_analysis()
  return {
    "temp": int(analysis.temp_size_in_bytes),
    "argument": int(analysis.argument_size_in_bytes),
    "output": int(analysis.output_size_in_bytes),
    "alias": int(analysis.alias_size_in_bytes),
  }


def interleaved_medians(runners: dict[str, Callable[[], float]], rounds: int) -> dict[str, float]:
  """Median over `rounds` of each runner's returned seconds, in rotating order."""
  samples: dict[str, list[float]] = {name: [] for name in runners}
  names = list(runners)
  if not names:
    return {}
  for round_index in range(rounds):
    shift = round_index % len(names)
    for name in names[shift:] + names[:shift]:
      samples[name].append(runners[name]())
  return {name: statistics.median(values) for name, values in samples.items()}


def timed(fn: Callable[[], Any]) -> float:
  """Seconds to run `fn` to completion (its outputs blocked on)."""
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def machine_description() -> str:
  import optax

  device = jax.devices()[0]
  return (
    f"{device.platform}: {getattr(device, 'device_kind', device.platform)}, "
    f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores visible, "
    f"jax {jax.__version__}, optax {optax.__version__}, Python {platform.python_version()}"
  )


def load_average() -> str:
  """The 1, 5 and 15 minute load averages, as `uptime` prints them."""
  return ", ".join(f"{value:.2f}" for value in os.getloadavg())


@dataclasses.dataclass(frozen=True)
class Result:
  """What one method measured on one workload.

  Attributes:
    name: the method's label.
    family: the method's family (see `benchmarks._methods.Method`).
    micro_step_s: median over rounds of one window's time, divided by k.
    non_emitting_s: median time of the window's first call alone, where that
      call is a micro-step that does not close the window; else None.
    memory: bytes of temporaries, arguments and outputs, each the largest
      over the method's compiled programs.
    form: the limit it is held to (see `benchmarks._methods.Method`).
  """

  name: str
  family: str
  micro_step_s: float
  non_emitting_s: float | None
  memory: dict[str, int]
  form: str = ""


def measure_methods(
  methods: list[Any],
  params: Any,
  micro_batches: list[Any],
  whole_batch: Any,
  rounds: int,
  *,
  non_emitting: bool = False,
  compiler_options: dict[str, Any] | None = None,
) -> list[Result]:
  """Compiles every method, then times whole windows of all of them, interleaved.

  Each method trains its own copy of `params`, with donated parameters and
  state, on the same micro-batches. A window is the method's plan (k
  micro-steps); its time divided by k is the time per micro-step.

  Args:
    methods: `benchmarks._methods.Method`s.
    params: initial parameters.
    micro_batches: the window's k micro-batches.
    whole_batch: the same data as one batch, for in-step micro-batching.
    rounds: timed rounds (after one untimed warm-up window).
    non_emitting: also time the first micro-step of a window on its own.
    compiler_options: XLA options for every compilation.

  Returns:
    One `Result` per method, in order.
  """
  every_k = len(micro_batches)

  def batch_for(key: Any) -> Any:
    if key is None:
      return None
    return whole_batch if isinstance(key, str) else micro_batches[key]

  live: dict[str, list[Any]] = {}
  executables: dict[str, dict[str, Any]] = {}
  memory: dict[str, dict[str, int]] = {}
  for method in methods:
    method_params = jax.tree.map(jnp.copy, params)
    # Jitted: run eagerly, an init dispatches (and compiles) op by op.
    state = jax.jit(method.init)(method_params)
    executables[method.name] = {}
    memory[method.name] = {}
    for program_name, program in method.programs.items():
      batch = next(batch_for(key) for name, key in method.plan if name == program_name)
      lowered = jax.jit(program, donate_argnums=(0, 1)).lower(method_params, state, batch)
      compiled = lowered.compile(compiler_options) if compiler_options else lowered.compile()
      executables[method.name][program_name] = compiled
      for kind, size in memory_of(compiled).items():
        memory[method.name][kind] = max(memory[method.name].get(kind, 0), size)
    live[method.name] = [method_params, state]

  def call(method: Any, entry: tuple[str, Any]) -> Any:
    holder = live[method.name]
    program_name, key = entry
    holder[0], holder[1] = executables[method.name][program_name](
      holder[0], holder[1], batch_for(key)
    )
    return holder

  def window(method: Any) -> float:
    def run() -> Any:
      for entry in method.plan:
        holder = call(method, entry)
      return holder

    return timed(run) / every_k

  def first_micro_step(method: Any) -> float:
    seconds = timed(lambda: call(method, method.plan[0]))
    for entry in method.plan[1:]:
      call(method, entry)
    jax.block_until_ready(live[method.name])
    return seconds

  for method in methods:
    window(method)  # warm up: the first call of an executable pays extra
  per_window = interleaved_medians(
    {method.name: (lambda m=method: window(m)) for method in methods}, rounds
  )
  has_non_emitting = {m.name: non_emitting and len(m.plan) >= every_k > 1 for m in methods}
  per_first = interleaved_medians(
    {m.name: (lambda m=m: first_micro_step(m)) for m in methods if has_non_emitting[m.name]},
    rounds,
  )
  return [
    Result(
      name=method.name,
      family=method.family,
      micro_step_s=per_window[method.name],
      non_emitting_s=per_first.get(method.name),
      memory=memory[method.name],
      form=method.form,
    )
    for method in methods
  ]

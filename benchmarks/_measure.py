"""Timing and memory measurement shared by the benchmarks.

Timings are interleaved: each round runs every method once, in a rotating
order, and the result per method is the median over rounds, so slow phases of a
shared machine hit all methods alike. Memory comes from XLA's compiled memory
analysis, not from the allocator.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax


def compiled_memory(jitted: Any, *args: Any) -> dict[str, int]:
  """Bytes of temporaries, arguments and outputs of the compiled program."""
  analysis = jitted.lower(*args).compile().memory_analysis()
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
    f"{platform.processor() or platform.machine()}, jax {jax.__version__}, "
    f"optax {optax.__version__}, Python {platform.python_version()}"
  )

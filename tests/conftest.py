"""Shared test setup: strict dtype promotion, and child processes with many CPU devices."""

import json
import os
import pathlib
import subprocess
import sys
import time

import jax
import pytest

# Promotion bugs (a bfloat16 gradient meeting a float32 accumulator) surface here
# as errors rather than as silent upcasts.
jax.config.update("jax_numpy_dtype_promotion", "strict")

REPO = pathlib.Path(__file__).resolve().parent.parent


def run_processes(commands: list[list[str]], *, num_devices: int, timeout: float) -> list:
  """Runs `python *args` for each command at once, each with `num_devices` CPU devices.

  Returns the last line each process prints, read as JSON.

  The device count is fixed when JAX starts, so multi-device checks run in
  processes of their own. Whatever happens, no child outlives the call.
  """
  # XLA:CPU runs each device's part of a collective on its own thread and aborts
  # the process when one thread is 40 s late; on two loaded cores (the other
  # pytest worker, several examples) an 8-device child can be that late
  # without anything being wrong, so the children wait longer.
  patience = "--xla_cpu_collective_call_terminate_timeout_seconds=600"
  env = dict(
    os.environ,
    XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices} {patience}",
    JAX_PLATFORMS="cpu",
  )
  procs = [
    subprocess.Popen(
      [sys.executable, *args],
      cwd=REPO,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for args in commands
  ]
  deadline = time.monotonic() + timeout
  try:
    outputs = [proc.communicate(timeout=max(deadline - time.monotonic(), 0)) for proc in procs]
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.communicate()
  results = []
  for args, proc, (stdout, stderr) in zip(commands, procs, outputs):
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{stderr[-4000:]}"
    results.append(json.loads(stdout.strip().splitlines()[-1]))
  return results


def run_python(args: list[str], *, num_devices: int, timeout: float) -> dict:
  """`run_processes` for one command."""
  (result,) = run_processes([args], num_devices=num_devices, timeout=timeout)
  return result


@pytest.fixture(name="run_python", scope="session")
def _run_python_fixture():
  return run_python


@pytest.fixture(name="run_processes", scope="session")
def _run_processes_fixture():
  return run_processes

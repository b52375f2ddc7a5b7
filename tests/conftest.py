"""Shared test setup: strict dtype promotion, and child processes with many CPU devices."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest

# Promotion bugs (a bfloat16 gradient meeting a float32 accumulator) surface here
# as errors rather than as silent upcasts.
jax.config.update("jax_numpy_dtype_promotion", "strict")

REPO = pathlib.Path(__file__).resolve().parent.parent


def run_python(args: list[str], *, num_devices: int, timeout: float) -> dict:
  """Runs `python *args` in the repository with `num_devices` CPU devices.

  Returns the last line the child prints, read as JSON.

  The device count is fixed when JAX starts, so multi-device checks run in a
  process of their own.
  """
  env = dict(
    os.environ,
    XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices}",
    JAX_PLATFORMS="cpu",
  )
  proc = subprocess.run(
    [sys.executable, *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )
  assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stderr[-4000:]}"
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(name="run_python", scope="session")
def _run_python_fixture():
  """`run_python(args, num_devices=..., timeout=...)`, see above."""
  return run_python

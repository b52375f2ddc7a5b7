"""Two processes on JAX's distributed runtime train as one: identical, and equal to one process.

tests/checks/multiprocess.py is started three times at once: two workers that
join over 127.0.0.1 (gloo CPU collectives, 2 devices each) and train with
optaccum (inside `data_parallel`, then under plain `jax.jit` with `axis_name`, then
ZeRO-1 with `parallel.shard_optimizer` on an Explicit mesh),
and one single-process large-batch optax run on the same global data.
"""

import socket

import numpy as np


def free_port():
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def test_two_processes_hold_identical_params_equal_to_one_process(run_processes):
  port = str(free_port())
  worker = ["-m", "tests.checks.multiprocess", "--port", port, "--process-id"]
  first, second, reference = run_processes(
    [[*worker, "0"], [*worker, "1"], ["-m", "tests.checks.multiprocess", "--reference"]],
    num_devices=2,
    timeout=150,
  )
  assert {first["process_id"], second["process_id"]} == {0, 1}
  assert first["process_count"] == 2 and first["device_count"] == 4
  assert first["local_device_count"] == 2
  assert first["params"] == second["params"]  # bit for bit
  assert first["emitted"] == [False, True] * 3
  assert first["plain_jit_params"] == second["plain_jit_params"]
  assert first["plain_jit_emitted"] == [False, True] * 3
  # ZeRO-1 across processes: each device holds 2 of the momentum's 8 rows.
  assert first["zero1_params"] == second["zero1_params"]
  assert first["zero1_emitted"] == [False, True] * 3
  assert first["zero1_trace_shard"] == second["zero1_trace_shard"] == [2, 3]
  for name, expected in reference["params"].items():
    np.testing.assert_allclose(first["params"][name], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(first["plain_jit_params"][name], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(first["zero1_params"][name], expected, rtol=1e-5, atol=1e-6)

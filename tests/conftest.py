"""Shared test setup: strict dtype promotion, fast compiles, children with many CPU devices."""

import importlib.metadata
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time

# The suite's time goes to XLA compiling thousands of small programs; LLVM's
# optimization of their machine code is most of that and changes nothing a test
# reads: the optimized HLO (collectives, fusions, buffer sizes, memory analysis)
# is the same and results agree to float32 rounding. Set before JAX starts its
# CPU backend; the children below get it too (tests/interpreter.py, which runs
# the docs and examples as users run them, does not).
# An optimization level already in XLA_FLAGS wins.
FAST_COMPILE = "--xla_backend_optimization_level=0"


def _has_older_cpu_codegen() -> bool:
  """Whether this jaxlib's XLA:CPU still has the codegen that came before its fusion emitters.

  jaxlib 0.10 has both, and with the emitters the suite spends about half as long
  again compiling, for the same buffer assignment and memory analysis (the HLO
  differs only in single ops wrapped as fusions of one) and results equal to
  float32 rounding. jaxlib 0.12 has the emitters alone and aborts at JAX's start
  on a flag it does not know; 0.11 is untried, so it is left alone. Decided by
  version: asking XLA would start the backend before the flags are read.
  """
  version = importlib.metadata.version("jaxlib").split(".")
  return tuple(int(part) for part in version[:2]) < (0, 11)


if _has_older_cpu_codegen():
  FAST_COMPILE += " --xla_cpu_use_fusion_emitters=false"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()

import jax  # noqa: E402
import pytest  # noqa: E402

# Promotion bugs (a bfloat16 gradient meeting a float32 accumulator) surface here
# as errors rather than as silent upcasts.
jax.config.update("jax_numpy_dtype_promotion", "strict")

REPO = pathlib.Path(__file__).resolve().parent.parent


def _child_env(num_devices: int) -> dict:
  """The environment of a child that JAX starts with `num_devices` CPU devices."""
  # XLA:CPU runs each device's part of a collective on its own thread and aborts
  # the process when one thread is 40 s late; on two loaded cores (the other
  # pytest worker, several examples) an 8-device child can be that late
  # without anything being wrong, so the children wait longer.
  patience = "--xla_cpu_collective_call_terminate_timeout_seconds=600"
  return dict(
    os.environ,
    XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices} {patience} {FAST_COMPILE}",
    JAX_PLATFORMS="cpu",
  )


def run_processes(commands: list[list[str]], *, num_devices: int, timeout: float) -> list:
  """Runs `python *args` for each command at once, each with `num_devices` CPU devices.

  Returns the last line each process prints, read as JSON.

  The device count is fixed when JAX starts, so multi-device checks run in
  processes of their own. Whatever happens, no child outlives the call.
  """
  procs = [
    subprocess.Popen(
      [sys.executable, *args],
      cwd=REPO,
      env=_child_env(num_devices),
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


# --- The 8-device checks: one child for the whole run, started at collection ---------------
#
# A test module whose checks need 8 devices marks itself
#   pytestmark = pytest.mark.eight_devices("name", module="tests.checks.x")  # or code="..."
# and reads the check's result (the last line it prints, as JSON) from the
# `eight_devices` fixture. Once the tests are collected, one child process
# (tests/checks/one_process.py) runs every selected module's check, one after
# another, in the background: the pytest workers go on with other files, and
# each check pays for starting Python, JAX and 8 devices once instead of once
# per file. With pytest-xdist the workers share the child: the first to collect
# starts it in a folder they all see, and each reads the results from there.

EIGHT_DEVICE_TIMEOUT = 900  # seconds from the child's start to its last check's end


def _eight_device_checks(items) -> list:
  """`[name, module, code]` of each check the selected tests read, in the tests' order."""
  checks = {}
  for item in items:
    marker = item.get_closest_marker("eight_devices")
    if marker is not None and "eight_devices" in getattr(item, "fixturenames", ()):
      name = marker.args[0]
      checks.setdefault(name, [name, marker.kwargs.get("module"), marker.kwargs.get("code")])
  return list(checks.values())


def _shared_folder(config) -> pathlib.Path:
  """A folder all the run's workers see: xdist gives each a basetemp in a common one."""
  if hasattr(config, "workerinput") and config.option.basetemp:
    return pathlib.Path(config.option.basetemp).parent / "eight-device-checks"
  if not hasattr(config, "_eight_devices_folder"):
    config._eight_devices_folder = pathlib.Path(tempfile.mkdtemp(prefix="eight-device-checks-"))
  return config._eight_devices_folder


def pytest_configure(config):
  config.addinivalue_line(
    "markers",
    "eight_devices(name, module=None, code=None): the module's tests read the result of "
    "a check run in the suite's 8-device child (tests/conftest.py)",
  )


def pytest_collection_finish(session):
  config = session.config
  checks = _eight_device_checks(session.items)
  if not checks or config.option.collectonly:
    return
  folder = _shared_folder(config)
  folder.mkdir(parents=True, exist_ok=True)
  try:  # one launcher per run, whichever worker gets here first
    os.close(os.open(folder / "started", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
  except FileExistsError:
    return
  (folder / "checks.json").write_text(json.dumps(checks))
  with open(folder / "stderr.txt", "w") as stderr:
    # The shell records the exit code even when XLA aborts the interpreter.
    config._eight_devices_child = subprocess.Popen(
      ["/bin/sh", "-c", '"$0" -m tests.checks.one_process "$1"; echo $? > "$1/exit_code"']
      + [sys.executable, str(folder)],
      cwd=REPO,
      env=_child_env(8),
      stdout=subprocess.DEVNULL,
      stderr=stderr,
      start_new_session=True,
    )


def pytest_sessionfinish(session):
  # The launcher waits for its child (under xdist the other worker may still read
  # from it; alone, it has written every result and is exiting) unless the run
  # is stopping; no child outlives the run.
  config = session.config
  child = getattr(config, "_eight_devices_child", None)
  if child is None:
    return
  folder = _shared_folder(config)
  try:
    if not (session.shouldfail or session.shouldstop):
      started = (folder / "started").stat().st_mtime
      child.wait(timeout=max(started + EIGHT_DEVICE_TIMEOUT - time.time(), 0))
  except subprocess.TimeoutExpired:
    pass
  finally:
    if child.poll() is None:
      os.killpg(child.pid, signal.SIGKILL)
      child.wait()
    if not hasattr(config, "workerinput"):
      shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def eight_devices(request):
  """The result of the module's `eight_devices` check, waited for as long as it runs."""
  marker = request.node.get_closest_marker("eight_devices")
  assert marker is not None, f"{request.node.name} needs pytestmark = pytest.mark.eight_devices"
  folder = _shared_folder(request.config)
  name = marker.args[0]
  deadline = time.time() + EIGHT_DEVICE_TIMEOUT
  while True:
    ended = (folder / "exit_code").exists()  # before the result: written after them all
    if (folder / f"{name}.json").exists():
      record = json.loads((folder / f"{name}.json").read_text())
      assert "error" not in record, f"the 8-device check {name!r} failed:\n{record['error']}"
      return record["result"]
    if ended:
      stderr = (folder / "stderr.txt").read_text()[-4000:]
      exit_code = (folder / "exit_code").read_text().strip()
      pytest.fail(f"the 8-device child exited ({exit_code}) before check {name!r}:\n{stderr}")
    if (folder / "started").exists():
      deadline = min(deadline, (folder / "started").stat().st_mtime + EIGHT_DEVICE_TIMEOUT)
    if time.time() > deadline:
      pytest.fail(f"the 8-device check {name!r} did not finish in {EIGHT_DEVICE_TIMEOUT} s")
    time.sleep(0.2)

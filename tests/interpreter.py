"""Runs several scripts in one fresh interpreter, each in a namespace of its own.

Each fresh `python` pays JAX's, Optax's and Flax's import (seconds on two cores);
the documentation blocks and the examples are many short scripts, so they share
one interpreter per group. Each script still runs as `__main__`, as written, with
warnings as errors, its own globals, and its stdout and stderr captured apart.
What a script changes in the process (the JAX configuration, `XLA_FLAGS`) would
leak into the next one: callers run such scripts on their own (`needs_own_process`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

# Code that changes the process for whatever runs after it, or that must start
# before JAX is imported.
_PROCESS_WIDE = ("XLA_FLAGS", "jax.config", "os.environ", "multiprocessing", "jax.distributed")

_DRIVER = r"""
import contextlib, io, json, runpy, sys, traceback, warnings
scripts, results = json.load(open(sys.argv[1])), sys.argv[2]
for script_id, code, path in scripts:
  out, err = io.StringIO(), io.StringIO()
  code_ = 0
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    with warnings.catch_warnings():
      warnings.simplefilter("error")
      try:
        if path:
          sys.argv = [path]
          runpy.run_path(path, run_name="__main__")
        else:
          exec(compile(code, script_id, "exec"), {"__name__": "__main__"})
      except SystemExit as exit_:
        code_ = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
      except BaseException:
        traceback.print_exc()
        code_ = 1
  with open(results, "a") as sink:
    sink.write(json.dumps([script_id, code_, out.getvalue(), err.getvalue()]) + "\n")
"""


class Result(NamedTuple):
  """What one script did: its exit code (0 when it returned), stdout and stderr."""

  returncode: int
  stdout: str
  stderr: str


def needs_own_process(code: str) -> bool:
  """Whether `code` changes the process for later scripts (or must precede JAX's import)."""
  return any(word in code for word in _PROCESS_WIDE)


def run_scripts(
  scripts: list[tuple[str, str, str]], *, cwd: Path, timeout: float
) -> dict[str, Result | str]:
  """Runs `(id, code, path)` scripts (code, or a file at path) in one fresh interpreter.

  Returns each script's `Result` by id, or a string saying why it has none (the
  interpreter timed out or died before reaching it).
  """
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  with tempfile.TemporaryDirectory() as scratch:
    listing, results = Path(scratch, "scripts.json"), Path(scratch, "results.jsonl")
    listing.write_text(json.dumps(scripts))
    args = [sys.executable, "-W", "error", "-c", _DRIVER, str(listing), str(results)]
    with subprocess.Popen(
      args,
      cwd=cwd,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      start_new_session=True,  # a timeout also ends what the scripts started
    ) as process:
      try:
        _, stderr = process.communicate(timeout=timeout)
        why = f"was not reached: the interpreter exited with {process.returncode}: {stderr[-2000:]}"
      except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        why = f"did not finish: the group's interpreter ran past {timeout} s"
    done = {}
    if results.exists():
      for line in results.read_text().splitlines():
        script_id, code, stdout, stderr = json.loads(line)
        done[script_id] = Result(code, stdout, stderr)
  return {script_id: done.get(script_id, why) for script_id, _, _ in scripts}

"""Runs several scripts in one fresh interpreter, each in a namespace of its own.

Each fresh `python` pays JAX's, Optax's and Flax's import (seconds on two cores);
the documentation blocks and the examples are many short scripts, so they share
one interpreter per group. Each script still runs as `__main__`, as written, with
warnings as errors, its own globals, and its stdout and stderr captured apart.
What a script changes in the process (the JAX configuration, `XLA_FLAGS`) would
leak into the next one: callers run such scripts on their own (`needs_own_process`).

Used by `tests/test_examples.py` (the examples), `tests/test_docs.py` (README.md's
blocks) and the site's build hook `docs/hooks/execute.py` (the guides' blocks), which
loads this file by its path: it imports nothing from the tests.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
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
      # As in pyproject.toml: orbax-checkpoint 0.12's import under jax 0.12.
      warnings.filterwarnings(
        "ignore", "jax.sharding.SingleDeviceSharding is deprecated", DeprecationWarning
      )
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


# A fence may be indented, as in a list item; its block is indented as much.
FENCE = re.compile(r"^(?P<indent> *)```python\n(?P<code>.*?)^(?P=indent)```$", re.M | re.S)


class Block(NamedTuple):
  """One ```python block of a Markdown document: its fence's line (from 1) and its code."""

  line: int
  code: str


def python_blocks(text: str) -> list[Block]:
  """The ```python blocks of a Markdown text, in order, each dedented by its fence's indent."""
  blocks = []
  for match in FENCE.finditer(text):
    indent = len(match["indent"])
    code = "".join(line[indent:] for line in match["code"].splitlines(keepends=True))
    blocks.append(Block(text.count("\n", 0, match.start()) + 1, code))
  return blocks


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


def run_blocks(
  blocks: dict[str, str], *, cwd: Path, timeout_per_block: float, parallel: int = 2
) -> dict[str, Result | str]:
  """Runs documentation blocks, given by id `"DOCUMENT:LINE"`, a document's in one interpreter.

  A block that changes the process (`needs_own_process`) gets an interpreter of its
  own. `parallel` interpreters run at a time (the machines that build and test have
  two cores). Returns what `run_scripts` returns, for every id.
  """
  groups: dict[str, list[tuple[str, str, str]]] = {}
  for block_id, code in blocks.items():
    key = block_id if needs_own_process(code) else block_id.rsplit(":", 1)[0]
    groups.setdefault(key, []).append((block_id, code, ""))

  def run(group: list[tuple[str, str, str]]) -> dict[str, Result | str]:
    return run_scripts(group, cwd=cwd, timeout=timeout_per_block * len(group))

  results: dict[str, Result | str] = {}
  with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
    for done in pool.map(run, groups.values()):
      results.update(done)
  return results


def check_documents(
  documents: dict[str, str], *, cwd: Path, timeout_per_block: float, parallel: int = 2
) -> dict[str, list[str]]:
  """Runs the python blocks of Markdown documents, given as `{name: text}`, as `run_blocks` does.

  Returns each document's failures, one message per failed block naming the
  document, the block's number (from 1) and line, and its error; an empty list for a
  document whose blocks all ran (or that has none).
  """
  blocks: dict[str, str] = {}
  where: dict[str, tuple[str, str]] = {}
  for name, text in documents.items():
    for number, block in enumerate(python_blocks(text), start=1):
      blocks[f"{name}:{block.line}"] = block.code
      where[f"{name}:{block.line}"] = (name, f"{name}, block {number} (line {block.line})")
  failures: dict[str, list[str]] = {name: [] for name in documents}
  results = run_blocks(blocks, cwd=cwd, timeout_per_block=timeout_per_block, parallel=parallel)
  for block_id, result in results.items():
    name, place = where[block_id]
    if isinstance(result, str):
      failures[name].append(f"{place} {result}")
    elif result.returncode != 0:
      failures[name].append(f"{place} exited with {result.returncode}:\n{result.stderr[-4000:]}")
  return failures

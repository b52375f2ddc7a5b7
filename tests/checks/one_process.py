"""Runs several multi-device checks one after another in this one process.

Started by tests/conftest.py (`eight_devices`), with the device count already
in `XLA_FLAGS`:
  python -m tests.checks.one_process DIR
DIR/checks.json lists `[name, module, code]`: each check runs as `__main__`, as
`python -m module` (or `python -c code`) would run it, its stdout captured, and
the last line it prints, read as JSON, is its result. As each check ends,
DIR/<name>.json holds `{"result": ...}` or `{"error": "<traceback>"}`, so a test
can read its check's result while the later checks still run. A check's change
to the JAX configuration (strict dtype promotion) is undone before the next one.
One interpreter instead of one per check: each check no longer pays for
starting Python, JAX and the 8 CPU devices.
"""

from __future__ import annotations

import contextlib
import io
import json
import runpy
import sys
import traceback
from pathlib import Path

import jax


def run_check(name: str, module: str | None, code: str | None) -> dict:
  """The check's result (the last line it prints, as JSON), or the error it raised."""
  out = io.StringIO()
  argv = sys.argv
  try:
    with contextlib.redirect_stdout(out):
      if module is not None:
        sys.argv = [module]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
      else:
        sys.argv = ["-c"]
        exec(compile(code, name, "exec"), {"__name__": "__main__"})
    return {"result": json.loads(out.getvalue().strip().splitlines()[-1])}
  except BaseException:  # a check's failure (SystemExit included) is its result
    return {"error": f"{traceback.format_exc()[-4000:]}\nstdout:\n{out.getvalue()[-2000:]}"}
  finally:
    sys.argv = argv


def main() -> None:
  directory = Path(sys.argv[1])
  defaults = dict(jax.config.values)
  for name, module, code in json.loads((directory / "checks.json").read_text()):
    record = run_check(name, module, code)
    for key, value in defaults.items():
      if jax.config.values.get(key) != value:
        jax.config.update(key, value)
    partial = directory / f"{name}.json.partial"
    partial.write_text(json.dumps(record))
    partial.replace(directory / f"{name}.json")


if __name__ == "__main__":
  main()

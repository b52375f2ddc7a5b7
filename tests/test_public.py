"""The public surface: a small top level, sub-namespaces named after what they hold."""

import importlib
import inspect
import json
import subprocess
import sys
import types

import pytest

import optaccum

NAMESPACES = ["skip", "flax", "parallel", "checkpoint", "planning", "compat"]


def _public(module: types.ModuleType) -> set[str]:
  """Names a user sees on `module`: neither private nor the private modules it imports."""
  names = set()
  for name, value in vars(module).items():
    if name.startswith("_"):
      continue
    if isinstance(value, types.ModuleType) and value.__name__.split(".")[-1].startswith("_"):
      continue
    if name == "annotations":  # `from __future__ import annotations`
      continue
    names.add(name)
  return names


def test_top_level_exports_at_most_sixteen_names_and_all_lists_exactly_them():
  assert len(optaccum.__all__) <= 16
  assert sorted(optaccum.__all__) == optaccum.__all__
  assert _public(optaccum) == set(optaccum.__all__)


@pytest.mark.parametrize("name", NAMESPACES)
def test_each_namespace_all_lists_exactly_its_public_names(name):
  module = importlib.import_module(f"optaccum.{name}")
  assert getattr(optaccum, name) is module
  assert name in optaccum.__all__
  assert _public(module) == set(module.__all__)
  assert module.__doc__


def _every_public_object():
  for name in optaccum.__all__:
    value = getattr(optaccum, name)
    if isinstance(value, types.ModuleType):
      for inner in value.__all__:
        yield f"optaccum.{name}.{inner}", getattr(value, inner)
    else:
      yield f"optaccum.{name}", value


@pytest.mark.parametrize("qualified, value", list(_every_public_object()))
def test_every_public_function_documents_its_contract_with_an_example(qualified, value):
  doc = inspect.getdoc(value) or ""
  assert doc, f"{qualified} has no docstring"
  if inspect.isfunction(value):
    assert "Examples:" in doc, f"{qualified}'s docstring has no runnable example"
    if inspect.signature(value).parameters:
      assert "Args:" in doc, f"{qualified}'s docstring does not name its arguments"


# What an import does shows only in an interpreter that has imported nothing yet:
# one fresh child checks, in order, that `import optaccum` starts no JAX backend
# (`jax.distributed.initialize` must run before any does), that the package with its
# Flax and checkpoint namespaces imports neither Flax nor Orbax, and then, with
# Flax made unimportable, that `microbatch` of a plain function runs.
_FRESH_IMPORTS = """
import json, sys
import optaccum
from jax._src import xla_bridge
backend_started = bool(xla_bridge._backends)
import optaccum.flax, optaccum.checkpoint
imported = sorted(name for name in ("flax", "orbax") if name in sys.modules)
sys.modules["flax"] = None  # from here on, importing Flax fails
import jax, jax.numpy as jnp
loss, g = optaccum.microbatch(jax.value_and_grad(lambda w, x: jnp.mean(x * w)), 2)(
  jnp.float32(1), jnp.arange(4.0)
)
print(json.dumps({
  "backend_started": backend_started,
  "imported": imported,
  "microbatch": [float(loss), float(g)],
  "flax_imported": "flax" in sys.modules and sys.modules["flax"] is not None,
}))
"""


@pytest.fixture(scope="module")
def fresh_imports():
  result = subprocess.run(
    [sys.executable, "-c", _FRESH_IMPORTS], capture_output=True, text=True, timeout=120
  )
  assert result.returncode == 0, result.stderr
  return json.loads(result.stdout.strip().splitlines()[-1])


def test_import_does_not_start_the_backend(fresh_imports):
  assert not fresh_imports["backend_started"], "backend started at import"


def test_importing_the_package_imports_neither_flax_nor_orbax(fresh_imports):
  assert fresh_imports["imported"] == []


def test_import_without_flax_and_microbatch_of_a_plain_function(fresh_imports):
  assert fresh_imports["microbatch"] == [1.5, 1.5]
  assert not fresh_imports["flax_imported"]


PACKAGE = __import__("pathlib").Path(optaccum.__file__).parent
# The window core and the two forms built on it: across steps (the transformation
# and its fast path) and within one step (microbatch's scan).
CORE = ["_window.py", "_accumulate.py", "_microbatch.py"]


def test_the_window_core_and_its_two_forms_fit_in_1100_lines():
  lines = {name: len((PACKAGE / name).read_text().splitlines()) for name in CORE}
  assert sum(lines.values()) <= 1100, lines


def test_one_place_reduces_across_replicas_and_three_lines_branch_on_the_mode():
  # The replica policy owns the reduction (one psum, one sum over the replica
  # axis); outside it, at most three lines ask which mode is in force.
  mode = ("replicas.alone", "replicas.axes", "replicas.axis_name", "decide_apart")
  branching, reducing = [], []
  for path in sorted(PACKAGE.glob("*.py")):
    if path.name == "_replicas.py":
      continue
    for number, line in enumerate(path.read_text().splitlines(), 1):
      if any(word in line for word in mode):
        branching.append(f"{path.name}:{number}: {line.strip()}")
      if "lax.psum(" in line or "psum_scatter(" in line:
        reducing.append(f"{path.name}:{number}: {line.strip()}")
  assert len(branching) <= 3, branching
  assert reducing == [], reducing

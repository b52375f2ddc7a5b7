"""Optax's own `MultiSteps` tests, run unmodified against `optaccum.compat.MultiSteps`.

The test file ships in optax's wheel (`optax/transforms/_accumulation_test.py`).
Its source runs here as it is; only the module it tests, which it imports as
`_accumulation`, is replaced afterwards by a copy whose `MultiSteps` and
`MultiStepsState` are optaccum's. Its test methods look that module up when
they run, so each exercises optaccum's class. Every `MultiSteps` test of
optax 0.2.8 passes; none is excluded.
"""

from __future__ import annotations

import pathlib
import types
import unittest

import jax
import optax
import pytest

import optaccum

SOURCE = pathlib.Path(optax.__file__).parent / "transforms" / "_accumulation_test.py"
IMPORT = "from optax.transforms import _accumulation\n"

if not SOURCE.is_file():
  pytest.skip(
    f"optax {optax.__version__} ships no {SOURCE.name} at {SOURCE.parent}",
    allow_module_level=True,
  )


def _load_optax_tests() -> types.ModuleType:
  """Optax's test module, run from its source, testing optaccum's MultiSteps."""
  source = SOURCE.read_text()
  assert IMPORT in source, f"{SOURCE} no longer imports `_accumulation` as expected"
  module = types.ModuleType("optax_accumulation_test")
  module.__file__ = str(SOURCE)
  exec(compile(source, str(SOURCE), "exec"), module.__dict__)
  shim = types.ModuleType("_accumulation")
  shim.__dict__.update(vars(module._accumulation))
  shim.MultiSteps = optaccum.compat.MultiSteps
  shim.MultiStepsState = optaccum.compat.MultiStepsState
  module._accumulation = shim
  return module


# Kept in the module object only: a TestCase class among this file's globals
# would be collected by pytest and run whole, optax's other tests included.
OPTAX_TESTS = _load_optax_tests()
NAMES = sorted(unittest.TestLoader().getTestCaseNames(OPTAX_TESTS.AccumulationTest))
MULTI_STEPS_NAMES = [name for name in NAMES if "multi_steps" in name]


def test_optax_tests_are_found_and_aimed_at_optaccum():
  assert len(MULTI_STEPS_NAMES) >= 7, NAMES
  assert OPTAX_TESTS._accumulation.MultiSteps is optaccum.compat.MultiSteps


@pytest.mark.parametrize("name", MULTI_STEPS_NAMES)
def test_optax_multisteps_test_passes(name):
  result = unittest.TestResult()
  # Optax's tests (and optax's optimizers inside them) run under JAX's standard
  # promotion; the suite's conftest sets strict.
  with jax.numpy_dtype_promotion("standard"):
    OPTAX_TESTS.AccumulationTest(name).run(result)
  problems = [f"{test}:\n{trace}" for test, trace in result.failures + result.errors]
  assert result.testsRun == 1 and not problems and not result.skipped, "\n".join(problems)

"""ZeRO-1: AdamW's state sharded over the replicas, parameters replicated (8 CPU devices).

The check (tests/checks/zero1.py) runs in the shared 8-device child
(`eight_devices` in conftest.py); its numbers are counted in the compiled program.
"""

import pytest

pytestmark = pytest.mark.eight_devices("zero1", module="tests.checks.zero1")


@pytest.fixture(name="results", scope="module")
def _results(eight_devices):
  return eight_devices


FORMS = ["apply_gradients", "update", "microbatch"]


@pytest.mark.parametrize("form", FORMS)
def test_one_gradient_reduction_and_one_gather_of_the_updates_per_window(results, form):
  result = results[form]
  gradient = result["gradient_bytes"]
  # Once per window, in the closing step: the window's gradient reduced (an
  # all-reduce, sliced into the sharded optimizer: XLA:CPU has no reduce-scatter)
  # and AdamW's sharded updates gathered to the parameters' layout, one leaf each
  # (in one step, by the caller's reshard). microbatch's reduction may carry the
  # loss too (a float32 scalar or two, as the JAX version's compiler keeps them).
  extra = 8 if form == "microbatch" else 0
  assert result["all-reduce"] == 1
  assert gradient <= result["all-reduce bytes"] <= gradient + extra
  assert (result["all-gather"], result["all-gather bytes"]) == (3, gradient)
  assert result["reduce-scatter"] == 0


@pytest.mark.parametrize("form", FORMS)
def test_the_state_stays_sharded_the_parameters_replicated_and_equal_to_the_large_batch(
  results, form
):
  result = results[form]
  assert result["mu_bytes_per_device"] * 8 == result["mu_bytes"]
  assert result["params_spec"] == ["P(None, None)"] * 3
  assert result["relative_error"] < 1e-6

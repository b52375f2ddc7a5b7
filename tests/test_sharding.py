"""Accumulators take the parameters' sharding and add no collective (8 CPU devices).

The measurements come from tests/checks/sharding.py, run in the suite's 8-device
child (`eight_devices` in conftest.py) because the device count is fixed when JAX starts.
"""

import pytest

CASES = ["auto/fsdp", "auto/replicated", "explicit/fsdp", "explicit/replicated"]


pytestmark = pytest.mark.eight_devices("sharding", module="tests.checks.sharding")


@pytest.fixture(name="results", scope="module")
def _results(eight_devices):
  return eight_devices


@pytest.mark.parametrize("case", CASES)
def test_accumulator_takes_the_sharding_of_the_parameters(results, case):
  result = results["accumulate"][case]
  assert result["init_acc_specs"] == result["param_specs"]
  if result["jit_init_acc_specs"] is not None:  # explicit sharding: init under jit too
    assert result["jit_init_acc_specs"] == result["param_specs"]


@pytest.mark.parametrize("case", CASES)
def test_jitted_update_keeps_shardings_and_gathers_nothing(results, case):
  result = results["accumulate"][case]
  assert result["step_param_specs"] == result["param_specs"]
  assert result["step_acc_specs"] == result["param_specs"]
  assert result["step_momentum_specs"] == result["param_specs"]
  assert set(result["other_collectives"].values()) == {0}, result["other_collectives"]
  # The skip policy's finite check over a sharded gradient: scalars, never gradients.
  assert all(size <= 8 for size in result["all_reduce_bytes"]), result["all_reduce_bytes"]


@pytest.mark.parametrize("layout", ["fsdp", "replicated"])
def test_microbatch_gradients_take_the_parameters_sharding(results, layout):
  result = results["microbatch"][layout]
  assert result["grad_specs"] == result["param_specs"]
  assert result["grad_specs"] == result["unsplit_grad_specs"]
  assert result["max_abs_diff"] < 1e-5


def test_microbatch_carry_holds_only_each_devices_shard(results):
  result = results["microbatch"]["fsdp"]
  # w1 [32, 64] and w2 [64, 16] split by rows over 8 devices.
  assert result["local_grad_shapes"] == [[16], [4, 64], [8, 16]]
  (carry,) = result["carry"]
  assert "f32[4,64]" in carry and "f32[8,16]" in carry, carry


@pytest.mark.parametrize("layout", ["fsdp", "replicated"])
def test_microbatch_adds_no_all_gather(results, layout):
  result = results["microbatch"][layout]
  # FSDP gathers each weight once per step, split or not: the gathers stay out of the loop.
  assert result["all_gather"]["split"] == result["all_gather"]["unsplit"]
  assert result["other_collectives"]["split"] == result["other_collectives"]["unsplit"]

"""A short last micro-batch, `num_real`, `per_example` and `skip.spikes` across 8 replicas.

Each in both replica modes (inside `jax.shard_map`, and under plain `jax.jit` over
an Explicit mesh), against float64 NumPy (tests/checks/replica_features.py, run in
the suite's 8-device child).
"""

import pytest

pytestmark = pytest.mark.eight_devices("replica_features", module="tests.checks.replica_features")
MODES = ["shard_map", "mesh"]


@pytest.fixture(name="results", scope="module")
def _results(eight_devices):
  return eight_devices


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", ["tail", "num_real", "per_example"])
def test_microbatch_equals_the_numpy_gradient_of_the_rows_it_takes(results, case, mode):
  # tail: 10 rows per replica in micro-batches of 3, 3, 3 and 1, weighted by rows;
  # num_real: 3 of 4 micro-batches (traced), the others' rows left out;
  # per_example: each example's gradient clipped to a norm before the mean (DP-SGD).
  assert results[f"{case}/{mode}"] < 1e-6


@pytest.mark.parametrize("mode", MODES)
def test_per_example_metrics_come_back_one_per_example_of_the_global_batch(results, mode):
  assert results[f"per_example_norms/{mode}"] == [64]


@pytest.mark.parametrize("case", ["cond/mesh", "select/shard_map", "select/mesh"])
def test_spikes_skip_the_same_window_as_numpy_across_replicas(results, case):
  spikes = results["spikes"]
  assert spikes["expected_skips"] == 1  # the reference does skip the spiking window
  assert spikes[case]["skips"] == 1
  assert spikes[case]["difference"] < 1e-6

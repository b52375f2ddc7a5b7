"""One all-reduce per window, and the parameters of naive data parallelism (8 CPU replicas).

The measurements come from tests/checks/data_parallel.py, run in the suite's
8-device child (`eight_devices` in conftest.py) because the device count is
fixed when JAX starts. "naive" there is the same training with an all-reduce
on every micro-batch; "reference" is large-batch optax on one device.
"""

import jax
import pytest

import optaccum

# docs/distributed.md claims 1.2e-7; allow two float32 ulps of 1.
TOLERANCE = 2.5e-7


pytestmark = pytest.mark.eight_devices("data_parallel", module="tests.checks.data_parallel")


@pytest.fixture(name="results", scope="module")
def _results(eight_devices):
  return eight_devices


def test_microbatch_all_reduces_once_per_step_where_naive_does_k(results):
  k, grad_bytes = results["k"], results["grad_bytes"]
  ours = results["in_step/mean"]["optaccum"]["all_reduce_per_step"]
  naive = results["in_step/mean"]["naive"]["all_reduce_per_step"]
  assert (ours["in_program"], ours["executed"]) == (1, 1), ours
  assert naive["executed"] == k, naive
  # Gradients plus the loss: one gradient's worth per step, against k of them.
  assert grad_bytes <= ours["executed_bytes"] < 2 * grad_bytes
  assert naive["executed_bytes"] >= k * grad_bytes


def test_accumulate_all_reduces_only_in_the_emitting_branch(results):
  grad_bytes = results["grad_bytes"]
  ours = results["cross_step/mean"]["optaccum"]["all_reduce_per_step"]
  naive = results["cross_step/mean"]["naive"]["all_reduce_per_step"]
  # A micro-step that does not close the window runs no all-reduce at all ...
  assert (ours["in_program"], ours["executed"]) == (1, 0), ours
  assert ours["in_branches"] == 1 and grad_bytes <= ours["in_branches_bytes"] < 2 * grad_bytes
  # ... where the naive step all-reduces the gradient on every micro-step.
  assert naive["executed"] == 1 and naive["executed_bytes"] >= grad_bytes


def test_window_statistics_across_replicas_equal_one_device_over_all_local_gradients(results):
  # Each replica's local gradient is one sample of the window: K * REPLICAS of them.
  assert results["cross_step/mean"]["optaccum"]["statistics_diff"] < 1e-4


def test_accumulate_takes_the_emitting_branch_once_per_window(results):
  k = results["k"]
  emitted = results["cross_step/mean"]["optaccum"]["emitted"]
  assert emitted == ([False] * (k - 1) + [True]) * (len(emitted) // k)


@pytest.mark.parametrize("run", ["optaccum", "naive"])
@pytest.mark.parametrize("mode", ["in_step", "cross_step"])
def test_data_parallel_equals_large_batch_training(results, mode, run):
  # in_step: microbatch inside each step; cross_step: accumulate across steps.
  result = results[f"{mode}/mean"][run]
  assert result["diff_to_reference"] < TOLERANCE
  assert result["replicas_equal"]


def test_accumulator_has_one_entry_per_replica(results):
  # b1 has shape (16,): the global state stacks one per replica.
  assert results["cross_step/mean"]["optaccum"]["acc_grads_shape"] == [results["replicas"], 16]


@pytest.mark.parametrize("mode", ["in_step", "cross_step"])
def test_token_weighted_data_parallel_equals_token_mean_of_window(results, mode):
  result = results[f"{mode}/weighted"]["optaccum"]
  assert result["diff_to_reference"] < TOLERANCE
  assert result["all_reduce_per_step"]["in_program"] == 1


def test_shard_map_with_vma_checks_keeps_gradients_local_until_one_psum(results):
  result = results["vma_checked"]
  assert result["microbatch_grads_diff"] < TOLERANCE
  assert result["microbatch_all_reduce"]["executed"] == 1
  assert result["accumulate_window_diff"] < TOLERANCE


@pytest.mark.parametrize(
  ("kwargs", "error", "message"),
  [
    (
      {"fn": 3},
      TypeError,
      r"`data_parallel\(fn=...\)` must be callable, got fn=3\.",
    ),
    (
      {"mesh": "data"},
      TypeError,
      r"`data_parallel\(mesh=...\)` must be a jax.sharding.Mesh, got mesh='data'\.",
    ),
    (
      {"axis_name": "batch"},
      ValueError,
      r"`data_parallel\(axis_name=...\)` must name an axis of the mesh, whose axes are "
      r"\('data',\), got axis_name='batch'\.",
    ),
    (
      {"batch_argnums": -1},
      TypeError,
      r"`data_parallel\(batch_argnums=...\)` must be a non-negative int or a sequence",
    ),
  ],
)
def test_data_parallel_bad_arguments_raise_naming_them(kwargs, error, message):
  arguments = {
    "fn": lambda x: x,
    "mesh": jax.make_mesh((1,), ("data",)),
    "axis_name": "data",
    "batch_argnums": 0,
  }
  arguments.update(kwargs)
  fn, mesh = arguments.pop("fn"), arguments.pop("mesh")
  with pytest.raises(error, match=message):
    optaccum.parallel.data_parallel(fn, mesh, **arguments)


def test_data_parallel_rejects_a_batch_argument_the_call_lacks():
  mesh = jax.make_mesh((1,), ("data",))
  fn = optaccum.parallel.data_parallel(lambda x: x, mesh, axis_name="data", batch_argnums=1)
  with pytest.raises(ValueError, match=r"names argument 1, but the call has 1 positional"):
    fn(jax.numpy.ones(2))

"""One gradient all-reduce per window under plain `jax.jit` (8 CPU devices, Auto and Explicit).

The measurements come from tests/checks/plain_jit.py, run in the suite's
8-device child (`eight_devices` in conftest.py) because the device count is
fixed when JAX starts. Collectives are counted
from the compiled program's structure: loop trip counts, conditional branches
(run once per window, in its closing step) and device groups (which mesh axes
an all-reduce communicates over).
"""

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
import pytest

import optaccum

CASES = ["dp/auto", "dp/explicit", "hsdp/auto", "hsdp/explicit"]
DEFERRED = [
  "accumulate(axis_name) + per_replica",
  "apply_gradients(axis_name) + per_replica",
  "microbatch(axis_name)",
]
PER_MICRO_BATCH = ["accumulate, plain jit"]  # the others of docs/distributed.md: --full
GRADIENT_BYTES = 91200  # the MLP's float32 gradients
K = 4


pytestmark = pytest.mark.eight_devices("plain_jit", module="tests.checks.plain_jit")


@pytest.fixture(name="results", scope="module")
def _results(eight_devices):
  return eight_devices


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("method", DEFERRED)
def test_one_all_reduce_over_the_data_axis_per_window(results, case, method):
  result = results[case][method]
  assert result["data_all_reduces"] == 1, result
  assert result["max_abs_diff"] < 1e-6, result


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("method", DEFERRED)
def test_the_deferred_reduction_is_named_in_the_profiler(results, case, method):
  # The step's all-reduce over the data axis was traced inside `optaccum.reduce`
  # (its op_name), so a jax.profiler trace names the window's reduction.
  names = results[case][method]["data_all_reduce_op_names"]
  assert names and all("optaccum.reduce" in name for name in names), names


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("method", PER_MICRO_BATCH)
def test_without_axis_name_plain_jit_reduces_every_micro_batch(results, case, method):
  # The measured baseline the docs quote: XLA reduces each micro-batch's gradients.
  result = results[case][method]
  assert result["data_all_reduces"] >= K, result
  assert result["max_abs_diff"] < 1e-6, result


@pytest.mark.parametrize("case", ["dp/auto", "dp/explicit"])
def test_the_window_reduces_the_whole_gradient_once(results, case):
  for method in DEFERRED:
    assert results[case][method]["data_bytes"] in (GRADIENT_BYTES, GRADIENT_BYTES + 4)
  assert results[case]["accumulate, plain jit"]["data_bytes"] == K * GRADIENT_BYTES


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("method", DEFERRED[:2])
def test_parameters_keep_their_shardings_and_the_accumulator_lies_like_them(results, case, method):
  result = results[case][method]
  assert result["out_param_specs"] == result["param_specs"]
  # One replica's sum per device: the per-device bytes of the parameters, so
  # under HSDP the accumulator is sharded over 'fsdp' like them.
  assert result["acc_local_bytes"] == result["param_local_bytes"]
  assert all(spec.startswith("P('data'") for spec in result["acc_specs"]), result["acc_specs"]


@pytest.mark.parametrize("case", ["hsdp/auto", "hsdp/explicit"])
def test_hsdp_keeps_the_per_micro_batch_fsdp_reduction(results, case):
  # Only the replica axis is deferred: each micro-batch's gradient is still
  # reduced over 'fsdp', within its replica, as without accumulation.
  result = results[case]["accumulate(axis_name) + per_replica"]
  assert result["fsdp_all_reduces"] >= K


@pytest.mark.parametrize("method", DEFERRED)
def test_pure_fsdp_with_axis_name_reduces_once_into_a_full_gradient_per_device(results, method):
  # One axis shards both the batch and the matrices (Explicit). With axis_name the
  # parameters are gathered and each replica's gradient is its own: one reduction per
  # window, at the price of a full-size accumulator on every device.
  result = results["fsdp/explicit"][method]
  assert result["max_abs_diff"] < 1e-6, result
  assert result["data_all_reduces"] == 1, result
  assert result["data_bytes"] in (GRADIENT_BYTES, GRADIENT_BYTES + 4), result
  assert result["out_param_specs"] == result["param_specs"]
  assert "P('data',)" in result["param_specs"]
  assert result["param_local_bytes"] < GRADIENT_BYTES / 4
  if result["acc_local_bytes"] is not None:
    assert result["acc_local_bytes"] == GRADIENT_BYTES  # a full gradient per device


def test_pure_fsdp_in_step_gathers_the_parameters_once_per_window(results):
  # The in-step form gathers each sharded matrix once, before its loop over the
  # micro-batches; the across-steps form gathers them on every micro-step (k times).
  sharded = results["fsdp/explicit"]["microbatch(axis_name)"]["param_specs"].count("P('data',)")
  assert sharded == 3
  for method in ("microbatch(axis_name)", "microbatch, plain jit"):
    assert results["fsdp/explicit"][method]["data_all_gathers"] == sharded
  # Across steps, the emitted updates lie like the parameters: no gather in the closing step.
  for method in DEFERRED[:2]:
    assert results["fsdp/explicit"][method]["data_all_gathers"] == K * sharded


def test_pure_fsdp_in_step_gathers_bfloat16_parameters_once_per_window(results):
  # microbatch(gather_dtype=jnp.bfloat16): the sharded parameters cast before the
  # gather (tests/test_gather_dtype.py reads the order in the traced program). XLA:CPU
  # has no bfloat16 collectives and widens them back to float32, so here the bytes
  # match float32's; where the backend gathers bfloat16 they halve.
  bf16 = results["fsdp/explicit"]["microbatch(axis_name, gather_dtype=bfloat16)"]
  f32 = results["fsdp/explicit"]["microbatch(axis_name)"]
  assert bf16["data_all_gathers"] == f32["data_all_gathers"] == 3
  assert bf16["data_gather_bytes"] <= f32["data_gather_bytes"]
  assert bf16["data_all_reduces"] == 1
  assert bf16["out_param_specs"] == bf16["param_specs"]  # updates applied in place, float32
  # The model ran at bfloat16 parameters: not float32's 6e-8 from the large batch,
  # but within bfloat16's rounding of two windows' updates.
  assert f32["max_abs_diff"] < 1e-6 < bf16["max_abs_diff"] < 1e-3


@pytest.mark.parametrize("method", ["accumulate, plain jit", "microbatch, plain jit"])
def test_pure_fsdp_without_axis_name_reduces_every_micro_batch_into_sharded_sums(results, method):
  # The other option: each micro-batch's gradient is reduced (XLA:CPU spells the
  # reduce-scatter as an all-reduce and a slice) and the sums lie like the parameters.
  result = results["fsdp/explicit"][method]
  assert result["max_abs_diff"] < 1e-6, result
  assert result["data_all_reduces"] >= K, result
  assert result["out_param_specs"] == result["param_specs"]
  if result["acc_local_bytes"] is not None:
    assert result["acc_local_bytes"] == result["param_local_bytes"]


@pytest.mark.parametrize("case", ["hsdp/explicit"])
def test_guard_skip_weights_statistics_rounding_aux_and_keys(results, case):
  result = results["features"][case]
  for form in ("transformation", "fast path"):
    assert result[f"guard/{form}"] == {"unchanged": 0.0, "skipped_windows": 1}
  assert result["skip_not_finite"]["skipped"] == 1
  assert result["skip_not_finite"]["diff"] < 1e-6
  assert result["replica_weights"] < 1e-6
  replicas = 8 if case == "dp/auto" else 2
  stats = result["statistics"]
  assert stats["num_micro_batches"] == K * replicas
  assert stats["micro_batch_squared_norm"] == pytest.approx(stats["expected_squared_norm"], 1e-5)
  rounding = result["stochastic_bfloat16"]
  assert rounding["dtypes"] == ["bfloat16"] and rounding["diff"] < 1e-3
  assert all(spec.startswith("P('data'") for spec in rounding["acc_specs"])
  aux = result["microbatch_aux"]
  assert aux == {"loss_diff": aux["loss_diff"], "concat_in_order": True, "rows": 64}
  assert aux["loss_diff"] < 1e-6
  assert result["per_replica_keys"] == {"shape": [replicas], "distinct": replicas}
  assert result["large_leaf"] < 1e-6
  other = result["other_update_dtypes"]
  assert other["dtypes"] == ["float32"] and other["specs"] == other["param_specs"]


# --- One device, in this process: the errors, and equality with plain accumulation -------


def _mesh():
  return jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def _loss(w, x):
  return jnp.mean((x @ w) ** 2)


def test_mesh_axis_name_on_one_replica_equals_plain_accumulation():
  # Not Adam: optax's bias correction fails the suite's strict dtype promotion.
  tx = optaccum.accumulate(optax.sgd(0.1, momentum=0.9), 2, axis_name="data")
  plain = optaccum.accumulate(optax.sgd(0.1, momentum=0.9), 2)
  grad_fn = optaccum.parallel.per_replica(jax.grad(_loss))
  w = jnp.ones(3)
  xs = [jnp.arange(12.0).reshape(4, 3) / (i + 1) for i in range(4)]
  with jax.set_mesh(_mesh()):
    state, plain_state, w1, w2 = tx.init(w), plain.init(w), w, w
    for x in xs:
      updates, state = jax.jit(tx.update)(grad_fn(w1, x), state, w1)
      w1 = optax.apply_updates(w1, updates)
      plain_updates, plain_state = plain.update(jax.grad(_loss)(w2, x), plain_state, w2)
      w2 = optax.apply_updates(w2, plain_updates)
  assert state.acc_grads.shape == (1, 3)
  assert jnp.allclose(w1, w2, rtol=1e-6, atol=0)
  assert not jnp.allclose(w1, w)


def test_axis_name_outside_shard_map_needs_the_mesh_in_context():
  # Neither bound (shard_map, pmap) nor an axis of a mesh in context: refused
  # where the reduction would run, naming the call, the argument and the value.
  tx = optaccum.accumulate(optax.sgd(0.1), 1, axis_name=("data",))
  state = tx.init(jnp.ones(3))
  with pytest.raises(ValueError, match=r"`accumulate\(axis_name='data'\)`: no axis 'data' here"):
    tx.update(jnp.ones(3), state, jnp.ones(3))
  split = optaccum.microbatch(jax.value_and_grad(_loss), 2, axis_name="data")
  with pytest.raises(ValueError, match=r"`microbatch\(axis_name='data'\)`: no axis 'data' here"):
    split(jnp.ones(3), jnp.ones((4, 3)))
  with pytest.raises(ValueError, match="jax.set_mesh"):
    optaccum.parallel.per_replica(jax.grad(_loss))(jnp.ones(3), jnp.ones((4, 3)))
  # A mesh in context without that axis: not the mesh mode either.
  other = optaccum.accumulate(optax.sgd(0.1), 1, axis_name="batch")
  with jax.set_mesh(_mesh()), pytest.raises(ValueError, match=r"no axis 'batch' here"):
    other.update(jnp.ones(3), other.init(jnp.ones(3)), jnp.ones(3))


def test_mesh_axis_name_mixing_axis_types_is_refused():
  mesh = jax.make_mesh(
    (1, 1),
    ("data", "model"),
    axis_types=(jax.sharding.AxisType.Auto, jax.sharding.AxisType.Explicit),
  )
  tx = optaccum.accumulate(optax.sgd(0.1), 2, axis_name=("data", "model"))
  with jax.set_mesh(mesh), pytest.raises(ValueError, match=r"all Auto or all Explicit"):
    tx.init(jnp.ones(3))


@pytest.mark.parametrize("bad", [(), ("data", "data")])
def test_bad_axis_name_is_refused_naming_the_value(bad):
  for make in (
    lambda: optaccum.accumulate(optax.sgd(0.1), 2, axis_name=bad),
    lambda: optaccum.microbatch(jax.value_and_grad(_loss), 2, axis_name=bad),
  ):
    with pytest.raises(ValueError, match=r"axis_name=\.\.\.\)` must name an axis or a non-empty"):
      make()


@pytest.mark.parametrize("bad", [(), ("data", "data"), 3, ("data", None)])
def test_per_replica_refuses_a_bad_axis_name_naming_the_value(bad):
  with pytest.raises(TypeError, match=r"per_replica\(axis_name=\.\.\.\)` must be a mesh axis name"):
    optaccum.parallel.per_replica(jax.grad(_loss), axis_name=bad)


def test_update_refuses_gradients_that_are_not_per_replica():
  tx = optaccum.accumulate(optax.sgd(0.1), 2, axis_name="data")
  with jax.set_mesh(_mesh()):
    state = tx.init({"w": jnp.ones(3)})
    with pytest.raises(ValueError, match=r"per-replica gradients.*\['w'\] has shape \(3,\)"):
      tx.update({"w": jnp.ones(3)}, state, {"w": jnp.ones(3)})
    with pytest.raises(
      ValueError, match=r"one weight per replica of shape \(1,\), got shape \(2,\)"
    ):
      tx.update({"w": jnp.ones((1, 3))}, state, {"w": jnp.ones(3)}, weight=jnp.ones(2))
    # One weight per replica obeys the scalar weight's rule: real numbers only.
    for weight in (jnp.ones(1, jnp.bool_), jnp.ones(1, jnp.complex64)):
      with pytest.raises(
        TypeError, match=r"`accumulate\(\.\.\.\)\.update\(weight=\.\.\.\)` must be a number"
      ):
        tx.update({"w": jnp.ones((1, 3))}, state, {"w": jnp.ones(3)}, weight=weight)


def test_per_replica_gives_every_output_a_replica_axis():
  value_and_grad = optaccum.parallel.per_replica(jax.value_and_grad(_loss))
  w, x = jnp.ones(3), jnp.arange(12.0).reshape(4, 3)
  with jax.set_mesh(_mesh()):
    value, grads = value_and_grad(w, x)
  assert value.shape == (1,) and grads.shape == (1, 3)
  ref_value, ref_grads = jax.value_and_grad(_loss)(w, x)
  assert jnp.allclose(value[0], ref_value) and jnp.allclose(grads[0], ref_grads)


def test_data_parallel_refuses_sharded_parameters_pointing_to_per_replica():
  mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
  tx = optaccum.accumulate(optax.sgd(0.1), 2, axis_name="data")

  def step(params, opt_state, x):
    updates, opt_state = tx.update(jax.grad(_loss)(params, x), opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  with jax.set_mesh(mesh):
    init = optaccum.parallel.data_parallel(tx.init, mesh, axis_name="data", batch_argnums=())
    params = jnp.ones(3)
    opt_state = jax.jit(init)(params)
    sharded = jax.sharding.reshard(params, jax.sharding.PartitionSpec("data"))
    parallel = optaccum.parallel.data_parallel(step, mesh, axis_name="data", batch_argnums=2)
    with pytest.raises(ValueError, match=r"argument 0 at the root sharded as .*per_replica"):
      parallel(sharded, opt_state, jnp.ones((4, 3)))
    with pytest.raises(ValueError, match=r"argument 0 .*per_replica"):
      jax.jit(parallel)(sharded, opt_state, jnp.ones((4, 3)))
    # Replicated parameters (and the per-replica accumulator) pass.
    batch = jax.sharding.reshard(jnp.ones((4, 3)), jax.sharding.PartitionSpec("data"))
    new_params, _ = jax.jit(parallel)(params, opt_state, batch)
  assert new_params.shape == (3,)


def test_flush_closes_a_partial_window_of_per_replica_gradients():
  tx = optaccum.accumulate(optax.sgd(1.0), 4, axis_name="data")
  grad_fn = optaccum.parallel.per_replica(jax.grad(_loss))
  w, x = jnp.ones(3), jnp.arange(12.0).reshape(4, 3)
  with jax.set_mesh(_mesh()):
    state = tx.init(w)
    _, state = tx.update(grad_fn(w, x), state, w)
    updates, state = optaccum.flush(tx, state, w)
  # One micro-batch seen: its gradient, as sgd(1.0) emits it.
  assert jnp.allclose(updates, -jax.grad(_loss)(w, x), rtol=1e-6)
  assert bool(optaccum.status(state).has_updated)


def test_the_docs_pure_fsdp_table_holds_the_measured_explicit_rows(results):
  # docs/distributed.md's table is `python -m tests.checks.plain_jit --fsdp-table`;
  # the rows this run measured (the Explicit mesh) must be there as printed, but for
  # the bytes communicated and the rounding difference, which move by a few bytes and
  # ulps between JAX versions (the loss's 4 bytes may ride with the reduction).
  from tests.checks import plain_jit

  def stable(row):
    return re.sub(r" \([0-9,]+\)", "", row.rsplit("|", 2)[0])

  text = (Path(__file__).resolve().parent.parent / "docs" / "distributed.md").read_text()
  documented = {stable(line) for line in text.splitlines() if line.startswith("| ")}
  rows = plain_jit.fsdp_rows({"fsdp/explicit": results["fsdp/explicit"]})
  assert len(rows) == 6 and plain_jit.FSDP_HEADER in text
  for row in rows:
    assert stable(row) in documented, row


def test_plan_compiles_both_fsdp_options_and_the_deferred_one_holds_a_full_gradient(results):
  planned = results["plan fsdp/explicit"]
  rows = planned["rows"]
  assert sorted(rows) == [
    "accumulate 4",
    "accumulate(axis_name) 4",
    "microbatch 4",
    "microbatch(axis_name) 4",
    "unsplit 1",
  ]
  # The across-steps step's arguments hold the accumulator: one replica's full-size
  # gradient per device when deferred, the parameters' shard (1/8) otherwise.
  params_per_device = results["fsdp/explicit"]["accumulate, plain jit"]["param_local_bytes"]
  extra = rows["accumulate(axis_name) 4"]["arguments"] - rows["accumulate 4"]["arguments"]
  assert extra == GRADIENT_BYTES - params_per_device
  # A budget of 1 GiB fits everything: each form's smallest k, the unsplit step's 1.
  assert planned["chosen"] == {
    "microbatch": 1,
    "accumulate": 1,
    "microbatch_deferred": 1,
    "accumulate_deferred": 1,
  }


@pytest.mark.parametrize(
  "axis_name, shown",
  [("data", "'data'"), (("data",), "'data'"), (("replica", "data"), "('replica', 'data')")],
)
def test_messages_show_the_replica_axes_as_a_name_or_a_tuple(axis_name, shown):
  # One axis is shown by its name, however it was given; several as their tuple.
  # Through every form that takes axis_name under plain jax.jit: the transformation's
  # update (gradients and weight), the fast path, microbatch and per_replica.
  mesh = jax.make_mesh((1, 1), ("replica", "data"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  tx = optaccum.accumulate(optax.sgd(0.1), 2, axis_name=axis_name)
  params = {"w": jnp.ones(3)}
  with jax.set_mesh(mesh):
    state = tx.init(params)
    per_replica = rf"per-replica gradients under axis_name={re.escape(shown)} under plain"
    with pytest.raises(ValueError, match=per_replica):
      tx.update(params, state, params)
    with pytest.raises(ValueError, match=per_replica):
      optaccum.apply_gradients(tx, params, state, params)
    with pytest.raises(ValueError, match=rf"under axis_name={re.escape(shown)}, one weight"):
      tx.update({"w": jnp.ones((1, 3))}, state, params, weight=jnp.ones(2))
  other = jax.make_mesh((1,), ("model",), axis_types=(jax.sharding.AxisType.Auto,))
  with jax.set_mesh(other), pytest.raises(ValueError, match=re.escape(f"(axis_name={shown})`: no")):
    optaccum.microbatch(jax.value_and_grad(_loss), 2, axis_name=axis_name)(
      jnp.ones(3), jnp.ones((2, 3))
    )
  with pytest.raises(ValueError, match=re.escape(f"(axis_name={shown})` needs the mesh")):
    optaccum.parallel.per_replica(jax.grad(_loss), axis_name=axis_name)(
      jnp.ones(3), jnp.ones((2, 3))
    )

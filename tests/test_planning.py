"""`optaccum.planning.plan`: k from a memory budget, compiling each candidate, running none."""

import jax
import jax.numpy as jnp
import optax
import pytest

import optaccum

BATCH = 64
FEATURES = 32
HIDDEN = 4096  # the first layer's kernel: 131 072 entries


def init_params(hidden=HIDDEN):
  keys = jax.random.split(jax.random.key(0), 2)
  return {
    "hidden": jax.random.normal(keys[0], (FEATURES, hidden)) / FEATURES**0.5,
    "out": jax.random.normal(keys[1], (hidden, 1)) / hidden**0.5,
  }


def small_params():
  """A model of the same form with 64 hidden units: quick to compile, for the choices."""
  return init_params(64)


def loss(params, x, y):
  hidden = jnp.tanh(x @ params["hidden"])  # activations: [batch, 4096]
  return jnp.mean(((hidden @ params["out"])[:, 0] - y) ** 2)


GRAD_FN = jax.value_and_grad(loss)
OPTIMIZER = optax.sgd(0.1, momentum=0.9)


def batch(size=BATCH):
  return (
    jax.ShapeDtypeStruct((size, FEATURES), jnp.float32),
    jax.ShapeDtypeStruct((size,), jnp.float32),
  )


def reference_memory(form, k):
  """The step each row stands for, written out here, compiled as `jax.jit` donates it."""
  params = jax.eval_shape(init_params)
  x, y = batch()
  if form == "accumulate":
    tx = optaccum.accumulate(OPTIMIZER, k)
    x, y = (jax.ShapeDtypeStruct((BATCH // k, *s.shape[1:]), s.dtype) for s in (x, y))

    def step(params, opt_state, x, y):
      value, grads = GRAD_FN(params, x, y)
      params, opt_state = optaccum.apply_gradients(tx, grads, opt_state, params)
      return params, opt_state, value

  else:
    tx = OPTIMIZER
    grad_fn = GRAD_FN if form == "unsplit" else optaccum.microbatch(GRAD_FN, k)

    def step(params, opt_state, x, y):
      value, grads = grad_fn(params, x, y)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, value

  opt_state = jax.eval_shape(tx.init, params)
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, x, y).compile()
  memory = compiled.memory_analysis()
  return {
    "temporaries": memory.temp_size_in_bytes,
    "arguments": memory.argument_size_in_bytes,
    "outputs": memory.output_size_in_bytes,
    "aliased": memory.alias_size_in_bytes,
  }


@pytest.fixture(scope="module")
def full_plan():
  return optaccum.planning.plan(
    GRAD_FN, init_params(), OPTIMIZER, batch(), budget="1GiB", candidates=[1, 2, 4, 8]
  )


def test_table_equals_the_compiled_memory_analysis_of_each_configuration(full_plan):
  assert [(row.form, row.k) for row in full_plan.rows] == [
    ("unsplit", 1),
    ("microbatch", 2),
    ("accumulate", 2),
    ("microbatch", 4),
    ("accumulate", 4),
    ("microbatch", 8),
    ("accumulate", 8),
  ]
  for row in full_plan.rows:
    expected = reference_memory(row.form, row.k)
    got = {name: getattr(row, name) for name in expected}
    assert got == expected, (row.form, row.k)
    assert row.total == row.arguments + row.outputs - row.aliased + row.temporaries
    assert row.micro_batch_size == BATCH // row.k
  # The parameters and the optimizer state are donated: the outputs reuse them.
  assert all(row.aliased > 0 for row in full_plan.rows)
  # The activations shrink with the micro-batch: the point of choosing k.
  temporaries = {row.k: row.temporaries for row in full_plan.rows if row.form == "microbatch"}
  unsplit = full_plan.rows[0].temporaries
  assert temporaries[8] < temporaries[4] < temporaries[2] < unsplit


@pytest.fixture(scope="module")
def small_plan():
  return optaccum.planning.plan(
    GRAD_FN, small_params(), OPTIMIZER, batch(), budget="1GiB", candidates=[1, 2, 8]
  )


@pytest.mark.parametrize("form", ["microbatch", "accumulate"])
def test_chosen_k_is_the_smallest_whose_step_fits(small_plan, form):
  own = [row for row in small_plan.rows if row.form in ("unsplit", form)]
  # At a row's own total it fits (a budget is inclusive); one byte less, it does not.
  for budget in sorted({row.total for row in own} | {row.total - 1 for row in own}):
    fitting = [row.k for row in own if row.total <= budget]
    if not fitting:
      continue
    chosen = optaccum.planning.plan(
      GRAD_FN, small_params(), OPTIMIZER, batch(), budget=budget, candidates=[1, 2, 8], forms=[form]
    )
    assert getattr(chosen, form) == min(fitting), budget
    assert [row.fits for row in chosen.rows] == [row.total <= budget for row in chosen.rows]
    assert getattr(chosen, "accumulate" if form == "microbatch" else "microbatch") is None


def test_candidates_are_every_divisor_of_the_batch_and_shapes_suffice():
  params = jax.eval_shape(small_params)  # ShapeDtypeStructs only
  chosen = optaccum.planning.plan(
    GRAD_FN, params, OPTIMIZER, batch(12), budget=10**9, forms=["accumulate"]
  )
  assert [row.k for row in chosen.rows] == [1, 2, 3, 4, 6, 12]
  assert chosen.accumulate == 1  # everything fits a gigabyte
  assert "| accumulate | 3 | 4 |" in chosen.table()


def test_nothing_runs_while_planning():
  calls = []

  def counted(params, x, y):
    jax.debug.callback(lambda: calls.append(1))
    return loss(params, x, y)

  optaccum.planning.plan(
    jax.value_and_grad(counted),
    small_params(),
    OPTIMIZER,
    batch(),
    budget="1GiB",
    candidates=[1, 4],
  )
  assert calls == []


def test_a_budget_no_candidate_meets_names_the_smallest_total(small_plan):
  own = [row for row in small_plan.rows if row.form in ("unsplit", "microbatch")]
  smallest = min(own, key=lambda row: row.total)
  with pytest.raises(ValueError) as error:
    optaccum.planning.plan(
      GRAD_FN,
      small_params(),
      OPTIMIZER,
      batch(),
      budget="1KiB",
      candidates=[1, 2, 8],
      forms=["microbatch"],
    )
  assert str(error.value) == (
    "`plan(budget=...)` of 1,024 bytes is less than any microbatch step needs: the smallest "
    f"total seen is {smallest.total:,} bytes, at k={smallest.k} (micro-batches of "
    f"{BATCH // smallest.k}). Give more memory, a smaller model or optimizer state, or a "
    "smaller batch."
  )


def test_the_budget_defaults_to_the_device_limit_where_jax_reports_one(monkeypatch):
  with pytest.raises(ValueError, match=r"`plan\(budget=...\)` is required here: the cpu device"):
    optaccum.planning.plan(GRAD_FN, small_params(), OPTIMIZER, batch(), candidates=[1])

  class Device:
    platform = "gpu"

    def memory_stats(self):
      return {"bytes_limit": 10**9, "bytes_in_use": 0}

  monkeypatch.setattr(jax, "local_devices", lambda: [Device()])
  chosen = optaccum.planning.plan(GRAD_FN, small_params(), OPTIMIZER, batch(), candidates=[1])
  assert chosen.budget == 10**9 and chosen.microbatch == 1


@pytest.mark.parametrize(
  "budget, expected",
  [("3000KiB", 3000 * 1024), ("1.5 GiB", int(1.5 * 2**30)), ("2GB", 2 * 10**9), (10**8, 10**8)],
)
def test_budget_sizes_are_read_in_their_units(budget, expected):
  chosen = optaccum.planning.plan(
    GRAD_FN,
    small_params(),
    OPTIMIZER,
    batch(),
    budget=budget,
    candidates=[64],
    forms=["accumulate"],
  )
  assert chosen.budget == expected


@pytest.mark.parametrize(
  "kwargs, error, message",
  [
    (
      {"budget": "lots"},
      ValueError,
      r"`plan\(budget=...\)` must be a size such as '300KiB'.*got budget='lots'",
    ),
    ({"budget": 0}, ValueError, r"`plan\(budget=...\)` must be at least 1 byte and finite, got 0"),
    (
      {"budget": True},
      TypeError,
      r"`plan\(budget=...\)` must be a number of bytes .*got budget=True",
    ),
    (
      {"candidates": [1, 3]},
      ValueError,
      r"`plan\(candidates=...\)` must divide the batch of 64, got 3",
    ),
    ({"candidates": 4}, TypeError, r"`plan\(candidates=...\)` must be a non-empty sequence"),
    ({"candidates": [0]}, ValueError, r"`plan\(candidates=...\)` must be a positive int"),
    (
      {"forms": ["scan"]},
      ValueError,
      r"`plan\(forms=...\)` must be a non-empty sequence of 'microbatch', 'accumulate'",
    ),
    ({"has_aux": 1}, TypeError, r"`plan\(has_aux=...\)` must be a bool, got has_aux=1"),
  ],
)
def test_bad_arguments_are_named(kwargs, error, message):
  arguments = {"budget": "1GiB", **kwargs}
  with pytest.raises(error, match=message):
    optaccum.planning.plan(GRAD_FN, small_params(), OPTIMIZER, batch(), **arguments)


def test_a_batch_must_be_a_tuple_of_arguments_sharing_one_batch_axis():
  x, _ = batch()
  with pytest.raises(TypeError, match=r"`plan\(batch=...\)` must be a tuple of the arguments"):
    optaccum.planning.plan(GRAD_FN, small_params(), OPTIMIZER, x, budget="1GiB")
  y = jax.ShapeDtypeStruct((BATCH // 2,), jnp.float32)
  with pytest.raises(ValueError, match=r"share one leading batch axis, got leading sizes 32, 64"):
    optaccum.planning.plan(GRAD_FN, small_params(), OPTIMIZER, (x, y), budget="1GiB")


SHARDED_CHECK = """
import json
import jax, jax.numpy as jnp, optax, optaccum
mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
sharding = jax.sharding.NamedSharding(mesh, jax.P("data"))
x = jax.device_put(jnp.ones((32, 64)), sharding)
loss = lambda w, x: jnp.mean(jnp.tanh(x @ w) ** 2)
plan = optaccum.planning.plan(jax.value_and_grad(loss), jnp.zeros((64, 8)), optax.sgd(0.1), (x,),
                     budget="1GiB", candidates=[1, 2], forms=["accumulate"])
print(json.dumps({row.form: row.arguments for row in plan.rows}))
"""


def test_the_accumulate_form_compiles_micro_batches_sharded_like_the_batch(run_python):
  # On 2 devices the batch (32 x 64 float32, 8 KiB) lies half on each: the unsplit
  # step's argument holds 4 KiB of it per device, a micro-batch of 16 rows 2 KiB.
  arguments = run_python(["-c", SHARDED_CHECK], num_devices=2, timeout=120)
  params = 64 * 8 * 4
  assert arguments["unsplit"] == params + 2 * 2**10 * 2  # parameters + half the batch
  # The accumulate step holds an accumulator like the parameters, half a micro-batch
  # per device (not the whole micro-batch, 4 KiB, if its sharding were lost) and
  # a few scalar counters.
  counters = arguments["accumulate"] - (arguments["unsplit"] + params - 2 * 2**10)
  assert 0 <= counters < 64

"""`optaccum.planning.evaluate`: each k trained on the same windows, against the unsplit batch."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from rich.console import Console

import optaccum

WINDOWS = 3
BATCH = 32


def mlp_loss(params, x, y):
  hidden = jnp.tanh(x @ params["hidden"])
  return jnp.mean(jnp.square(hidden @ params["out"] - y))


def mlp_params():
  keys = jax.random.split(jax.random.key(0), 2)
  return {
    "hidden": jax.random.normal(keys[0], (16, 512)) / 4.0,
    "out": jax.random.normal(keys[1], (512, 1)) / 512**0.5,
  }


def mlp_batches():
  x = jax.random.normal(jax.random.key(1), (WINDOWS, BATCH, 16))
  return [(x[i], jnp.sin(x[i, :, :1])) for i in range(WINDOWS)]


OPTIMIZER = optax.sgd(0.05, momentum=0.9)


@pytest.fixture(scope="module")
def evaluation():
  grad_fn = jax.value_and_grad(mlp_loss)
  return optaccum.planning.evaluate(
    grad_fn, mlp_params(), OPTIMIZER, mlp_batches(), k=[2, 8], rounds=1, progress=False
  )


def large_batch_run():
  """The reference, written out: one optax step per global batch; the window losses."""
  params, grad_fn = mlp_params(), jax.jit(jax.value_and_grad(mlp_loss))
  state, losses = OPTIMIZER.init(params), []
  for x, y in mlp_batches():
    loss, grads = grad_fn(params, x, y)
    updates, state = OPTIMIZER.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    losses.append(float(loss))
  return params, losses


def test_rows_come_from_real_runs_against_the_unsplit_batch(evaluation):
  assert [(row.form, row.k, row.micro_batch_size) for row in evaluation.rows] == [
    ("unsplit", 1, BATCH),
    ("accumulate", 2, BATCH // 2),
    ("accumulate", 8, BATCH // 8),
  ]
  assert evaluation.reference == 1 and evaluation.windows == WINDOWS
  _, losses = large_batch_run()
  unsplit, *accumulated = evaluation.rows
  assert unsplit.final_loss == pytest.approx(losses[-1], rel=1e-6)
  assert unsplit.max_param_difference == 0 and unsplit.max_loss_difference == 0
  for row in accumulated:
    # A mean of k means rounds differently from one mean: small, not zero.
    assert 0 < row.max_param_difference < 1e-5
    assert row.max_loss_difference < 1e-5
    assert row.final_loss == pytest.approx(losses[-1], rel=1e-5)
  for row in evaluation.rows:
    assert row.seconds_per_example > 0 and row.memory > row.temporaries > 0


def reference_memory(k):
  """The accumulate step written out here, compiled as `jax.jit` donates it: its total bytes."""
  grad_fn, params = jax.value_and_grad(mlp_loss), mlp_params()
  x, y = (a[: BATCH // k] for a in mlp_batches()[0])
  tx = OPTIMIZER if k == 1 else optaccum.accumulate(OPTIMIZER, k)

  def step(params, opt_state, x, y):
    value, grads = grad_fn(params, x, y)
    if k > 1:
      params, opt_state = optaccum.apply_gradients(tx, grads, opt_state, params)
      return params, opt_state, value
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  memory = jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), x, y).compile()
  memory = memory.memory_analysis()
  total = memory.argument_size_in_bytes + memory.output_size_in_bytes
  return total - memory.alias_size_in_bytes + memory.temp_size_in_bytes, memory.temp_size_in_bytes


def test_memory_is_the_compiled_step_of_each_configuration(evaluation):
  for row in evaluation.rows:
    assert (row.memory, row.temporaries) == reference_memory(row.k), row.k
  # The accumulate form's step takes a micro-batch: its activations shrink with k.
  temporaries = [row.temporaries for row in evaluation.rows]
  assert temporaries[2] < temporaries[1] < temporaries[0]


def test_differences_are_measured_in_the_parameters_own_precision():
  # complex parameters: the modulus of the difference, not the real part's.
  def loss(w, x):
    return jnp.mean(jnp.abs(x @ w) ** 2)

  x = jax.random.normal(jax.random.key(0), (2, 8, 3)).astype(jnp.complex64)
  w = jnp.ones(3, jnp.complex64) * (1 + 1j)
  result = optaccum.planning.evaluate(
    jax.value_and_grad(loss), w, optax.sgd(0.1), [(x[0],), (x[1],)], [2], rounds=1, progress=False
  )
  assert result.rows[1].max_param_difference < 1e-5


def exact_problem():
  """A linear least-absolute-deviations problem where every sum is exact in float32.

  Small integer inputs, gradients of signs, a power-of-two batch and learning
  rate: every value is a small multiple of a power of two, so a mean of k
  micro-batch means equals the mean of the batch bit for bit, losses included,
  and any difference would be a bug.
  """
  rng = np.random.default_rng(0)
  x = rng.integers(-2, 3, size=(2, BATCH, 4)).astype(np.float32)
  y = rng.integers(-2, 3, size=(2, BATCH)).astype(np.float32)

  def loss(w, x, y):
    return jnp.mean(jnp.abs(x @ w - y))

  batches = [(jnp.asarray(x[i]), jnp.asarray(y[i])) for i in range(2)]
  return jax.value_and_grad(loss), jnp.zeros(4), optax.sgd(2.0**-4), batches


@pytest.mark.parametrize("form", ["accumulate", "microbatch"])
def test_where_accumulation_is_exact_the_divergence_is_zero(form):
  grad_fn, params, optimizer, batches = exact_problem()
  result = optaccum.planning.evaluate(
    grad_fn, params, optimizer, batches, k=[2, 4], form=form, rounds=1, progress=False
  )
  assert [row.form for row in result.rows] == ["unsplit", form, form]
  for row in result.rows:
    assert row.max_param_difference == 0.0 and row.max_loss_difference == 0.0
  assert result.rows[0].final_loss > 0


def test_a_budget_leaves_out_what_does_not_fit_and_the_smallest_k_is_the_reference():
  grad_fn = jax.value_and_grad(mlp_loss)
  full = optaccum.planning.plan(
    grad_fn, mlp_params(), OPTIMIZER, mlp_batches()[0], budget="1GiB", candidates=[1, 2, 8]
  )
  budget = max(row.total for row in full.rows if row.form == "accumulate")
  assert full.rows[0].total > budget  # the unsplit step does not fit
  result = optaccum.planning.evaluate(
    grad_fn, mlp_params(), OPTIMIZER, mlp_batches(), [2, 8], budget=budget, rounds=1, progress=False
  )
  assert [row.k for row in result.rows] == [2, 8] and result.reference == 2
  assert result.rows[0].max_param_difference == 0
  with pytest.raises(ValueError, match=r"`evaluate\(budget=...\)` of 10 bytes fits none"):
    optaccum.planning.evaluate(
      grad_fn, mlp_params(), OPTIMIZER, mlp_batches(), [2], budget=10, rounds=1
    )


def test_table_and_plot_show_every_row(evaluation, tmp_path):
  console = Console(record=True, width=100)
  console.print(evaluation.table())
  text = console.export_text()
  assert "reference: k=1" in text
  for form, k in (("unsplit", 1), ("accumulate", 2), ("accumulate", 8)):
    assert any(line.split("│")[1:3] == [f" {form:>10} ", f" {k:>2} "] for line in text.splitlines())
  path = tmp_path / "evaluation.png"
  evaluation.plot(str(path))
  assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_progress_bar_counts_every_window(capsys):
  grad_fn, params, optimizer, batches = exact_problem()
  optaccum.planning.evaluate(grad_fn, params, optimizer, batches, [2], rounds=2, progress=True)
  # Two configurations, two windows each, in one lockstep pass and two timed rounds.
  assert "12/12" in capsys.readouterr().out


@pytest.mark.parametrize(
  "arguments, error, message",
  [
    ({"batches": ()}, TypeError, r"`evaluate\(batches=...\)` must be a non-empty list of batches"),
    ({"k": [3]}, ValueError, r"`evaluate\(k=...\)` must divide the batch of 32, got 3"),
    ({"k": 2}, TypeError, r"`evaluate\(k=...\)` must be a non-empty sequence"),
    ({"form": "scan"}, ValueError, r"`evaluate\(form=...\)` must be one of"),
    ({"rounds": 0}, ValueError, r"`evaluate\(rounds=...\)` must be a positive int"),
    ({"progress": "yes"}, TypeError, r"`evaluate\(progress=...\)` must be a bool"),
  ],
)
def test_bad_arguments_are_named(arguments, error, message):
  grad_fn, params, optimizer, batches = exact_problem()
  kwargs = {"batches": batches, "k": [2], **arguments}
  with pytest.raises(error, match=message):
    optaccum.planning.evaluate(grad_fn, params, optimizer, **kwargs)


def test_batches_of_other_shapes_are_refused():
  grad_fn, params, optimizer, batches = exact_problem()
  x, y = batches[1]
  with pytest.raises(ValueError, match=r"batch 1 differs from batch 0"):
    optaccum.planning.evaluate(grad_fn, params, optimizer, [batches[0], (x[:16], y[:16])], [2])

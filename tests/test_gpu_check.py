"""The GPU check (`python -m benchmarks.gpu`) in quick mode on CPU: its table and its training.

No timing is asserted. The forms' final parameters are compared with plain
large-batch AdamW written out here, on the same data for the same windows.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from benchmarks import gpu

EXPECTED = {
  "float32": [
    (gpu.UNSPLIT, "1", "–"),
    ("optaccum.microbatch", "4", "float32"),
    ("optax.microbatching.microbatch", "4", "float32"),
    ("optaccum.apply_gradients", "4", "float32"),
    ("optaccum.accumulate", "4", "float32"),
    ("optax.MultiSteps", "4", "float32 (the parameters')"),
  ],
  "bfloat16": [
    (gpu.UNSPLIT, "1", "–"),
    ("optaccum.microbatch", "4", "bfloat16"),
    ("optax.microbatching.microbatch", "4", "bfloat16"),
    ("optaccum.apply_gradients", "4", "bfloat16, stochastic rounding"),
    ("optaccum.accumulate", "4", "bfloat16, stochastic rounding"),
  ],
  "k=1": [
    (gpu.UNSPLIT, "1", "–"),
    ("optaccum.microbatch", "1", "float32"),
    ("optax.microbatching.microbatch", "1", "float32"),
    ("optaccum.apply_gradients", "1", "float32"),
    ("optaccum.accumulate", "1", "float32"),
    ("optax.MultiSteps", "1", "float32 (the parameters')"),
  ],
}
TITLES = {
  "float32": "### k = 4, float32 accumulators",
  "bfloat16": "### k = 4, bfloat16 accumulators",
  "k=1": "### k = 1: the machinery's cost against the plain step",
}


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> gpu.Report:
  out = tmp_path_factory.mktemp("gpu")
  # optax's adamw needs standard promotion (tests/test_equivalence.py says why).
  with jax.numpy_dtype_promotion("standard"):
    return gpu.main(["--quick", "--out", str(out)])


def _tables(markdown: str) -> dict[str, list[list[str]]]:
  """Each `### ` section's table rows (below the header and rule), as cells."""
  tables = {}
  for section in markdown.split("\n### ")[1:]:
    title, body = section.split("\n", 1)
    lines = [line for line in body.splitlines() if line.startswith("| ")]
    assert lines[0] == gpu.HEADER, lines[0]
    tables[f"### {title}"] = [
      [cell.strip() for cell in line.strip("|").split("|")] for line in lines[1:]
    ]
  return tables


def test_quick_run_writes_the_device_the_model_and_the_command(report):
  text = report.markdown
  assert report.path.name == "RESULTS-gpu.md" and report.path.read_text() == text
  assert text.startswith("## GPU check\n\n**QUICK RUN")
  assert "`XLA_PYTHON_CLIENT_PREALLOCATE=false python -m benchmarks.gpu --quick --out " in text
  device = jax.devices()[0]
  assert f"- device: {device.device_kind} ({device.platform}), 1 device(s)" in text
  assert f"jax {jax.__version__}, optax {optax.__version__}" in text
  assert "- model: decoder LM, " in text and "batch 8 sequences (128 tokens)" in text
  assert "k = 4 (micro-batch 2)" in text
  assert "- rounds per group: float32 2, bfloat16 2, k=1 2 " in text


def test_every_form_has_a_row_with_positive_numbers_in_every_group(report):
  tables = _tables(report.markdown)
  assert list(tables) == list(TITLES.values())
  for group, rows in EXPECTED.items():
    cells = tables[TITLES[group]]
    assert [tuple(row[:3]) for row in cells] == rows
    for row in cells:
      across_steps = row[0] in gpu.FORMS[2:]
      assert int(row[3]) == (int(row[1]) if across_steps else 1), row
      time_ms, versus = float(row[4]), float(row[5].rstrip("x"))
      temp, arguments, outputs = (float(cell) for cell in row[6:9])
      for value in (time_ms, versus, temp, arguments, outputs):
        assert math.isfinite(value) and value > 0, row
      if jax.devices()[0].memory_stats() is None:  # CPU: no allocator statistics
        assert row[9] == "n/a", row
      else:
        assert float(row[9]) > 0, row
      difference = float(row[10])
      assert math.isfinite(difference) and difference >= 0, row
    assert cells[0][5] == "1.00x" and float(cells[0][10]) == 0.0


def test_split_forms_hold_fewer_temporaries_than_the_unsplit_step(report):
  # The unsplit step holds the whole batch's activations, a split form one micro-batch's.
  by_key = {(row.group, row.name): row.memory["temp"] for row in report.rows}
  for name in gpu.FORMS:
    assert by_key[("float32", name)] < by_key[("float32", gpu.UNSPLIT)], name


def _large_batch_adamw(report: gpu.Report, windows: int) -> list[np.ndarray]:
  """Plain AdamW on the whole batch, one step per window: what every form must equal."""
  loss = gpu.make_loss(report.config)
  optimizer = optax.adamw(gpu.LEARNING_RATE)
  tokens = jnp.asarray(report.tokens)

  def step(params, state):
    grads = jax.grad(loss)(params, tokens)
    updates, state = optimizer.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  params = jax.tree.map(jnp.asarray, report.initial_params)
  state = optimizer.init(params)
  with jax.numpy_dtype_promotion("standard"):
    # Compiled as the quick run compiles (fast on a loaded machine).
    compiled = (
      jax.jit(step).lower(params, state).compile(gpu.quick_compiler_options(jax.devices()[0]))
    )
    for _ in range(windows):
      params, state = compiled(params, state)
  return [np.asarray(leaf, np.float64) for leaf in jax.tree.leaves(params)]


def test_every_form_trains_as_large_batch_adamw(report):
  initial = [np.asarray(leaf, np.float64) for leaf in jax.tree.leaves(report.initial_params)]
  references = {n: _large_batch_adamw(report, n) for n in set(report.windows.values())}
  for group, rows in EXPECTED.items():
    reference = references[report.windows[group]]
    moved = np.mean(np.concatenate([np.abs(r - i).ravel() for r, i in zip(reference, initial)]))
    assert moved > 0.5 * gpu.LEARNING_RATE  # it trained: Adam moves each weight ~lr a step
    for name, k, accumulator in rows:
      leaves = jax.tree.leaves(report.final_params[f"{name} | k={k} | {accumulator}"])
      final = [np.asarray(leaf, np.float64) for leaf in leaves]
      if group == "bfloat16":
        # Rounded sums flip the sign of Adam's first steps on near-zero gradients:
        # close on average, not leaf by leaf.
        error = np.mean(np.concatenate([np.abs(f - r).ravel() for f, r in zip(final, reference)]))
        assert error < 0.01 * moved, (name, error, moved)
        continue
      print(group, name, max(np.max(np.abs(f - r)) for f, r in zip(final, reference)))
      for got, want in zip(final, reference):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=name)


def test_the_size_estimate_covers_what_the_compiled_unsplit_step_needs():
  # Ladder-shaped (long sequences: the attention matrices count), small enough for CPU.
  config = gpu.Config(4096, 128, 2, 2, 256, 16, 8)
  abstract = jax.eval_shape(lambda: gpu.init_params(config, jnp.float32))
  unsplit = gpu.forms_of_group(
    "float32", 8, 16, jax.value_and_grad(gpu.make_loss(config)), jnp.float32
  )[0]
  tokens = jax.ShapeDtypeStruct((config.batch, config.seq_len), jnp.int32)
  with jax.numpy_dtype_promotion("standard"):
    lowered = jax.jit(unsplit.step).lower(abstract, jax.eval_shape(unsplit.init, abstract), tokens)
  analysis = lowered.compile(gpu.quick_compiler_options(jax.devices()[0])).memory_analysis()
  live = max(gpu.live_bytes(gpu.all_forms(config, jnp.float32), abstract).values())
  assert analysis.temp_size_in_bytes > 0.5 * (gpu.estimated_bytes(config, jnp.float32) - live)
  assert live + analysis.temp_size_in_bytes <= gpu.estimated_bytes(config, jnp.float32)

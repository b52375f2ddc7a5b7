"""The `optaccum demo` command: what it prints, the plot it saves, the options it refuses."""

import io
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from flax.training.train_state import TrainState
from rich.console import Console

from optaccum import _demo
from optaccum.__main__ import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
  """One demo at a batch large enough for activations to outweigh the parameters."""
  out = tmp_path_factory.mktemp("demo") / "plots" / "loss.png"
  printed = io.StringIO()
  large, accumulated = _demo.run_demo(
    k=8, batch_size=1024, steps=8, seed=1, out=str(out), console=Console(file=printed)
  )
  return large, accumulated, printed.getvalue(), out


def test_demo_large_batch_run_is_plain_optax_training(demo):
  # The reference, written out: optax's sgd on each batch of the same stream.
  large, _, _, _ = demo
  steps, batch_size, seed = 8, 1024, 1
  train_images, train_labels, _, _ = _demo.load_digits_split()
  model = _demo.DigitsMlp()
  params = model.init(jax.random.key(seed), train_images[:1])
  state = TrainState.create(apply_fn=model.apply, params=params, tx=optax.sgd(0.1, momentum=0.9))

  @jax.jit
  def train_step(state, images, labels):
    def loss_fn(params):
      logits = model.apply(params, images)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    return state.apply_gradients(grads=jax.grad(loss_fn)(state.params))

  for indices in _demo.batch_indices(len(train_labels), batch_size, steps, seed):
    state = train_step(state, train_images[indices], train_labels[indices])
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), state.params, large.params
  )


def test_demo_accumulated_run_ends_where_the_large_batch_run_ends(demo):
  large, accumulated, _, _ = demo
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5),
    accumulated.params,
    large.params,
  )
  assert len(large.losses) == len(accumulated.losses) == 8
  np.testing.assert_allclose(accumulated.losses, large.losses, rtol=1e-5)
  assert accumulated.test_accuracy == pytest.approx(large.test_accuracy, abs=1e-9)


def test_demo_accumulated_step_needs_less_scratch_memory_at_a_large_batch(demo):
  large, accumulated, _, _ = demo
  assert accumulated.memory.temp_size_in_bytes < large.memory.temp_size_in_bytes / 2


def test_demo_prints_both_runs_in_a_table_and_saves_the_plot(demo):
  _, _, printed, out = demo
  assert out.read_bytes().startswith(PNG_SIGNATURE)
  assert f"Loss curves saved to {out}" in printed
  assert "Large batch vs accumulated micro-batches" in printed
  assert "┃ batch of 1024 ┃ 8 × 128 accumulated ┃ difference ┃" in printed
  for row in [
    "loss, whole training set",
    "test accuracy",
    "max parameter difference",
    "step memory: temporaries",
    "step memory: arguments",
    "wall time: compile",
    "wall time: training loop",
  ]:
    assert f"│ {row} " in printed


def test_demo_says_which_loss_the_progress_bar_and_the_table_show(demo):
  _, _, printed, _ = demo
  words = " ".join(printed.split())
  assert "batch loss is the loss of the last batch" in words
  assert (
    "the table's loss is the final parameters' mean loss over all 1438 training images" in words
  )


def test_demo_command_passes_its_options_to_the_demo(monkeypatch):
  calls = []
  monkeypatch.setattr(_demo, "run_demo", lambda **options: calls.append(options))
  code = main(
    ["demo", "-k", "2", "--batch-size", "16", "--steps", "3", "--seed", "5", "--out", "a.png"]
  )
  assert code == 0
  assert calls == [dict(k=2, batch_size=16, steps=3, seed=5, out="a.png")]


def test_batch_indices_cover_each_epoch_once_before_repeating():
  indices = _demo.batch_indices(num_examples=10, batch_size=4, steps=5, seed=0)
  assert indices.shape == (5, 4)
  flat = indices.reshape(-1)
  assert sorted(flat[:10]) == list(range(10))
  assert sorted(flat[10:20]) == list(range(10))


@pytest.mark.parametrize(
  "options, message",
  [
    (["-k", "0"], "`optaccum demo -k` must be a positive int, got 0."),
    (["--batch-size", "0"], "`optaccum demo --batch-size` must be a positive int, got 0."),
    (["--steps", "-3"], "`optaccum demo --steps` must be a positive int, got -3."),
    (["--seed", "-1"], "`optaccum demo --seed` must be a non-negative int, got -1."),
    (
      ["-k", "4", "--batch-size", "30"],
      "`optaccum demo --batch-size` must be a multiple of -k=4, got 30.",
    ),
    (["--out", "loss.jpg"], "`optaccum demo --out` must be a .png path, got 'loss.jpg'."),
    (["-k", "two"], "argument -k: invalid int value: 'two'"),
  ],
)
def test_demo_rejects_a_bad_option_on_one_line_with_exit_code_2(options, message, capsys):
  with pytest.raises(SystemExit) as exit_info:
    main(["demo", *options])
  assert exit_info.value.code == 2
  captured = capsys.readouterr()
  assert captured.out == ""
  assert captured.err == f"optaccum demo: error: {message} (see `optaccum demo --help`)\n"


@pytest.mark.parametrize(
  "make_out, reason",
  [
    (lambda tmp: tmp / "a_file" / "loss.png", "{tmp}/a_file is not a directory"),
    (lambda tmp: tmp / "a_file" / "plots" / "loss.png", "{tmp}/a_file is not a directory"),
    (lambda tmp: tmp / "a_directory.png", "it is a directory"),
  ],
  ids=["parent is a file", "ancestor is a file", "out is a directory"],
)
def test_demo_rejects_an_unwritable_out_before_training(
  make_out, reason, tmp_path, monkeypatch, capsys
):
  (tmp_path / "a_file").write_text("")
  (tmp_path / "a_directory.png").mkdir()
  out = str(make_out(tmp_path))
  monkeypatch.setattr(_demo, "run_demo", lambda **options: pytest.fail("the demo started"))
  with pytest.raises(SystemExit) as exit_info:
    main(["demo", "--out", out])
  assert exit_info.value.code == 2
  captured = capsys.readouterr()
  assert captured.out == ""
  assert captured.err == (
    "optaccum demo: error: `optaccum demo --out` must be a path the plot can be saved to, "
    f"got {out!r}: {reason.format(tmp=tmp_path)}. (see `optaccum demo --help`)\n"
  )


def test_module_entry_exits_2_on_an_unwritable_out_before_training(tmp_path):
  (tmp_path / "a_file").write_text("")
  out = str(tmp_path / "a_file" / "loss.png")
  result = subprocess.run(
    [sys.executable, "-m", "optaccum", "demo", "--out", out], capture_output=True, text=True
  )
  assert result.returncode == 2, result.stderr
  assert result.stdout == ""  # not even the demo's first line: no data loaded, no training
  assert result.stderr.count("\n") == 1
  assert f"`optaccum demo --out` must be a path the plot can be saved to, got {out!r}" in (
    result.stderr
  )


def test_demo_accepts_an_out_in_directories_it_will_create(tmp_path, monkeypatch):
  calls = []
  monkeypatch.setattr(_demo, "run_demo", lambda **options: calls.append(options))
  out = str(tmp_path / "new" / "plots" / "loss.png")
  assert main(["demo", "--out", out]) == 0
  assert calls[0]["out"] == out


def test_module_entry_exits_2_on_a_bad_option():
  result = subprocess.run(
    [sys.executable, "-m", "optaccum", "demo", "-k", "0"], capture_output=True, text=True
  )
  assert result.returncode == 2
  assert result.stderr.count("\n") == 1
  assert "`optaccum demo -k` must be a positive int, got 0." in result.stderr


def test_console_script_shows_the_demo_options():
  script = Path(sys.executable).with_name("optaccum")
  result = subprocess.run([str(script), "demo", "--help"], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr
  for option in ["-k", "--batch-size", "--steps", "--seed", "--out"]:
    assert option in result.stdout


def test_memory_budget_chooses_the_smallest_k_whose_micro_step_fits(monkeypatch, capsys):
  calls = []
  monkeypatch.setattr(_demo, "run_demo", lambda **options: calls.append(options))
  assert main(["demo", "--memory-budget", "500KiB", "--out", "a.png"]) == 0
  printed = capsys.readouterr().out
  rows = [line.split("|")[1:-1] for line in printed.splitlines() if line.startswith("| ")]
  table = {int(cells[1]): cells[-1].strip() for cells in rows[1:]}
  assert sorted(table) == [2**i for i in range(9)]  # every divisor of the batch of 256
  fitting = [k for k, fits in table.items() if fits == "yes"]
  assert "no" in table.values() and fitting  # the budget decides
  (options,) = calls
  assert options["k"] == min(fitting) > 1 and options["batch_size"] == 256
  assert f"Memory budget 500.0 KiB: k={min(fitting)} is the smallest k" in " ".join(printed.split())


@pytest.mark.parametrize(
  "options, message",
  [
    (["-k", "2", "--memory-budget", "1MiB"], "either -k or --memory-budget, not both"),
    (
      ["--memory-budget", "lots"],
      "must be a size such as 300KiB, 1.5MiB or 2MB (at least 1 byte), got 'lots'",
    ),
    (
      ["--memory-budget", "1KiB"],
      "--memory-budget is too small: `plan(budget=...)` of 1,024 bytes",
    ),
  ],
)
def test_bad_memory_budgets_are_refused_on_one_line(monkeypatch, capsys, options, message):
  monkeypatch.setattr(_demo, "run_demo", lambda **options: pytest.fail("must not train"))
  try:
    code = main(["demo", "--batch-size", "8", *options])
  except SystemExit as exit:
    code = exit.code
  assert code == 2
  error = capsys.readouterr().err
  assert message in error and len(error.strip().splitlines()) == 1


def test_evaluate_command_trains_each_k_on_the_digits_and_saves_the_plot(tmp_path, capsys):
  out = tmp_path / "plots" / "evaluate.png"
  arguments = ["evaluate", "-k", "2", "4", "--batch-size", "64", "--windows", "3"]
  assert main([*arguments, "--rounds", "1", "--out", str(out)]) == 0
  printed = capsys.readouterr().out
  assert out.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
  assert "3 windows of 64 examples; reference: k=1" in printed
  rows = [line for line in printed.splitlines() if line.startswith("│")]
  assert [line.split("│")[1:3] for line in rows] == [
    [f" {form:>10} ", f" {k:>2} "]
    for form, k in (("unsplit", 1), ("accumulate", 2), ("accumulate", 4))
  ]


@pytest.mark.parametrize(
  "options, message",
  [
    (
      ["-k", "3"],
      "`optaccum evaluate -k` must be positive ints dividing --batch-size=256, got 3.",
    ),
    (["--windows", "0"], "`optaccum evaluate --windows` must be a positive int, got 0."),
    (["--rounds", "0"], "`optaccum evaluate --rounds` must be a positive int, got 0."),
    (["--out", "e.jpg"], "`optaccum evaluate --out` must be a .png path, got 'e.jpg'."),
    (["--form", "scan"], "argument --form: invalid choice: 'scan'"),
  ],
)
def test_bad_evaluate_options_are_refused_on_one_line(capsys, options, message):
  with pytest.raises(SystemExit) as exit:
    main(["evaluate", *options])
  assert exit.value.code == 2
  error = capsys.readouterr().err
  assert message in error and len(error.strip().splitlines()) == 1

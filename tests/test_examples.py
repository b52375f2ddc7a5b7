"""Every script in examples/ runs, and reports what its docstring promises."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NAMES = [
  "checkpoint_resume",
  "linen_mlp",
  "nnx_model",
  "optimizer_chain",
  "quickstart",
  "token_weighted_lm",
]


@pytest.fixture(scope="module")
def outputs():
  """Runs all the examples at once (each is mostly start-up and compilation)."""
  processes = {
    name: subprocess.Popen(
      [sys.executable, "-W", "error", str(EXAMPLES / f"{name}.py")],
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for name in NAMES
  }
  results = {}
  for name, process in processes.items():
    stdout, stderr = process.communicate(timeout=300)
    results[name] = (process.returncode, stdout, stderr)
  return results


def output_of(outputs, name):
  code, stdout, stderr = outputs[name]
  assert code == 0, f"examples/{name}.py failed:\n{stderr}"
  return stdout


def differences(stdout):
  return [
    float(value)
    for value in re.findall(r"largest difference from large[- ]batch\D*?([0-9.e+-]+)\n", stdout)
  ]


def test_every_example_is_run():
  assert sorted(path.stem for path in EXAMPLES.glob("*.py")) == NAMES


def test_linen_mlp_logs_by_gradient_step_and_matches_large_batch(outputs):
  stdout = output_of(outputs, "linen_mlp")
  assert "gradient step  40 (micro-step 160): loss" in stdout
  [difference] = differences(stdout)
  assert difference < 1e-5


def test_nnx_model_logs_gradient_step_and_schedule_and_matches_large_batch(outputs):
  stdout = output_of(outputs, "nnx_model")
  assert "gradient step  10 (optimizer.step  30): loss" in stdout
  # linear_schedule(0.1 -> 0.01 over 30 steps) at step 10.
  assert "next learning rate 0.0700" in stdout
  [difference] = differences(stdout)
  assert difference < 1e-5


def test_token_weighted_lm_matches_large_batch_only_with_token_weights(outputs):
  stdout = output_of(outputs, "token_weighted_lm")
  weighted, unweighted = differences(stdout)
  assert weighted < 1e-5
  assert unweighted > 1e-3


def test_optimizer_chain_schedule_counts_optimizer_steps_and_matches_large_batch(outputs):
  stdout = output_of(outputs, "optimizer_chain")
  # Warm-up from 0 to 0.2 over 5 optimizer steps: step 5 used the rate of step 4.
  assert "gradient step  5: learning rate used 0.1600" in stdout
  [difference] = differences(stdout)
  assert difference < 1e-5


def test_checkpoint_resume_is_bit_identical_and_refuses_another_every_k(outputs):
  stdout = output_of(outputs, "checkpoint_resume")
  assert "restored: gradient step 1, 2 of 4 micro-batches into the window" in stdout
  assert "resumed parameters bit-identical to the uninterrupted run: True" in stdout
  assert "restoring with every_k=2 fails:" in stdout


def test_quickstart_takes_one_optimizer_step_per_window_and_matches_large_batch(outputs):
  stdout = output_of(outputs, "quickstart")
  assert "optimizer steps taken: 10" in stdout
  [difference] = differences(stdout)
  assert difference < 1e-5

"""benchmarks/loops.py: the peers' in-step loops compute the batch's gradient; the quick run works.

No timing is asserted: the quick run checks that every method compiles, runs,
is measured and trains what the large batch trains.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import loops
from benchmarks._methods import Workload

EVERY_METHOD = [
  "large batch",
  "optaccum.microbatch",
  "t5x accumulate_grads_microbatched",
  "MaxText gradient accumulation",
  "levanter microbatched",
  "big_vision accumulate_gradient",
  "optax.microbatching.microbatch",
]


def _least_squares(params, batch):
  x, y = batch
  return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)


@pytest.mark.parametrize(
  "loop",
  [
    loops.t5x,
    loops.maxtext,
    lambda loss, k: loops.levanter(jax.value_and_grad(loss), k),
    lambda loss, k: loops.big_vision(jax.value_and_grad(loss), k),
    lambda loss, k: loops.optax_loop(jax.value_and_grad(loss), k, 12),
  ],
  ids=["t5x", "maxtext", "levanter", "big_vision", "optax"],
)
def test_peer_loop_returns_the_mean_loss_and_gradient_of_the_batch(loop):
  rng = np.random.default_rng(0)
  x, y, w = rng.normal(size=(12, 3)), rng.normal(size=(12, 2)), rng.normal(size=(3, 2))
  b = rng.normal(size=2)
  residual = x @ w + b - y
  # d/dw mean(r^2) over the 24 entries: 2 x^T r / 24; d/db: 2 sum_rows(r) / 24.
  expected_loss = np.mean(residual**2)
  expected_w, expected_b = 2 * x.T @ residual / 24, 2 * residual.sum(axis=0) / 24
  params = {"w": jnp.asarray(w, jnp.float32), "b": jnp.asarray(b, jnp.float32)}
  batch = (jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
  loss, grads = jax.jit(loop(_least_squares, 4))(params, batch)
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
  np.testing.assert_allclose(grads["w"], expected_w, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grads["b"], expected_b, rtol=1e-5, atol=1e-6)


def test_methods_refuses_a_grad_fn_not_made_by_value_and_grad():
  def grad_fn(params, batch):
    return jnp.sum(params * batch), batch

  workload = Workload("w", "w", "w", jnp.ones(4), [jnp.ones(4)] * 2, jnp.ones(8), grad_fn, True)
  with pytest.raises(TypeError, match=r"`methods\(workload=\.\.\.\)` needs a grad_fn made by"):
    loops.methods(workload)


def _row(name: str, seconds: list[float], temp: int) -> dict:
  return {
    "method": name,
    "temp_bytes": temp,
    "seconds": float(np.median(seconds)),
    "seconds_per_round": seconds,
    "compile_s": 2.0 if name == "optaccum.microbatch" else 1.0,
  }


@pytest.mark.parametrize(
  ("ours", "expected"),
  [([0.9, 0.8, 0.95], "ahead"), ([1.1, 0.9, 1.0], "parity"), ([1.2, 1.1, 1.05], "behind")],
)
def test_verdict_compares_each_round_with_the_fastest_peer_in_that_round(ours, expected):
  rows = [_row("large batch", [2.0, 2.0, 2.0], 100), _row("optaccum.microbatch", ours, 40)]
  # The fastest peer by median is MaxText (1.0), although levanter wins round 3.
  peers = {"MaxText gradient accumulation": [1.0, 1.0, 1.0], "levanter microbatched": [1.3] * 2}
  for name in loops.PEERS:
    seconds = peers.get(name, [1.5, 1.5, 1.5])
    rows.append(_row(name, seconds + [0.5] * (3 - len(seconds)), 50 if "t5x" in name else 60))
  found = loops.verdict(rows)
  assert found["fastest_peer"] == "MaxText gradient accumulation"
  assert found["time_vs_fastest_peer_per_round"] == ours
  assert found["time"] == expected
  assert found["leanest_peer"] == "t5x accumulate_grads_microbatched"
  assert found["temp_vs_leanest_peer"] == 0.8 and found["leanest"]
  assert found["compile_vs_large_batch"] == 2.0


@pytest.mark.parametrize("flag", ["--rounds", "--steps", "--compile-rounds"])
def test_loops_rejects_counts_below_one(flag, capsys):
  with pytest.raises(SystemExit) as raised:
    loops.main([flag, "0"])
  assert raised.value.code == 2
  assert f"{flag} must be at least 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize(
  ("argv", "choices"),
  [
    (["--workloads", "mlp,cnn"], "mlp, lm, lm-params"),
    (["--quick", "--workloads", "lm-params"], "mlp, lm"),
  ],
)
def test_loops_rejects_an_unknown_workload(argv, choices, capsys):
  with pytest.raises(SystemExit) as raised:
    loops.main(argv)
  assert raised.value.code == 2
  bad = argv[-1].split(",")[-1]
  assert f"--workloads: unknown workload {bad!r}; choose from {choices}" in capsys.readouterr().err


# benchmarks/lm.py builds its attention with flax's nn.SelfAttention, which warns.
@pytest.mark.filterwarnings("ignore:SelfAttention will be deprecated:DeprecationWarning")
def test_quick_run_measures_every_method_and_each_trains_the_large_batch(capsys):
  report = loops.main(["--quick"])
  out = capsys.readouterr().out
  assert out.startswith("QUICK RUN")
  assert report["command"] == "python -m benchmarks.loops --quick"
  assert (report["rounds"], report["steps"], report["compile_rounds"]) == (1, 1, 1)
  assert list(report["workloads"]) == ["mlp", "lm"]
  for workload in report["workloads"].values():
    rows = workload["rows"]["2"]
    assert [row["method"] for row in rows] == EVERY_METHOD
    for row in rows:
      assert row["temp_bytes"] > 0 and row["seconds"] > 0 and row["compile_s"] > 0, row
      assert 0 <= row["max_param_difference"] < 1e-2, row
      assert row["steps"] == 2
    assert rows[0]["max_param_difference"] == 0
    assert workload["verdicts"]["2"]["time"] in ("ahead", "parity", "behind")
  assert out.count("| k | method | temporaries (MiB) | temp vs leanest peer |") == 2
  assert out.rstrip().splitlines()[-1].startswith('{"command": "python -m benchmarks.loops')

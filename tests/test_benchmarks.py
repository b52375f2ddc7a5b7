"""The benchmark suite runs and writes its report (no timing is asserted)."""

from __future__ import annotations

import dataclasses
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import _report
from benchmarks._measure import Result

ROOT = Path(__file__).resolve().parent.parent


def _result(name: str, family: str, seconds: float, temp_mib: float) -> Result:
  memory = {"temp": int(temp_mib * 2**20), "argument": 0, "output": 0, "alias": 0}
  return Result(name, family, seconds, None, memory)


NOTES = "## Notes\n\nHand-written, kept across runs.\n"


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory) -> str:
  """RESULTS.md of one quick run of the micro-step and the parameter-heavy LM (one process)."""
  out = tmp_path_factory.mktemp("benchmarks")
  (out / "RESULTS.md").write_text(f"old tables\n{_report.KEEP_MARKER}\n{NOTES}")
  completed = subprocess.run(
    [sys.executable, "-m", "benchmarks", "--quick", "--rounds", "1"]
    + ["--workloads", "microstep,lm-params", "--out", str(out)],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert completed.returncode == 0, completed.stderr[-3000:]
  assert (out / "results.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
  return (out / "RESULTS.md").read_text()


def test_quick_run_of_the_model_writes_targets_and_chart_and_keeps_notes(quick_report):
  text = quick_report
  assert text.startswith("# Benchmarks\n\n**QUICK RUN")
  assert "`python -m benchmarks --quick --rounds 1 --workloads microstep,lm-params --out" in text
  assert "old tables" not in text and text.endswith(NOTES)
  assert "## Targets (parameter-heavy LM)" in text
  assert "## (b2) Transformer LM, parameter-heavy" in text
  assert "| apply_gradients >= 0.85x of its limit |" in text
  compile_section = text.split("## Compile time", 1)[1]
  for row in ("| optaccum.apply_gradients |", "| optaccum.accumulate |", "| optax.MultiSteps |"):
    assert row in compile_section
  for method in (
    "| plain: optimizer every micro-step |",
    '| optaccum.apply_gradients (default: "cond") |',
    '| optaccum.accumulate (default: "cond") |',
    "| optax.MultiSteps |",
  ):
    assert method in text


def test_quick_run_of_the_micro_step_measures_every_method(quick_report):
  text = quick_report
  # Targets are set for the parameter-heavy LM alone, not for the micro-step.
  assert "## (a) Optimizer-only micro-step" in text and text.count("## Targets") == 1
  for method in (
    "| plain: optimizer every micro-step |",
    "| floor: acc + g, no optimizer |",
    '| optaccum.apply_gradients (default: "cond") |',
    "| parameter write: p + where(emitted, u, 0) |",
    '| optaccum.accumulate (default: "cond") |',
    "| optaccum.accumulate(window_guard=False) |",
    "| optaccum.apply_gradients(skip=skip_not_finite) |",
    "| optax.MultiSteps |",
    "| optax.chain(adamw, apply_every(k)) |",
    "| hand-written loop (Python branch) |",
    '| optaccum.apply_gradients (strategy="loop") |',
    '| optaccum.accumulate (strategy="select") |',
  ):
    assert method in text
  assert "| (a) Optimizer-only micro-step | loop | " in text


def test_unknown_workload_is_rejected_naming_the_choices(capsys):
  # `python -m benchmarks --quick --workloads gpu`, in this process (a fresh one
  # would pay JAX's import to read its arguments).
  command_line = importlib.import_module("benchmarks.__main__")

  with pytest.raises(SystemExit) as raised:
    command_line.main(["--quick", "--workloads", "gpu"])
  assert raised.value.code == 2
  message = "unknown workload 'gpu'; choose from microstep, lm-compute, lm-params"
  assert message in capsys.readouterr().err


@pytest.mark.parametrize(
  ("fast_seconds", "fast_temp", "met"),
  [(0.9, 40.5, ["yes", "yes"]), (1.1, 41.0, ["**no**", "**no**"])],
)
def test_targets_table_says_whether_each_target_is_met(fast_seconds, fast_temp, met):
  results = [
    _result("plain: optimizer every micro-step", "reference", 1.0, 40.0),
    _result('optaccum.apply_gradients (default: "cond")', "optaccum", fast_seconds, fast_temp),
    _result('optaccum.accumulate (default: "cond")', "optaccum", 1.05, 60.0),
    _result("optax.MultiSteps", "alternative", 1.25, 70.0),
  ]
  table = _report.targets_table(_report.Section("lm-params", "LM", "", results))
  rows = table.splitlines()[2:]
  assert [row.rsplit("|", 2)[1].strip() for row in rows[:2]] == met
  # 1 / 1.05 = 0.952x plain >= 0.93x, and 60 MiB <= 70 MiB.
  assert "0.952x (optax.MultiSteps: 0.800x)" in rows[2] and rows[2].endswith("| yes |")
  assert rows[3].endswith("| yes |")


def test_limit_is_the_floor_plus_the_optimizer_amortized_over_the_window():
  fast = _result('optaccum.apply_gradients (default: "cond")', "optaccum", 1.5, 1.0)
  transform = _result('optaccum.accumulate (default: "cond")', "optaccum", 2.5, 1.0)
  results = [
    _result("plain: optimizer every micro-step", "reference", 9.0, 1.0),
    _result("floor: acc + g, no optimizer", "reference", 1.0, 1.0),
    _result("parameter write: p + where(emitted, u, 0)", "reference", 1.0, 1.0),
    dataclasses.replace(fast, form="fast"),
    dataclasses.replace(transform, form="transformation"),
    _result("optax.MultiSteps", "alternative", 5.0, 2.0),
  ]
  section = _report.Section("lm-params", "LM", "", results, every_k=8)
  # Limits: 1 + (9 - 1) / 8 = 2 for the fast path, 2 + 1 = 3 for the transformation.
  assert _report.vs_limit(results[3], section) == pytest.approx(2.0 / 1.5)
  assert _report.vs_limit(results[4], section) == pytest.approx(3.0 / 2.5)
  assert _report.vs_limit(results[0], section) is None
  rows = _report.targets_table(section).splitlines()[2:4]
  assert rows[0].startswith("| apply_gradients >= 0.85x of its limit | 1.333x | yes")
  assert rows[1].startswith("| accumulate >= 0.85x of its limit | 1.200x | yes")


def test_pass_times_reads_xla_pass_log_of_a_real_compile():
  from benchmarks import compile_time

  compile_s, passes = compile_time.pass_times("optaccum.apply_gradients", layers=2)
  assert compile_s > 0
  # Passes every XLA:CPU compile runs; their times come from XLA's own log.
  assert {"copy-insertion", "fusion", "layout-assignment"} <= set(passes)
  assert all(seconds >= 0 for seconds in passes.values())


PEER_METHODS = [
  "large batch",
  "optaccum.microbatch",
  "optax.microbatching.microbatch",
  "optaccum.apply_gradients",
  "optaccum.accumulate",
  "optax.MultiSteps",
]


def test_quick_run_of_peers_measures_every_form_and_runs_every_check():
  completed = subprocess.run(
    [sys.executable, "-m", "benchmarks.peers", "--quick", "--rounds", "1"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=400,
  )
  assert completed.returncode == 0, completed.stderr[-3000:]
  assert completed.stdout.startswith("QUICK RUN")
  report = json.loads(completed.stdout.strip().splitlines()[-1])
  assert report["quick"] and report["rounds"] == 1
  assert report["command"] == "python -m benchmarks.peers --quick --rounds 1"
  for key in ("mlp", "lm"):
    rows = report["workloads"][key]["rows"]["2"]
    assert [row["method"] for row in rows] == PEER_METHODS
    for row in rows:
      assert row["seconds"] > 0 and row["temp_bytes"] > 0 and row["windows"] == 2
      # Every form trains the same windows as the large batch: float32 rounding apart.
      assert 0 <= row["max_param_difference"] < 1e-2, row
    assert rows[0]["max_param_difference"] == 0
  table_header = "| k | method | time per batch vs large batch | vs its Optax peer |"
  assert completed.stdout.count(table_header) == 2
  from benchmarks import peers

  # Each check raises if what it states about Optax no longer holds; all of them ran.
  assert len(report["checks"]) == len(peers.CHECKS)
  assert all(check["optaccum"] and check["optax"] for check in report["checks"])
  assert "| behaviour | optaccum | Optax |" in completed.stdout
  assert report["all_reduces"] == {
    "large batch": 1,
    "optaccum.microbatch(axis_name=('data',))": 1,
    "optaccum.microbatch": 4,
    "optax.microbatching.microbatch": 4,
    "optaccum.accumulate(axis_name=('data',)) + parallel.per_replica": 1,
    "optaccum.accumulate": 4,
    "optax.MultiSteps": 4,
  }


def test_peers_rejects_rounds_below_one(capsys):
  from benchmarks import peers

  with pytest.raises(SystemExit) as raised:
    peers.main(["--rounds", "0"])
  assert raised.value.code == 2
  assert "--rounds must be at least 1, got 0" in capsys.readouterr().err


def test_the_loops_comparison_is_a_workload_of_the_suite_and_a_section_of_its_results():
  from benchmarks import __main__ as suite
  from benchmarks import loops

  assert "loops" in suite.WORKLOADS and suite._parse([]).workloads[-1] == "loops"
  report = {"command": "python -m benchmarks", "rounds": 5, "steps": 5, "compile_rounds": 3}
  report["load"] = ["1.0, 1.0, 1.0", "2.0, 2.0, 2.0"]
  section = loops.section("### (a) MLP\n\n| k | method |\n", report)
  assert section.startswith(loops.SECTION_TITLE)
  assert "5 timed rounds of 5 steps, 3 compilations per method" in section
  text = _report.results_markdown(
    [],
    command="python -m benchmarks",
    machine="cpu",
    load_before="1",
    load_after="2",
    rounds=7,
    quick=False,
    chart_name="results.png",
    kept=NOTES,
    loops_section=section,
  )
  # Generated above the hand-kept notes, so a full run rewrites it.
  assert text.index(loops.SECTION_TITLE) < text.index(_report.KEEP_MARKER)
  assert "### (a) MLP" in text and text.endswith(NOTES)


def test_only_a_full_run_rewrites_the_repository_results():
  # benchmarks/RESULTS.md holds every workload's tables; a partial run would drop
  # the others', so without --out it writes into a temporary folder.
  from benchmarks import __main__ as suite

  repository = Path(suite.__file__).resolve().parent
  assert suite.output_directory(suite._parse([])) == repository
  assert suite.output_directory(suite._parse(["--workloads", "loops"])) != repository
  assert suite.output_directory(suite._parse(["--quick"])) != repository
  assert suite.output_directory(suite._parse(["--workloads", "loops", "--out", "x"])) == Path("x")

"""Run the benchmark suite: `python -m benchmarks [--quick] [--out DIR]`.

Compares, side by side in one process, optaccum's transformation and fast path,
in-step micro-batching (where present), optax.MultiSteps,
optax.chain(opt, optax.apply_every(k)), a hand-written loop and plain training,
on an optimizer-only micro-step and on two small transformer language models;
then (`loops`) `optaccum.microbatch` beside the in-step loops of t5x, MaxText,
levanter, big_vision and optax (benchmarks/loops.py). Writes RESULTS.md
(tables, the machine, versions and load) and results.png.

The full run writes into benchmarks/ and takes a few minutes. `--quick` runs
tiny sizes for a few rounds in under a minute, to check that the suite works
(CI runs it); it writes into a temporary directory unless given `--out`, and
marks its tables as not being measurements. A run of some `--workloads` only also
writes into a temporary directory unless given `--out`: benchmarks/RESULTS.md
holds every workload's tables.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import optax

from benchmarks import _measure, _methods, _report, compile_time, lm, loops, microstep

EVERY_K = 8
WORKLOADS = ("microstep", "lm-compute", "lm-params", "loops")


def _workload(key: str, quick: bool) -> _methods.Workload:
  if key == "microstep":
    return microstep.workload(200_000 if quick else 8_000_000, EVERY_K)
  if key == "lm-compute":
    config = lm.QUICK_COMPUTE_HEAVY if quick else lm.COMPUTE_HEAVY
    return lm.workload(key, "(b1) Transformer LM, compute-heavy", config, EVERY_K)
  config = lm.QUICK_PARAMETER_HEAVY if quick else lm.PARAMETER_HEAVY
  return lm.workload(key, "(b2) Transformer LM, parameter-heavy", config, EVERY_K)


def _make_inner() -> optax.GradientTransformation:
  return optax.adamw(1e-3)


def _parse(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="tiny sizes, few rounds (< 1 min)")
  parser.add_argument("--out", type=Path, help="directory for RESULTS.md and results.png")
  parser.add_argument("--rounds", type=int, help="timed rounds (default: 2 quick, 7 full)")
  parser.add_argument(
    "--workloads",
    default=",".join(WORKLOADS),
    help=f"comma-separated subset of {', '.join(WORKLOADS)}",
  )
  args = parser.parse_args(argv)
  args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
  for key in args.workloads:
    if key not in WORKLOADS:
      parser.error(f"--workloads: unknown workload {key!r}; choose from {', '.join(WORKLOADS)}")
  if args.rounds is not None and args.rounds < 1:
    parser.error(f"--rounds must be at least 1, got {args.rounds}")
  return args


def output_directory(args: argparse.Namespace) -> Path:
  """Where a run writes: `--out`, else benchmarks/ for a full run, else a temporary folder.

  benchmarks/RESULTS.md holds every workload's tables: a quick run or one of
  some workloads only would replace them with its own, so it writes elsewhere
  unless told where.
  """
  if args.out is not None:
    return Path(args.out)
  if args.quick:
    return Path(tempfile.gettempdir()) / "optaccum-benchmarks-quick"
  if set(args.workloads) != set(WORKLOADS):
    return Path(tempfile.gettempdir()) / "optaccum-benchmarks-partial"
  return Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> Path:
  """Runs the suite; returns the path of the RESULTS.md it wrote."""
  args = _parse(argv)
  rounds = args.rounds or (2 if args.quick else 7)
  out = output_directory(args)
  out.mkdir(parents=True, exist_ok=True)

  command = " ".join(["python -m benchmarks", *(sys.argv[1:] if argv is None else argv)])
  load_before = _measure.load_average()
  started = time.perf_counter()
  sections = []
  for key in args.workloads:
    if key == "loops":
      continue  # after the compile time, below
    workload = _workload(key, args.quick)
    print(f"{workload.title}: {workload.description}", flush=True)
    # A quick run compiles every method only for the model-free micro-step,
    # where compiling is cheap, and at XLA's lowest optimization level.
    methods = _methods.all_methods(
      workload, _make_inner, complete=not (args.quick and workload.with_model)
    )
    results = _measure.measure_methods(
      methods,
      workload.params,
      workload.micro_batches,
      workload.whole_batch,
      rounds,
      non_emitting=not workload.with_model,
      compiler_options={"xla_backend_optimization_level": 0} if args.quick else None,
    )
    section = _report.Section(workload.key, workload.title, workload.description, results, EVERY_K)
    print(_report.workload_table(section), "\n", flush=True)
    sections.append(section)

  # Compile time: a many-leaf model (quick: a small one at XLA's lowest level).
  layers = 4 if args.quick else 300
  compile_rows = compile_time.measure(
    layers,
    1 if args.quick else 3,
    {"xla_backend_optimization_level": 0} if args.quick else None,
  )
  compile_section = _report.compile_section(compile_rows, layers, compile_time.EVERY_K)
  print(compile_section, flush=True)
  loops_section = ""
  if "loops" in args.workloads:
    # The peers' loops, timed as benchmarks/loops.py times them (its quick run: one round).
    loop_rounds = 1 if args.quick else 5
    markdown, report = loops.run(
      args.quick, loop_rounds, 1 if args.quick else 5, 1 if args.quick else 3, command=command
    )
    loops_section = loops.section(markdown, report)

  results_path = out / "RESULTS.md"
  chart_name = "results.png"
  title = f"optaccum benchmarks{' (QUICK RUN, not a measurement)' if args.quick else ''}"
  _report.chart(sections, out / chart_name, f"{title}: {_measure.machine_description()}")
  results_path.write_text(
    _report.results_markdown(
      sections,
      command=command,
      machine=_measure.machine_description(),
      load_before=load_before,
      load_after=_measure.load_average(),
      rounds=rounds,
      quick=args.quick,
      chart_name=chart_name,
      compile_section=compile_section,
      loops_section=loops_section,
      kept=_report.kept_notes(results_path),
    )
  )
  print(f"wrote {results_path} and {out / chart_name} in {time.perf_counter() - started:.0f} s")
  return results_path


if __name__ == "__main__":
  main()

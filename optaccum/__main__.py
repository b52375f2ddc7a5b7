"""The `optaccum` command line: `python -m optaccum demo --help`, `optaccum evaluate --help`."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence
from typing import NoReturn

# Defaults finish in well under a minute on two CPU cores.
DEFAULT_K = 4
DEFAULT_BATCH_SIZE = 256
DEFAULT_STEPS = 300
DEFAULT_SEED = 0
DEFAULT_OUT = "optaccum_demo.png"
# Counts (-k, --batch-size, --steps, --windows, --rounds) stay within int32, the
# type of JAX's and Optax's step counters; jax.random.key takes a signed 64-bit seed.
MAX_COUNT = 2**31 - 1
MAX_SEED = 2**63 - 1


class _OneLineErrors(argparse.ArgumentParser):
  """Reports a bad option on one line of stderr (no usage block) and exits with 2."""

  def error(self, message: str) -> NoReturn:
    self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _parsers() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
  """The `optaccum` parser and its subcommands' (`demo`, `evaluate`), by name."""
  parser = _OneLineErrors(
    prog="optaccum",
    description="optaccum: gradient accumulation for JAX, built on Optax.",
  )
  commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  demo = commands.add_parser(
    "demo",
    help="train a Flax model with a large batch and with accumulation; compare them",
    description=(
      "Trains the same Flax MLP on scikit-learn's bundled handwritten digits twice: "
      "once with batches of --batch-size, once with -k micro-batches of "
      "batch-size / k accumulated into each optimizer step. Prints a table "
      "(final loss and accuracy of each run, their largest parameter difference, "
      "the compiled memory of one step of each, wall time) and saves a PNG of the "
      "two loss curves."
    ),
  )
  demo.add_argument(
    "-k",
    type=int,
    default=None,
    help=f"micro-batches accumulated per optimizer step (default: {DEFAULT_K})",
  )
  demo.add_argument(
    "--memory-budget",
    default=None,
    metavar="SIZE",
    help=(
      "choose -k from a memory budget such as 300KiB: the smallest k whose compiled "
      "micro-step fits (optaccum.planning.plan), printing the table it chose from"
    ),
  )
  demo.add_argument(
    "--batch-size",
    type=int,
    default=DEFAULT_BATCH_SIZE,
    help="examples per optimizer step, a multiple of -k (default: %(default)s)",
  )
  demo.add_argument(
    "--steps",
    type=int,
    default=DEFAULT_STEPS,
    help="optimizer steps of each run (default: %(default)s)",
  )
  demo.add_argument(
    "--seed",
    type=int,
    default=DEFAULT_SEED,
    help="seed of the initial parameters and the batch order (default: %(default)s)",
  )
  demo.add_argument(
    "--out",
    default=DEFAULT_OUT,
    help="where to save the PNG of the loss curves (default: %(default)s)",
  )
  return parser, {"demo": demo, "evaluate": _evaluate_parser(commands)}


# argparse names the type of `add_subparsers()` only privately.
def _evaluate_parser(
  commands: argparse._SubParsersAction[_OneLineErrors],
) -> argparse.ArgumentParser:
  evaluate = commands.add_parser(
    "evaluate",
    help="evaluate accumulation on the demo model: speed, memory and divergence for each k",
    description=(
      "Trains the demo's Flax MLP on the digits for --windows optimizer steps of "
      "--batch-size, from the same parameters on the same batches, with the unsplit "
      "batch and with each -k (optaccum.planning.evaluate): prints the time per example "
      "(medians of --rounds interleaved rounds), the compiled memory of each step and "
      "the largest parameter and loss differences from the unsplit run, and saves a PNG."
    ),
  )
  evaluate.add_argument(
    "-k", type=int, nargs="+", default=[2, 4, 8], metavar="K",
    help="the k to evaluate, each dividing --batch-size (default: 2 4 8)",
  )  # fmt: skip
  for flag, default, text in (
    ("--batch-size", DEFAULT_BATCH_SIZE, "examples per optimizer step"),
    ("--windows", 20, "optimizer steps of each run"),
    ("--rounds", 3, "timed rounds"),
    ("--seed", DEFAULT_SEED, "seed of the initial parameters and the batch order"),
  ):
    evaluate.add_argument(flag, type=int, default=default, help=f"{text} (default: %(default)s)")
  evaluate.add_argument(
    "--form", choices=("accumulate", "microbatch"), default="accumulate",
    help="across steps (accumulate) or in one step (microbatch) (default: %(default)s)",
  )  # fmt: skip
  evaluate.add_argument(
    "--out", default="optaccum_evaluate.png", help="where to save the PNG (default: %(default)s)"
  )
  return evaluate


def _count_problem(command: str, flag: str, value: int | None) -> str | None:
  """Why `value` is no count (a positive int, at most MAX_COUNT), or None (None: not given)."""
  if value is not None and value < 1:
    return f"`{command} {flag}` must be a positive int, got {value}."
  if value is not None and value > MAX_COUNT:
    return f"`{command} {flag}` must be at most 2**31 - 1 = {MAX_COUNT}, got {value}."
  return None


def _seed_problem(command: str, seed: int) -> str | None:
  """Why `seed` is no seed for jax.random.key (an int in [0, 2**63 - 1]), or None."""
  if seed < 0:
    return f"`{command} --seed` must be a non-negative int, got {seed}."
  if seed > MAX_SEED:
    return f"`{command} --seed` must be at most 2**63 - 1 = {MAX_SEED}, got {seed}."
  return None


def _check_evaluate_options(args: argparse.Namespace) -> str | None:
  """The first problem with `optaccum evaluate`'s options, or None."""
  command = "optaccum evaluate"
  counts = [("--batch-size", args.batch_size), ("--windows", args.windows)]
  for flag, value in [*counts, ("--rounds", args.rounds)]:
    problem = _count_problem(command, flag, value)
    if problem is not None:
      return problem
  problem = _seed_problem(command, args.seed)
  if problem is not None:
    return problem
  for k in args.k:
    if k < 1 or args.batch_size % k:
      return (
        f"`optaccum evaluate -k` must be positive ints dividing --batch-size="
        f"{args.batch_size}, got {k}."
      )
  return _check_out("optaccum evaluate", args.out)


def _check_out(command: str, out: str) -> str | None:
  """Why `--out` cannot take the PNG, or None."""
  if not out.lower().endswith(".png"):
    return f"`{command} --out` must be a .png path, got {out!r}."
  unwritable = _why_unwritable(out)
  if unwritable is not None:
    return f"`{command} --out` must be a path the plot can be saved to, got {out!r}: {unwritable}."
  return None


def _check_demo_options(args: argparse.Namespace) -> str | None:
  """The first problem with the demo's options, or None; reads --memory-budget into bytes."""
  if args.k is not None and args.memory_budget is not None:
    return "give `optaccum demo` either -k or --memory-budget, not both."
  if args.memory_budget is not None:
    from optaccum._planning import parse_bytes

    try:
      args.memory_budget = parse_bytes("optaccum demo", "memory_budget", args.memory_budget)
    except (TypeError, ValueError):
      return (
        "`optaccum demo --memory-budget` must be a size such as 300KiB, 1.5MiB or 2MB "
        f"(at least 1 byte), got {args.memory_budget!r}."
      )
  elif args.k is None:
    args.k = DEFAULT_K
  for flag, value in [
    ("-k", args.k),
    ("--batch-size", args.batch_size),
    ("--steps", args.steps),
  ]:
    problem = _count_problem("optaccum demo", flag, value)
    if problem is not None:
      return problem
  problem = _seed_problem("optaccum demo", args.seed)
  if problem is not None:
    return problem
  if args.k is not None and args.batch_size % args.k:
    return f"`optaccum demo --batch-size` must be a multiple of -k={args.k}, got {args.batch_size}."
  return _check_out("optaccum demo", args.out)


def _why_unwritable(path: str) -> str | None:
  """Why no file can be written at `path`, or None.

  Checked before training, which takes a minute, rather than when the plot is
  saved at the end. The demo creates missing directories, so what must be
  writable is the nearest directory that exists.
  """
  path = os.path.abspath(path)
  if os.path.isdir(path):
    return "it is a directory"
  if os.path.exists(path):
    return None if os.access(path, os.W_OK) else "the file is not writable"
  ancestor = os.path.dirname(path)
  # A path through a regular file does not exist either: the walk stops at the file.
  while not os.path.exists(ancestor):
    ancestor = os.path.dirname(ancestor)
  if not os.path.isdir(ancestor):
    return f"{ancestor} is not a directory"
  if not os.access(ancestor, os.W_OK | os.X_OK):
    return f"the directory {ancestor} is not writable"
  # os.access answers yes to root everywhere, /proc and read-only mounts
  # included: creating a file is the test that does not lie.
  try:
    with tempfile.TemporaryFile(dir=ancestor):
      pass
  except OSError as error:
    return f"no file can be created in {ancestor} ({error.strerror})"
  return None


def _attach_dash_values(
  argv: Sequence[str], commands: dict[str, argparse.ArgumentParser]
) -> list[str]:
  """`argv` with a value that starts with "-" attached to its option: `--memory-budget=-5MiB`.

  argparse takes "-5MiB" for an unknown option and says only that
  --memory-budget "expected one argument"; attached, the value reaches the
  option's own check, whose message names it. Options of one value only.
  """
  argv = list(argv)
  command = next((index for index, word in enumerate(argv) if word in commands), None)
  if command is None:
    return argv
  actions = commands[argv[command]]._actions  # argparse lists its options only privately
  known = {flag for action in actions for flag in action.option_strings}
  takes_one = {flag for action in actions if action.nargs is None for flag in action.option_strings}
  attached: list[str] = argv[: command + 1]
  rest = iter(argv[command + 1 :])
  for word in rest:
    if word == "--":
      attached += [word, *rest]
      break
    value = next(rest, None) if word in takes_one else None
    if value is not None and value.startswith("-") and value not in known and value != "--":
      attached.append(f"{word}={value}")
    else:
      attached += [word] if value is None else [word, value]
  return attached


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the command line on `argv` (default: `sys.argv[1:]`); returns the exit code."""
  parser, commands = _parsers()
  argv = sys.argv[1:] if argv is None else argv
  args = parser.parse_args(_attach_dash_values(argv, commands))
  check = _check_demo_options if args.command == "demo" else _check_evaluate_options
  problem = check(args)
  if problem is not None:
    commands[args.command].error(problem)
  try:
    from optaccum import _demo
  except ImportError as error:
    print(
      f"optaccum {args.command}: error: {error}; install the demo extras: "
      'pip install "optaccum[demo]"',
      file=sys.stderr,
    )
    return 1
  if args.command == "evaluate":
    options = ("k", "batch_size", "windows", "rounds", "form", "seed", "out")
    _demo.run_evaluation(**{name: getattr(args, name) for name in options})
    return 0
  k = args.k
  if args.memory_budget is not None:
    try:
      k = _demo.choose_k(batch_size=args.batch_size, budget=args.memory_budget)
    except ValueError as error:
      print(f"optaccum demo: error: --memory-budget is too small: {error}", file=sys.stderr)
      return 2
  _demo.run_demo(
    k=k,
    batch_size=args.batch_size,
    steps=args.steps,
    seed=args.seed,
    out=args.out,
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""`optaccum demo` and `optaccum evaluate` on bad options: one line naming option and value.

Run in-process through `main(argv)`; the demo and the evaluation themselves are
replaced by stand-ins, so nothing trains: a refused option must be refused
before either starts, and an accepted one must reach it unchanged.
"""

import pytest

from optaccum import _demo
from optaccum.__main__ import main

HUGE = "99999999999999999999"  # beyond int64


@pytest.fixture
def started(monkeypatch):
  """What reached the demo, the evaluation or the planner, by name and options."""
  calls = []
  monkeypatch.setattr(_demo, "run_demo", lambda **options: calls.append(("demo", options)))
  monkeypatch.setattr(
    _demo, "run_evaluation", lambda **options: calls.append(("evaluate", options))
  )

  def choose_k(**options):
    calls.append(("choose_k", options))
    return 1

  monkeypatch.setattr(_demo, "choose_k", choose_k)
  return calls


def refusal(argv, capsys):
  """Runs the command line; the one line it printed to stderr, after checking it exits 2."""
  with pytest.raises(SystemExit) as exit_info:
    main(argv)
  assert exit_info.value.code == 2
  captured = capsys.readouterr()
  assert captured.out == ""
  lines = captured.err.splitlines()
  assert len(lines) == 1, captured.err
  assert "Traceback" not in captured.err
  return lines[0]


@pytest.mark.parametrize(
  "options, message",
  [
    (["-k", "-2"], "`optaccum demo -k` must be a positive int, got -2."),
    (["-k", HUGE], f"`optaccum demo -k` must be at most 2**31 - 1 = 2147483647, got {HUGE}."),
    (["-k", "2.5"], "argument -k: invalid int value: '2.5'"),
    (["-k", "3"], "`optaccum demo --batch-size` must be a multiple of -k=3, got 256."),
    (["--batch-size", "-4"], "`optaccum demo --batch-size` must be a positive int, got -4."),
    (
      ["-k", "1", "--batch-size", str(2**31)],
      "`optaccum demo --batch-size` must be at most 2**31 - 1 = 2147483647, got 2147483648.",
    ),
    (["--steps", "0"], "`optaccum demo --steps` must be a positive int, got 0."),
    (
      ["--steps", HUGE],
      f"`optaccum demo --steps` must be at most 2**31 - 1 = 2147483647, got {HUGE}.",
    ),
    (["--seed", "-1"], "`optaccum demo --seed` must be a non-negative int, got -1."),
    (
      ["--seed", str(2**63)],
      "`optaccum demo --seed` must be at most 2**63 - 1 = 9223372036854775807, "
      "got 9223372036854775808.",
    ),
    (["--out", "loss.jpg"], "`optaccum demo --out` must be a .png path, got 'loss.jpg'."),
    (["--out", ""], "`optaccum demo --out` must be a .png path, got ''."),
    (["--out"], "argument --out: expected one argument"),
  ],
)
def test_demo_refuses_a_bad_option_on_one_line(options, message, started, capsys):
  line = refusal(["demo", *options], capsys)
  assert line == f"optaccum demo: error: {message} (see `optaccum demo --help`)"
  assert started == []


@pytest.mark.parametrize(
  "budget",
  ["abc", "-5MiB", "0", "0KiB", "nan", "inf", "1e400", "9" * 400, "", "5 XB", "1.5.2MiB"],
)
@pytest.mark.parametrize("attached", [False, True], ids=["separate", "attached"])
def test_demo_refuses_a_bad_memory_budget_naming_it(budget, attached, started, capsys):
  # "-5MiB" would read as an option to argparse; the command line attaches it to
  # --memory-budget so that the message names the value.
  options = [f"--memory-budget={budget}"] if attached else ["--memory-budget", budget]
  line = refusal(["demo", *options], capsys)
  assert line == (
    "optaccum demo: error: `optaccum demo --memory-budget` must be a size such as 300KiB, "
    f"1.5MiB or 2MB (at least 1 byte), got {budget!r}. (see `optaccum demo --help`)"
  )
  assert started == []


def test_demo_refuses_k_with_a_memory_budget(started, capsys):
  line = refusal(["demo", "-k", "2", "--memory-budget", "1MiB"], capsys)
  assert "give `optaccum demo` either -k or --memory-budget, not both." in line
  assert started == []


def test_demo_takes_a_huge_memory_budget_in_its_units(started):
  assert main(["demo", "--memory-budget", "1000000TiB", "--batch-size", "8"]) == 0
  assert started[0] == ("choose_k", {"batch_size": 8, "budget": 1_000_000 * 2**40})
  assert started[1][0] == "demo" and started[1][1]["k"] == 1


@pytest.mark.parametrize("command", ["demo", "evaluate"])
def test_an_out_where_no_file_can_be_created_is_refused(command, started, capsys):
  # /proc takes no new files, not even root's (os.access says yes to root).
  line = refusal([command, "--out", "/proc/optaccum.png"], capsys)
  assert line == (
    f"optaccum {command}: error: `optaccum {command} --out` must be a path the plot can be "
    "saved to, got '/proc/optaccum.png': no file can be created in /proc (No such file or "
    f"directory). (see `optaccum {command} --help`)"
  )
  assert started == []


def test_an_out_that_is_a_directory_is_refused(tmp_path, started, capsys):
  directory = tmp_path / "plot.png"
  directory.mkdir()
  line = refusal(["evaluate", "--out", str(directory)], capsys)
  assert f"got {str(directory)!r}: it is a directory." in line
  assert started == []


def test_an_out_in_directories_that_do_not_exist_yet_is_accepted(tmp_path, started):
  # Both commands create the missing directories when they save the plot.
  out = str(tmp_path / "new" / "plots" / "evaluate.png")
  assert main(["evaluate", "--out", out]) == 0
  assert started[0][1]["out"] == out
  assert not (tmp_path / "new").exists()  # the check leaves nothing behind


def test_an_out_starting_with_a_dash_is_a_path(started):
  assert main(["demo", "--out", "-loss.png"]) == 0
  assert started[0][1]["out"] == "-loss.png"


@pytest.mark.parametrize(
  "options, message",
  [
    (
      ["-k", "-2"],
      "`optaccum evaluate -k` must be positive ints dividing --batch-size=256, got -2.",
    ),
    (["-k", "0"], "`optaccum evaluate -k` must be positive ints dividing --batch-size=256, got 0."),
    (
      ["-k", "2", "3"],
      "`optaccum evaluate -k` must be positive ints dividing --batch-size=256, got 3.",
    ),
    (
      ["-k", HUGE],
      f"`optaccum evaluate -k` must be positive ints dividing --batch-size=256, got {HUGE}.",
    ),
    (["-k"], "argument -k: expected at least one argument"),
    (["-k", "two"], "argument -k: invalid int value: 'two'"),
    (["--batch-size", "-4"], "`optaccum evaluate --batch-size` must be a positive int, got -4."),
    (
      ["--batch-size", HUGE],
      f"`optaccum evaluate --batch-size` must be at most 2**31 - 1 = 2147483647, got {HUGE}.",
    ),
    (["--windows", "0"], "`optaccum evaluate --windows` must be a positive int, got 0."),
    (
      ["--windows", HUGE],
      f"`optaccum evaluate --windows` must be at most 2**31 - 1 = 2147483647, got {HUGE}.",
    ),
    (["--rounds", "-1"], "`optaccum evaluate --rounds` must be a positive int, got -1."),
    (
      ["--rounds", HUGE],
      f"`optaccum evaluate --rounds` must be at most 2**31 - 1 = 2147483647, got {HUGE}.",
    ),
    (["--seed", "-1"], "`optaccum evaluate --seed` must be a non-negative int, got -1."),
    (
      ["--seed", HUGE],
      f"`optaccum evaluate --seed` must be at most 2**63 - 1 = 9223372036854775807, got {HUGE}.",
    ),
    (["--form", "scan"], "argument --form: invalid choice: 'scan'"),
    (["--out", "e.jpg"], "`optaccum evaluate --out` must be a .png path, got 'e.jpg'."),
  ],
)
def test_evaluate_refuses_a_bad_option_on_one_line(options, message, started, capsys):
  line = refusal(["evaluate", *options], capsys)
  assert line.startswith(f"optaccum evaluate: error: {message}")
  assert line.endswith("(see `optaccum evaluate --help`)")
  assert started == []


def test_evaluate_passes_good_options_unchanged(started):
  argv = ["evaluate", "-k", "2", "4", "--batch-size", "8", "--windows", "2", "--rounds", "1"]
  assert main([*argv, "--seed", str(2**63 - 1), "--form", "microbatch", "--out", "e.png"]) == 0
  assert started == [
    (
      "evaluate",
      dict(
        k=[2, 4],
        batch_size=8,
        windows=2,
        rounds=1,
        form="microbatch",
        seed=2**63 - 1,
        out="e.png",
      ),
    )
  ]


@pytest.mark.parametrize(
  "argv, message",
  [
    ([], "optaccum: error: the following arguments are required: COMMAND"),
    (["train"], "optaccum: error: argument COMMAND: invalid choice: 'train'"),
  ],
)
def test_a_missing_or_unknown_command_is_refused_on_one_line(argv, message, started, capsys):
  assert refusal(argv, capsys).startswith(message)
  assert started == []

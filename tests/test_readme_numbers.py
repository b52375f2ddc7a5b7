"""The numbers README.md and the guides copy from benchmarks/RESULTS.md equal it.

`python -m benchmarks` (and `python -m benchmarks.peers`, whose tables are copied
into RESULTS.md's "Peers" section) write the measurements; README.md's "How it
compares", docs/comparison.md and docs/performance.md quote them. Each quoted number
is read from its page and compared with the one in RESULTS.md it was copied or
rounded from, so that no hand-copied number drifts from the file it came from.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RESULTS = (REPO / "benchmarks" / "RESULTS.md").read_text()
README = (REPO / "README.md").read_text()
COMPARISON = (REPO / "docs" / "comparison.md").read_text()
PERFORMANCE = (REPO / "docs" / "performance.md").read_text()

# README's row labels and docs/performance.md's, with the RESULTS.md methods they quote.
README_PEERS = {
  "large batch, no accumulation": ("–", "large batch"),
  "`optaccum.microbatch`": ("8", "optaccum.microbatch"),
  "`optax.microbatching.microbatch`": ("8", "optax.microbatching.microbatch"),
  "`optaccum.apply_gradients`": ("8", "optaccum.apply_gradients"),
  "`optaccum.accumulate`": ("8", "optaccum.accumulate"),
  "`optax.MultiSteps`": ("8", "optax.MultiSteps"),
}
PERFORMANCE_METHODS = {
  "`optaccum.apply_gradients` (fast path, default)": 'optaccum.apply_gradients (default: "cond")',
  "`optaccum.accumulate` + `optax.apply_updates` (default)": (
    'optaccum.accumulate (default: "cond")'
  ),
  "`optaccum.apply_gradients(skip=optaccum.skip.not_finite)`": (
    "optaccum.apply_gradients(skip=skip_not_finite)"
  ),
  "`optaccum.microbatch` (in-step)": "optaccum.microbatch (in-step)",
  "`optax.MultiSteps`": "optax.MultiSteps",
  "`optax.chain(adamw, optax.apply_every(k))`": "optax.chain(adamw, apply_every(k))",
  "hand-written loop (Python branch, no NaN check)": "hand-written loop (Python branch)",
  "`optaccum.apply_gradients(window_guard=False)` (no protection)": (
    "optaccum.apply_gradients(window_guard=False)"
  ),
}
WHICH_TO_USE = {  # docs/performance.md's "Which to use" rows, by the start of their label
  "`optaccum.apply_gradients` (fast path": 'optaccum.apply_gradients (default: "cond")',
  "`optaccum.apply_gradients`, `window_guard=False`": (
    "optaccum.apply_gradients(window_guard=False)"
  ),
  "`optaccum.apply_gradients`, `skip=": "optaccum.apply_gradients(skip=skip_not_finite)",
  "`optaccum.accumulate` + `optax.apply_updates`": 'optaccum.accumulate (default: "cond")',
  "`optax.MultiSteps`": "optax.MultiSteps",
  "`optax.chain(adamw, optax.apply_every(k))`": "optax.chain(adamw, apply_every(k))",
  "hand-written loop": "hand-written loop (Python branch)",
}


def _section(text: str, heading: str) -> str:
  """The text under the heading that starts with `heading`, to the next heading of its level."""
  level = heading.split(" ")[0]
  start = text.index(f"\n{heading}") + 1
  end = re.search(rf"^{level} ", text[start + len(heading) :], re.M)
  return text[start : start + len(heading) + end.start()] if end else text[start:]


def _tables(text: str) -> list[list[list[str]]]:
  """Every Markdown table of `text`: its rows (the header first), each a list of cells."""
  tables, rows = [], []
  for line in text.splitlines() + [""]:
    if re.fullmatch(r"\|[-:| ]+\|", line.strip()):
      continue  # the row under the header
    if line.startswith("|"):
      rows.append([cell.strip() for cell in line.strip().strip("|").split(" | ")])
    elif rows:
      tables.append(rows)
      rows = []
  return tables


def _table(text: str, first_header_cell: str) -> list[list[str]]:
  """The first table of `text` whose header's first cell is `first_header_cell`."""
  found = [table for table in _tables(text) if table[0][0] == first_header_cell]
  assert found, f"no table's header starts with the cell {first_header_cell!r}"
  return found[0]


def _by_label(table: list[list[str]], columns: int = 1) -> dict:
  """The rows of `table` (header dropped) by their first `columns` cells."""
  return {tuple(row[:columns]) if columns > 1 else row[0]: row for row in table[1:]}


def _words(text: str) -> str:
  """`text` with every run of whitespace one space: Markdown wraps lines anywhere."""
  return " ".join(text.split())


def _ceiling(x: float) -> float:
  """`x` rounded up to one significant digit: the bound "within 6e-6" quotes for 5.6e-6."""
  scale = 10.0 ** math.floor(math.log10(x))
  return math.ceil(round(x / scale, 6)) * scale


PEERS = _section(RESULTS, "## Peers:")
PEER_TABLES = {
  "MLP": _by_label(_table(_section(PEERS, "### (a) MLP"), "k"), 2),
  "LM": _by_label(_table(_section(PEERS, "### (b) Transformer LM"), "k"), 2),
}
OPTIMIZER_ONLY = _by_label(_table(_section(RESULTS, "## (a) Optimizer-only"), "method"))
PARAMETER_HEAVY = _by_label(_table(_section(RESULTS, "## (b2) Transformer LM"), "method"))
# Columns of a peers table, and of a micro-step table.
TIME, VS_PEER, TEMP, TEMP_RATIO, DIFFERENCE = 2, 3, 4, 5, 6
MS, THROUGHPUT, VS_LIMIT = 1, 2, 3


def _peer_rows(k: str | None = None) -> list[list[str]]:
  """The rows of both peers tables other than the large batch's, at `k` (all k: None)."""
  return [
    row
    for table in PEER_TABLES.values()
    for (row_k, _), row in table.items()
    if row_k != "–" and (k is None or row_k == k)
  ]


def _x(cell: str) -> float:
  return float(cell.removesuffix("x"))


def test_the_readme_names_the_command_and_models_of_the_peers_section():
  command = re.search(r"Produced by `(python -m benchmarks\.peers [^`]*)`", PEERS)[1]
  readme = _words(_section(README, "## How it compares"))
  assert f"`{command}`" in readme
  headings = ("### (a) MLP", "### (b) Transformer LM")
  mlp, lm = (re.search(r"^(\S+) float32 params", _section(PEERS, h), re.M)[1] for h in headings)
  assert f"MLP ({mlp} parameters" in readme and f"LM ({lm} parameters" in readme


@pytest.mark.parametrize("label", README_PEERS)
def test_readme_comparison_row_equals_results(label):
  table = _table(README, "k = 8")
  assert table[0] == [
    "k = 8",
    "MLP: time per batch",
    "MLP: temporaries",
    "LM: time per batch",
    "LM: temporaries",
  ]
  row = _by_label(table)[label]
  quoted = []
  for model in ("MLP", "LM"):
    measured = PEER_TABLES[model][README_PEERS[label]]
    quoted += [measured[TIME], f"{float(measured[TEMP]):.1f} MiB"]
  assert row[1:] == quoted


def test_readme_comparison_bullets_equal_results():
  readme = _words(_section(README, "## How it compares"))
  at_8 = _peer_rows("8")
  ratios = [_x(row[TEMP_RATIO]) for row in at_8]
  assert f"Memory is where accumulation pays: {min(ratios):.2f}x to {max(ratios):.2f}x" in readme
  mlp = PEER_TABLES["MLP"]
  copy = float(mlp["8", "optax.microbatching.microbatch"][TEMP]) - float(
    mlp["8", "optaccum.microbatch"][TEMP]
  )
  assert f'(its `reshape(order="F")`: {copy:.1f} MiB more on the MLP' in readme
  more = [
    float(t["8", "optax.MultiSteps"][TEMP]) - float(t["8", "optaccum.accumulate"][TEMP])
    for t in PEER_TABLES.values()
  ]
  assert f"{min(more):.1f} to {max(more):.1f} MiB more than optaccum's" in readme
  times = [_x(row[TIME]) for row in _peer_rows()]
  assert f"({min(times):.2f}x to {max(times):.2f}x at k = 2, 4, 8)" in readme
  from_peer = max(abs(_x(row[VS_PEER]) - 1) for row in _peer_rows())
  assert f"within {round(from_peer * 100)}% of their Optax peers" in readme
  mlp_difference = max(float(row[DIFFERENCE]) for row in mlp.values())
  lm_difference = max(float(row[DIFFERENCE]) for row in PEER_TABLES["LM"].values())
  bounds = re.search(r"within (\S+) of the large batch's on the MLP and within (\S+) on", readme)
  assert (float(bounds[1]), float(bounds[2])) == pytest.approx(
    (_ceiling(mlp_difference), _ceiling(lm_difference))
  )
  slower = float(PARAMETER_HEAVY["optax.MultiSteps"][MS]) / float(
    PARAMETER_HEAVY['optaccum.apply_gradients (default: "cond")'][MS]
  )
  assert f"takes {slower:.1f}x one of `optaccum.apply_gradients`" in readme


def test_readme_behaviour_table_quotes_the_bfloat16_errors_of_results():
  behaviour = _by_label(_table(_section(PEERS, "### Behaviour"), "behaviour"))
  row = next(row for label, row in behaviour.items() if label.startswith("bfloat16 grads"))
  ours = re.match(r"(\S+), (\S+): summed in float32", row[1])
  theirs = re.match(r"`microbatching\.microbatch`: (\S+), (\S+), summed in bfloat16", row[2])
  readme = _by_label(_table(README, ""))["bfloat16 gradients summed in"]
  assert float(re.search(r"error (\S+) of the largest", readme[3])[1]) == float(theirs[2])
  assert float(re.search(r"float32: ([^,]+),", readme[4])[1]) == float(ours[2])


@pytest.mark.parametrize("model, heading", [("MLP", "(a) An activation"), ("LM", "(b) A small")])
def test_comparison_tables_equal_results(model, heading):
  text = COMPARISON[COMPARISON.index(heading) :]
  table = _table(text, "k")  # the first table after the heading
  measured = PEER_TABLES[model]
  assert len(table) - 1 == len(measured)
  for row in table[1:]:
    k, method = row[0], row[1].replace("`", "")
    expected = measured[k, method]
    assert row[2:6] == expected[2:6], (k, method)
    assert float(row[DIFFERENCE]) == float(expected[DIFFERENCE]), (k, method)


def test_comparison_behaviour_and_replica_tables_equal_results():
  assert _table(COMPARISON, "behaviour") == _table(_section(PEERS, "### Behaviour"), "behaviour")
  replicas = _table(_section(PEERS, "### Replicas"), "form")
  quoted = _table(COMPARISON, "form")
  assert [row[1] for row in quoted] == [row[1] for row in replicas]
  for ours, theirs in zip(quoted[1:], replicas[1:]):
    assert ours[0].replace("`", "").replace("parallel.per_replica", "per_replica") == theirs[0]


def test_comparison_text_quotes_the_micro_step_times_of_results():
  text = _words(COMPARISON)
  multisteps = float(PARAMETER_HEAVY["optax.MultiSteps"][MS])
  fast = float(PARAMETER_HEAVY['optaccum.apply_gradients (default: "cond")'][MS])
  assert f"takes {multisteps:.1f} ms, one of `optaccum.apply_gradients` {fast:.1f} ms" in text
  assert f"({multisteps / fast:.1f}x less on the parameter-heavy" in text


@pytest.mark.parametrize("label", PERFORMANCE_METHODS)
def test_performance_table_equals_results(label):
  row = _by_label(_table(PERFORMANCE, "time per micro-step: plain's / the method's"))[label]
  method = PERFORMANCE_METHODS[label]
  optimizer_only = OPTIMIZER_ONLY.get(method)
  heavy = PARAMETER_HEAVY[method]
  expected = [
    optimizer_only[THROUGHPUT] if optimizer_only else "–",
    optimizer_only[VS_LIMIT] if optimizer_only else "–",
    heavy[THROUGHPUT],
    heavy[VS_LIMIT],
    f"{_x(heavy[5]):.2f}x",  # temp vs plain
  ]
  assert row[1:] == expected


@pytest.mark.parametrize("label", WHICH_TO_USE)
def test_performance_which_to_use_table_equals_results(label):
  table = _table(PERFORMANCE, "")
  assert table[0][1].startswith("throughput vs training without accumulation")
  (row,) = [row for row in table[1:] if row[0].startswith(label)]
  heavy = PARAMETER_HEAVY[WHICH_TO_USE[label]]
  assert row[1].split(" ")[0] == heavy[THROUGHPUT]
  assert row[2] == f"{_x(heavy[5]):.2f}x"
  if "(the `acc + g` floor" in row[1]:
    floor = PARAMETER_HEAVY["floor: acc + g, no optimizer"][THROUGHPUT]
    assert row[1].endswith(f"(the `acc + g` floor: {floor})")


def test_performance_text_quotes_the_micro_step_times_of_results():
  text = _words(PERFORMANCE)
  ms = {name: float(row[MS]) for name, row in PARAMETER_HEAVY.items()}
  temp = {name: float(row[4]) for name, row in PARAMETER_HEAVY.items()}
  fast, transform = (
    'optaccum.apply_gradients (default: "cond")',
    'optaccum.accumulate (default: "cond")',
  )
  assert (
    f"takes {ms['optax.MultiSteps'] / ms[fast]:.1f}x one of `optaccum.apply_gradients` "
    f"({ms['optax.MultiSteps']:.1f} against {ms[fast]:.1f} ms; `optaccum.accumulate`: "
    f"{ms[transform]:.1f} ms) with {temp['optax.MultiSteps'] / temp[fast]:.1f}x its "
    f"temporaries ({temp['optax.MultiSteps']:.1f} against {temp[fast]:.1f} MiB)"
  ) in text
  skip = ms["optaccum.apply_gradients(skip=skip_not_finite)"]
  assert f"({skip:.1f} against {ms[fast]:.1f} ms per micro-step on the LM)" in text

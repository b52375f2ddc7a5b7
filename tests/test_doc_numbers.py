"""Every measured number of README.md and the guides comes from a record and equals it.

`python -m benchmarks` (and `python -m benchmarks.peers`, whose tables are copied
into RESULTS.md's "Peers" section) write the measurements to benchmarks/RESULTS.md,
which also records, below its generated tables, the other runs the guides quote,
each with its command. The first tests here read the numbers that README.md's "How
it compares", docs/comparison.md and docs/performance.md compute from RESULTS.md
(minima, differences, rounding) and recompute them. The last ones hold every page to
one rule: a block with a measured number names its source above it, and the number
is in that source, so that no hand-copied number drifts from the run it came from.
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
  """The text under the heading that starts with `heading`, to the next heading of its
  level or above."""
  level = len(heading.split(" ")[0])
  start = re.search(rf"^{re.escape(heading)}", text, re.M).start()
  body = text.index("\n", start) + 1 if "\n" in text[start:] else len(text)
  end = re.search(rf"^#{{1,{level}}} ", text[body:], re.M)
  return text[start : body + end.start()] if end else text[start:]


def _tables(text: str) -> list[list[list[str]]]:
  """Every Markdown table of `text`: its rows (the header first), each a list of cells."""
  tables, rows = [], []
  for line in text.splitlines() + [""]:
    if re.fullmatch(r"\|(?: *:?-{3,}:? *\|)+", line.strip()):
      continue  # the row under the header
    if line.strip().startswith("|"):
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


def _short(x: float, digits: int) -> str:
  """`x` in scientific notation as the pages write it: "6e-6", "6.3e-4"."""
  return f"{x:.{digits}e}".replace("e-0", "e-")


def _peer_findings() -> dict[str, float | str]:
  """What README.md and docs/comparison.md conclude from the peers tables, by name."""
  mlp, lm = PEER_TABLES["MLP"], PEER_TABLES["LM"]
  ratios = [_x(row[TEMP_RATIO]) for row in _peer_rows("8")]
  more = [
    float(t["8", "optax.MultiSteps"][TEMP]) - float(t["8", "optaccum.accumulate"][TEMP])
    for t in PEER_TABLES.values()
  ]
  times = [_x(row[TIME]) for row in _peer_rows()]
  mlp_difference = max(float(row[DIFFERENCE]) for row in mlp.values())
  lm_difference = max(float(row[DIFFERENCE]) for row in lm.values())
  return {
    "least_memory": min(ratios),
    "most_memory": max(ratios),
    "batch_copy": float(mlp["8", "optax.microbatching.microbatch"][TEMP])
    - float(mlp["8", "optaccum.microbatch"][TEMP]),
    "least_more": min(more),
    "most_more": max(more),
    "fastest": min(times),
    "slowest": max(times),
    "from_peer": round(max(abs(_x(row[VS_PEER]) - 1) for row in _peer_rows()) * 100),
    "mlp_bound": _short(_ceiling(mlp_difference), 0),
    "lm_bound": _short(_ceiling(lm_difference), 0),
    "lm_largest": _short(lm_difference, 1),
    "multisteps_slower": float(PARAMETER_HEAVY["optax.MultiSteps"][MS])
    / float(PARAMETER_HEAVY['optaccum.apply_gradients (default: "cond")'][MS]),
  }


# Each page's sentences that state the findings, with the numbers as fields.
FINDINGS = {
  "README.md": (
    _words(_section(README, "## How it compares")),
    [
      "Memory is where accumulation pays: {least_memory:.2f}x to {most_memory:.2f}x",
      '(its `reshape(order="F")`: {batch_copy:.1f} MiB more on the MLP',
      "{least_more:.1f} to {most_more:.1f} MiB more than optaccum's",
      "({fastest:.2f}x to {slowest:.2f}x at k = 2, 4, 8)",
      "within {from_peer}% of their Optax peers",
      "within {mlp_bound} of the large batch's on the MLP and within {lm_bound} on",
      "takes {multisteps_slower:.1f}x one of `optaccum.apply_gradients`",
    ],
  ),
  "docs/comparison.md": (
    _words(_section(COMPARISON, "## Measured")),
    [
      "at k = 8 every form needs {least_memory:.2f}x to {most_memory:.2f}x of the",
      "Optax's in-step form holds {batch_copy:.2f} MiB more on the MLP",
      "holds {least_more:.1f} to {most_more:.1f} MiB more than",
      "costs: {fastest:.2f}x to {slowest:.2f}x,",
      "within {from_peer}% of their Optax peers",
      "within {mlp_bound} on the MLP",
      "up to {lm_largest} for every",
    ],
  ),
}


@pytest.mark.parametrize("page", FINDINGS)
def test_the_findings_of_the_readme_and_comparison_quote_results(page):
  text, sentences = FINDINGS[page]
  for sentence in sentences:
    assert sentence.format(**_peer_findings()) in text


def test_readme_behaviour_table_quotes_the_errors_and_counts_of_results():
  behaviour = _by_label(_table(_section(PEERS, "### Behaviour"), "behaviour"))
  row = next(row for label, row in behaviour.items() if label.startswith("bfloat16 grads"))
  ours = re.match(r"(\S+), (\S+): summed in float32", row[1])
  theirs = re.match(r"`microbatching\.microbatch`: (\S+), (\S+), summed in bfloat16", row[2])
  readme = _by_label(_table(README, ""))["bfloat16 gradients summed in"]
  assert float(re.search(r"error (\S+) of the largest", readme[3])[1]) == float(theirs[2])
  largest_k = re.search(r"k = [\d, ]*?(\d+)$", row[0])[1]
  assert readme[3].endswith(f"gradient at k = {largest_k}")
  assert float(re.search(r"float32: ([^,]+),", readme[4])[1]) == float(ours[2])
  replicas = _by_label(_table(_section(PEERS, "### Replicas"), "form"))
  [counts] = [
    row[1:] for label, row in _by_label(_table(README, "")).items() if "all-reduces" in label
  ]
  deferred = replicas["optaccum.accumulate(axis_name=('data',)) + parallel.per_replica"][1]
  assert counts == [
    replicas["optax.MultiSteps"][1],
    "not run",
    replicas["optax.microbatching.microbatch"][1],
    f"{deferred} with `axis_name=` ({replicas['optaccum.accumulate'][1]} without)",
  ]


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
    assert ours[0].replace("`", "") == theirs[0]


def test_comparison_text_quotes_the_micro_step_times_of_results():
  text = _words(COMPARISON)
  multisteps = float(PARAMETER_HEAVY["optax.MultiSteps"][MS])
  fast = float(PARAMETER_HEAVY['optaccum.apply_gradients (default: "cond")'][MS])
  assert f"takes {multisteps:.1f} ms, one of `optaccum.apply_gradients` {fast:.1f} ms" in text
  assert f"({multisteps / fast:.1f}x less on the parameter-heavy" in text


def test_the_performance_tables_hold_only_the_rows_checked_below():
  quoted = _by_label(_table(PERFORMANCE, "time per micro-step: plain's / the method's"))
  assert sorted(quoted) == sorted(PERFORMANCE_METHODS)
  labels = [row[0] for row in _table(PERFORMANCE, "")[1:]]
  assert len(labels) == len(WHICH_TO_USE)
  assert all(any(label.startswith(start) for label in labels) for start in WHICH_TO_USE)


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


def test_performance_text_quotes_the_compile_times_of_results():
  compile_time = _section(RESULTS, "## Compile time")
  vs_plain = {row[0]: row[4] for row in _table(compile_time, "method")[1:]}
  floor = vs_plain["floor: hand-written acc + g, one lax.cond, no guard"]
  later = [row for row in _table(compile_time, "run")[1:] if row[0].startswith("0.2.0")]
  assert (
    f"`apply_gradients` took {vs_plain['optaccum.apply_gradients']} of plain, `accumulate` "
    f"{vs_plain['optaccum.accumulate']} and `optax.MultiSteps` {vs_plain['optax.MultiSteps']}, "
    f"against a floor of {floor} for a hand-written `acc + g` and one `lax.cond`; two later "
    f"runs of the rebuilt core gave {later[0][4]} and {later[1][4]}, {later[0][3]} and "
    f"{later[1][3]}, with the floor at {later[0][1]}."
  ) in _words(PERFORMANCE)
  assert later[0][1] == later[1][1]


# Every measured number of README.md and the guides says where it comes from. A table,
# a paragraph (or a list) or an output block that holds one is preceded by a line
#   <!-- numbers: SOURCE; SOURCE ... -->
# whose SOURCEs are
#   RESULTS.md "HEADING": that section of benchmarks/RESULTS.md, the record of the
#     commands that measured the numbers, holds them: a table's rows as rows of a record
#     table with the same header, an output's lines as they were printed, another
#     table's rows each on one line of the record, and prose's numbers as written;
#   tests/FILE.py::TEST: NUMBER, NUMBER: that test computes the numbers listed (a bound,
#     a difference, a rounding of the record), so the record need not hold them; on a
#     table with no record table of its header, the test compares the whole table;
#   not measured: WHY: arithmetic, a definition or an example, not a measurement;
#     beside another source, WHY names the numbers it covers ("28 GB = 7B x 4 bytes").
# A number in a python or bash block or in `code` is code, not a measurement.
MARKER = re.compile(r"^<!-- numbers: (?P<sources>.+) -->$")
_UNIT = r"(?:MiB|KiB|GiB|MB|GB|bytes|B|ms|µs|seconds|s)\b"
# A number, its thousands perhaps apart ("22 528", "364,812"), not inside a name
# ("float32", "ZeRO-1"), though after a range's hyphen ("1.52x-1.76x", "21-22 µs").
_NUMBER = r"(?<![\w.])(?<![A-Za-wyz]-)(?:\d{1,3}(?:[, ]\d{3})+(?!\d)|\d+)(?:\.\d+)?"
# A number with a unit, a ratio, a percentage, in scientific notation, set against one
# ("7.3 against 8.7 s", "1.1 to 1.8 MiB", "21-22 µs"), or a count of collectives.
MEASURED = re.compile(
  rf"{_NUMBER}(?:e[-+]?\d+)?(?: ?{_UNIT}|x\b|%)"
  rf"|{_NUMBER}e[-+]\d+"
  rf"|{_NUMBER}(?=(?: (?:against|to|and) |-)\d[\d,.]* ?(?:{_UNIT}|x\b))"
  # a count of collectives ("12 all-gathers")
  rf"|{_NUMBER}(?= (?:all-reduces?|all-gathers?|all-to-alls?|reduce-scatters?)\b)"
)
NUMBER = re.compile(rf"{_NUMBER}(?:e[-+]?\d+)?(?!\d)")
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


class _Block:
  """A table, a paragraph or list, or a fenced block of a page, with the marker above it."""

  def __init__(self, page: str, line: int, kind: str, text: str, marker: str | None):
    self.page, self.line, self.kind, self.text, self.marker = page, line, kind, text, marker

  def __repr__(self) -> str:
    return f"{self.page}:{self.line} ({self.kind})"

  def numbers(self) -> list[str]:
    """The measured numbers: every number of a table's body or of an output, those of
    `MEASURED` in prose; none in code."""
    if self.kind in ("python", "bash"):
      return []
    text = _code_free(self.text)
    if self.kind == "table":
      return NUMBER.findall("\n".join(text.splitlines()[1:]))
    if self.kind == "output":
      return NUMBER.findall(text)
    return MEASURED.findall(_words(text))  # a line may break inside "7.3 against 8.7 s"

  def decimals(self) -> list[str]:
    """Prose's decimals without a unit ("moved by up to 0.35"), which count in a block
    that names its source: elsewhere they are as often a version or a setting."""
    if self.kind != "paragraph" or self.marker is None:
      return []
    return DECIMAL.findall(_words(_code_free(self.text)))


def _code_free(text: str) -> str:
  """`text` without its `code`: a number in code is code, not a measurement."""
  return re.sub(r"`[^`\n]*`", "", text)


# A decimal that is no version ("0.10.2"), mantissa ("1.4e-07") or size ("8.6M").
DECIMAL = re.compile(rf"(?<![\w.])\d+\.\d+(?![\w.]*\d|e[-+]?\d|[\w%]| ?{_UNIT})")


def _as_written(number: str) -> str:
  """A number as written, but for its unit, the spaces or commas between its thousands
  and an exponent's leading zeros: "22 528 B" and "22,528" are "22528", "1.0e-02" is
  "1.0e-2"."""
  digits = re.match(r"[\d., ]+(?:e[-+]?\d+)?", number)[0].strip()
  digits = re.sub(r"[, ](?=\d{3})", "", digits)
  return re.sub(r"e([-+]?)0*(\d)", r"e\1\2", digits).replace("e+", "e")


def _written(text: str) -> set[str]:
  """Every number of `text`, as written (`_as_written`)."""
  return {_as_written(n) for n in NUMBER.findall(text)}


def blocks(page: str, text: str) -> list[_Block]:
  """The blocks of a Markdown page, each with the `<!-- numbers: -->` marker above it."""
  lines, found, marker, i = text.splitlines(), [], None, 0
  while i < len(lines):
    stripped = lines[i].strip()
    if not stripped:
      i += 1
      continue
    if found_marker := MARKER.match(stripped):
      marker = found_marker["sources"]
      i += 1
      continue
    start = i
    if stripped.startswith("```"):
      kind = stripped[3:].strip() or "output"
      i += 1
      while not lines[i].strip().startswith("```"):
        i += 1
      i += 1
    else:
      kind = "table" if stripped.startswith("|") else "paragraph"
      while (
        i < len(lines)
        and lines[i].strip()
        and lines[i].strip().startswith("|") == (kind == "table")
        and not lines[i].strip().startswith("```")
        and not MARKER.match(lines[i].strip())
      ):
        i += 1
    body = lines[start:i] if kind in ("table", "paragraph") else lines[start + 1 : i - 1]
    found.append(_Block(page, start + 1, kind, "\n".join(body), marker))
    marker = None
  return found


def results_section(heading: str) -> str:
  """The section of RESULTS.md under the one heading that starts with `heading`."""
  starts = [m.start() for m in re.finditer(rf"^{re.escape(heading)}", RESULTS, re.M)]
  assert len(starts) == 1, f"{len(starts)} headings of benchmarks/RESULTS.md start {heading!r}"
  return _section(RESULTS, heading)


def _cells(row: list[str]) -> list[str]:
  return [" ".join(cell.replace("`", "").split()) for cell in row]


def _record_rows(block: _Block, records: list[str]) -> list[list[str]] | None:
  """The rows of the record tables whose header is the block's, or None if none is."""
  header = _cells(_tables(block.text)[0][0])
  rows = [
    _cells(row)
    for record in records
    for table in _tables(record)
    if _cells(table[0]) == header
    for row in table[1:]
  ]
  return rows or None


def _measured_blocks() -> list[_Block]:
  return [
    block
    for page in PAGES
    for block in blocks(page.relative_to(REPO).as_posix(), page.read_text())
    if block.numbers()
  ]


def test_every_measured_number_of_the_readme_and_guides_names_its_source():
  unsourced = [
    f"{block}: {block.numbers()[:4]}" for block in _measured_blocks() if block.marker is None
  ]
  assert not unsourced, "no `<!-- numbers: SOURCE -->` above:\n" + "\n".join(unsourced)


def _sources(block: _Block) -> tuple[list[str], set[str], bool]:
  """What a block's marker names: the RESULTS.md sections, the numbers a test or a
  reason covers, and whether a test checks the block."""
  records, covered, tested = [], set(), False
  for source in (part.strip() for part in (block.marker or "").split(";")):
    if source.startswith("not measured: "):
      assert len(source) > len("not measured: ") + 10, f"{block}: say why: {source!r}"
      covered |= _written(source)
    elif source.startswith("tests/"):
      name, _, listed = source.partition(": ")
      path, test = name.split("::")
      code = (REPO / path).read_text()
      assert f"\ndef {test}(" in code, f"{block}: {name} names no test"
      assert block.page.rsplit("/", 1)[-1] in code, f"{block}: {path} never reads the page"
      covered |= _written(listed)
      tested = True
    else:
      heading = re.fullmatch(r'RESULTS\.md "(?P<heading>#+ [^"]+)"', source)
      assert heading, f'{block}: a source is RESULTS.md "## HEADING", tests/FILE.py::TEST '
      records.append(results_section(heading["heading"]))
  return records, covered, tested


@pytest.mark.parametrize("block", [b for b in _measured_blocks() if b.marker], ids=repr)
def test_a_block_quotes_its_numbers_from_the_source_it_names(block):
  records, covered, tested = _sources(block)
  rows = _record_rows(block, records) if block.kind == "table" else None
  if rows is not None:
    strays = [row for row in _tables(block.text)[0][1:] if _cells(row) not in rows]
    assert not strays, f"{block}: rows that no record table of its header holds: {strays}"
  elif block.kind == "output" and records:
    printed = {" ".join(line.split()) for record in records for line in record.splitlines()}
    strays = [line for line in block.text.splitlines() if " ".join(line.split()) not in printed]
    assert not strays, f"{block}: lines the RESULTS.md sections it names never printed: {strays}"
  elif block.kind == "table" and records and not tested:
    # A table in its own layout: each row's numbers (but its label's) on one line of
    # the record.
    lines = [_written(line) | covered for record in records for line in record.splitlines()]
    strays = [
      row
      for row in _tables(block.text)[0][1:]
      if not any(_written(_code_free(" | ".join(row[1:]))) <= line for line in lines)
    ]
    assert not strays, f"{block}: rows whose numbers no one line of its records holds: {strays}"
  elif (records or tested) and not (tested and block.kind == "table"):
    recorded = covered.union(*map(_written, records))
    missing = [n for n in block.numbers() + block.decimals() if _as_written(n) not in recorded]
    assert not missing, f"{block}: numbers that none of its sources holds: {missing}"


def test_the_marker_parser_finds_tables_paragraphs_and_output_blocks():
  text = (
    "Intro 3.5 MiB, 7.3 against 8.7 s.\n\n"
    "<!-- numbers: not measured: an example for this test -->\n"
    "| a | b |\n|---|---|\n| x | 1,024 |\n\n```python\nbudget = '8MiB'\n```\n\n"
    "```\nprinted 2.5x\n```\n"
  )
  found = blocks("page.md", text)
  assert [(b.kind, b.line, b.marker is not None, b.numbers()) for b in found] == [
    ("paragraph", 1, False, ["3.5 MiB", "7.3", "8.7 s"]),
    ("table", 4, True, ["1,024"]),
    ("python", 8, False, []),
    ("output", 12, False, ["2.5"]),
  ]


def test_the_measured_numbers_of_prose():
  text = (
    "91 200 B, -16.00 MiB, 1.52x-1.76x, 21-22 µs, 2.4e+00, 12288 bytes, 3 all-gathers; "
    "ZeRO-1 in float32, k = 4."
  )
  [block] = blocks("page.md", text)
  assert block.numbers() == [
    "91 200 B",
    "16.00 MiB",
    "1.52x",
    "1.76x",
    "21",
    "22 µs",
    "2.4e+00",
    "12288 bytes",
    "3",
  ]
  assert [_as_written(n) for n in block.numbers()[:2]] == ["91200", "16.00"]


@pytest.mark.parametrize(
  "marker, error",
  [
    ('RESULTS.md "## (b2) Transformer LM"', "numbers that none of its sources holds"),
    ('RESULTS.md "## No such heading"', "0 headings of benchmarks/RESULTS.md"),
    ("tests/test_doc_numbers.py::test_no_such_test", "names no test"),
    ("tests/test_docs.py::test_the_readme_starts_with_the_answer", "never reads the page"),
    ("not measured: why", "say why"),
    ('RESULTS.md "## (b2) Transformer LM"; not measured: 14 GB is 7B x 2 bytes', "99.99"),
  ],
)
def test_a_number_its_source_does_not_hold_fails(marker, error):
  block = _Block("docs/page.md", 1, "paragraph", "A micro-step took 99.99 ms.", marker)
  with pytest.raises(AssertionError, match=error):
    test_a_block_quotes_its_numbers_from_the_source_it_names(block)

"""Reads the collectives of a compiled XLA program: where they are, how often they run, bytes.

A program's text lists each collective once, even inside a loop that runs it k
times, and even inside a conditional branch that runs it only sometimes. So
each op found here carries how many times one call of the program runs it (the
product of the known trip counts of the loops around it) and whether it sits in
a conditional branch. Used by the multi-device checks, whose printed numbers
are the ones quoted in docs/distributed.md.
"""

from __future__ import annotations

import dataclasses
import math
import re

from optaccum._branching import LOOP_SCOPE

_BYTES = {
  "pred": 1,
  "s8": 1,
  "u8": 1,
  "bf16": 2,
  "f16": 2,
  "s16": 2,
  "u16": 2,
  "f32": 4,
  "s32": 4,
  "u32": 4,
  "f64": 8,
  "s64": 8,
  "u64": 8,
}
_HEADER = re.compile(r"^(ENTRY )?%([\w.\-]+) .*\{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%[\w.\-]+ = (.*?) ([a-z][a-z\-]*)\(")
_ARRAY = re.compile(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]")
_LOOP_CALLS = re.compile(r"\b(?:body|condition)=%([\w.\-]+)")
_BRANCH_CALLS = re.compile(
  r"\b(?:true_computation|false_computation)=%([\w.\-]+)|branch_computations=\{([^}]*)\}"
)
_PLAIN_CALLS = re.compile(r"\b(?:calls|to_apply)=%([\w.\-]+)|called_computations=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective op of a compiled program.

  Attributes:
    op: the opcode, e.g. "all-reduce" (an async "-start" counts as its op).
    executions: times one call of the program runs it: the product of the
      trip counts of the loops around it; None where a loop's count is unknown.
    conditional: whether it sits in a branch of a conditional, so that a call
      runs it only when that branch is taken.
    bytes: the size of its result, which for an all-reduce is its operands.
  """

  op: str
  executions: int | None
  conditional: bool
  bytes: int


def _array_bytes(shape_text: str) -> int:
  total = 0
  for dtype, dims in _ARRAY.findall(shape_text):
    if dtype in _BYTES:
      total += _BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
  return total


def _names(match: re.Match) -> list[str]:
  single, listed = match.groups()
  if single:
    return [single]
  return [name.strip().lstrip("%") for name in listed.split(",") if name.strip()]


def collectives(hlo_text: str, ops: tuple[str, ...] = ("all-reduce",)) -> list[Collective]:
  """The collectives named in `ops` in a compiled program's `as_text()`."""
  computations: dict[str, list[str]] = {}
  entry, current = None, None
  for line in hlo_text.splitlines():
    header = _HEADER.match(line)
    if header:
      current = header.group(2)
      computations[current] = []
      if header.group(1):
        entry = current
    elif line.startswith("}"):
      current = None
    elif current is not None:
      computations[current].append(line)
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")

  found: list[Collective] = []

  def visit(name: str, executions: int | None, conditional: bool) -> None:
    for line in computations.get(name, ()):
      instruction = _INSTRUCTION.match(line)
      if instruction:
        shape, opcode = instruction.groups()
        base = opcode.removesuffix("-start")
        if base in ops and not opcode.endswith("-done"):
          found.append(Collective(base, executions, conditional, _array_bytes(shape)))
      for callee in _LOOP_CALLS.findall(line):
        if LOOP_SCOPE in line:
          # optaccum's run_if: a while loop of zero or one trips is a branch.
          visit(callee, executions, True)
          continue
        trip = _TRIP_COUNT.search(line)
        times = None if trip is None or executions is None else executions * int(trip.group(1))
        visit(callee, times, conditional)
      for match in _BRANCH_CALLS.finditer(line):
        for callee in _names(match):
          visit(callee, executions, True)
      for match in _PLAIN_CALLS.finditer(line):
        for callee in _names(match):
          visit(callee, executions, conditional)

  visit(entry, 1, False)
  return found


def summary(hlo_text: str, op: str = "all-reduce") -> dict[str, int | None]:
  """Counts of `op`: in the program text, run per call (outside and inside branches), bytes.

  `executed` and `executed_bytes` cover the ops a call always runs;
  `in_branches` and `in_branches_bytes` those in conditional branches (run
  only on calls that take their branch).
  """
  found = collectives(hlo_text, (op,))
  always = [c for c in found if not c.conditional]
  branches = [c for c in found if c.conditional]

  def runs(group: list[Collective]) -> int | None:
    if any(c.executions is None for c in group):
      return None
    return sum(c.executions for c in group)

  def run_bytes(group: list[Collective]) -> int | None:
    if any(c.executions is None for c in group):
      return None
    return sum(c.executions * c.bytes for c in group)

  return {
    "in_program": len(found),
    "executed": runs(always),
    "executed_bytes": run_bytes(always),
    "in_branches": runs(branches),
    "in_branches_bytes": run_bytes(branches),
  }

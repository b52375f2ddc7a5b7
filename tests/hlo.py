"""Reads the collectives of a compiled XLA program: where they are, how often they run, bytes.

A program's text lists each collective once, even inside a loop that runs it k
times, and even inside a conditional branch that runs it only sometimes. So
each op found here carries how many times one call of the program runs it (the
product of the known trip counts of the loops around it) and whether it sits in
a conditional branch. A while loop whose trip count XLA does not know (such as
the zero-or-one-trip loop of `strategy="loop"`) makes the count unknown (None):
only the program's structure is read, never a name the library sets. Each op
also carries its device groups, so a check can tell which mesh axes it
communicates over. Used by the multi-device checks, whose printed numbers are
the ones quoted in docs/distributed.md.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

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
_LIST_GROUPS = re.compile(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}")
_IOTA_GROUPS = re.compile(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?")
_MESH_GROUPS = re.compile(
  r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\(\[([\d,]+)\](?:T\(([\d,]+)\))?\))?"
  r" \{([^}]*)\}"
)


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
    groups: the sets of devices (logical ids: positions in the mesh's device
      array, flattened) that communicate; None where the text gives none.
    op_name: its op_name metadata, the named scopes it was traced in.
  """

  op: str
  executions: int | None
  conditional: bool
  bytes: int
  groups: tuple[frozenset[int], ...] | None = None
  op_name: str = ""  # its metadata: the named scopes it was traced in

  def spans(self, mesh_shape: tuple[int, ...], axis: int) -> bool:
    """Whether some group holds devices at different positions along mesh axis `axis`.

    None groups (all devices in one group) span every axis of size above 1.
    """
    if self.groups is None:
      return mesh_shape[axis] > 1
    for group in self.groups:
      coordinates = {np.unravel_index(d, mesh_shape)[axis] for d in group}
      if len(coordinates) > 1:
        return True
    return False


def _iota(dims: str, perm: str | None) -> np.ndarray:
  ids = np.arange(math.prod(int(d) for d in dims.split(","))).reshape(
    [int(d) for d in dims.split(",")]
  )
  if perm:
    ids = ids.transpose([int(p) for p in perm.split(",")])
  return ids.ravel()


def _groups(line: str) -> tuple[frozenset[int], ...] | None:
  """The device groups of a collective's line, in any of XLA's three spellings."""
  listed = _LIST_GROUPS.search(line)
  if listed:
    found = re.findall(r"\{([\d,]*)\}", listed.group(1))
    groups = tuple(frozenset(int(d) for d in g.split(",") if d) for g in found)
    return groups if any(groups) else None
  iota = _IOTA_GROUPS.search(line)
  if iota:
    count, size, dims, perm = iota.groups()
    ids = _iota(dims, perm).reshape(int(count), int(size))
    return tuple(frozenset(int(d) for d in row) for row in ids)
  mesh = _MESH_GROUPS.search(line)
  if mesh:
    axes_text, dims, perm, over = mesh.groups()
    names = re.findall(r"'(\w+)'=(\d+)", axes_text)
    sizes = [int(n) for _, n in names]
    ids = (_iota(dims, perm) if dims else np.arange(math.prod(sizes))).reshape(sizes)
    reduced = [i for i, (name, _) in enumerate(names) if f"'{name}'" in over]
    kept = [i for i in range(len(sizes)) if i not in reduced]
    grouped = ids.transpose(kept + reduced).reshape(-1, math.prod(sizes[i] for i in reduced))
    return tuple(frozenset(int(d) for d in row) for row in grouped)
  return None


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


def _op_name(line: str) -> str:
  found = re.search(r'op_name="([^"]*)"', line)
  return found.group(1) if found else ""


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
          found.append(
            Collective(
              base, executions, conditional, _array_bytes(shape), _groups(line), _op_name(line)
            )
          )
      for callee in _LOOP_CALLS.findall(line):
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

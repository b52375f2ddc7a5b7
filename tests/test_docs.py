"""Every ```python block of README.md and docs/*.md runs as written, on its own.

Each block runs as `__main__` in a namespace of its own, from the repository root,
with warnings as errors and JAX on the CPU; a document's blocks share one fresh
interpreter (`tests/interpreter.py`), a block that sets `XLA_FLAGS` or the JAX
configuration gets one of its own. Standard dtype promotion, as a reader would run it:
optax 0.2.8's Adam family itself fails strict promotion. A block that needs
several devices asks for them itself (`XLA_FLAGS`, before it imports jax).
"""

import concurrent.futures
import re
from pathlib import Path

import pytest

from tests import interpreter

REPO = Path(__file__).resolve().parent.parent
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# A fence may be indented, as in a list item; its block is indented as much.
FENCE = re.compile(r"^(?P<indent> *)```python\n(?P<code>.*?)^(?P=indent)```$", re.M | re.S)
# Two at a time: the machine the suite targets has two cores.
PARALLEL = 2
TIMEOUT_SECONDS = 120


def _blocks() -> list:
  """One `pytest.param(code, id="FILE:LINE")` per python block, LINE its fence's line."""
  blocks = []
  for document in DOCUMENTS:
    text = document.read_text()
    for match in FENCE.finditer(text):
      indent = len(match["indent"])
      code = "".join(line[indent:] for line in match["code"].splitlines(keepends=True))
      line = text.count("\n", 0, match.start()) + 1
      blocks.append(pytest.param(code, id=f"{document.relative_to(REPO)}:{line}"))
  return blocks


BLOCKS = _blocks()


def _groups(selected: dict[str, str]) -> list[list[tuple[str, str, str]]]:
  """The blocks to run, one interpreter per group: a document's blocks share one.

  A block that changes the process (XLA_FLAGS, the JAX configuration) gets an
  interpreter of its own.
  """
  groups: dict[str, list[tuple[str, str, str]]] = {}
  for block_id, code in selected.items():
    key = block_id if interpreter.needs_own_process(code) else block_id.split(":")[0]
    groups.setdefault(key, []).append((block_id, code, ""))
  return list(groups.values())


@pytest.fixture(scope="module")
def runs(request):
  """The run of each selected block, by id, its groups started in the background a few at a time."""
  selected = {
    item.callspec.id: item.callspec.params["code"]
    for item in request.session.items
    if getattr(item, "originalname", None) == "test_python_block_runs"
  }

  def run(group):
    return interpreter.run_scripts(group, cwd=REPO, timeout=TIMEOUT_SECONDS * len(group))

  with concurrent.futures.ThreadPoolExecutor(PARALLEL) as pool:
    futures = [pool.submit(run, group) for group in _groups(selected)]
    yield {block_id: result for future in futures for block_id, result in future.result().items()}


def test_every_python_fence_is_found():
  # A fence the pattern misses (unclosed, or closed at another indent) would go unrun.
  fences = sum(document.read_text().count("```python") for document in DOCUMENTS)
  assert len(BLOCKS) == fences > 0


@pytest.mark.parametrize("code", BLOCKS)
def test_python_block_runs(code, runs, request):
  block_id = request.node.callspec.id
  result = runs[block_id]
  assert not isinstance(result, str), f"the block at {block_id} {result}"
  exit_code = result.returncode
  assert exit_code == 0, (
    f"the block at {block_id} exited with {exit_code}:\n{result.stderr[-4000:]}"
  )

"""Every ```python block of README.md runs as written, on its own.

Each block runs as `__main__` in a namespace of its own, from the repository root,
with warnings as errors and JAX on the CPU; the README's blocks share one fresh
interpreter (`tests/interpreter.py`), a block that sets `XLA_FLAGS` or the JAX
configuration gets one of its own. Standard dtype promotion, as a reader would run it:
optax 0.2.8's Adam family itself fails strict promotion. A block that needs
several devices asks for them itself (`XLA_FLAGS`, before it imports jax).

The guides' blocks (docs/*.md) run the same way when the site builds
(`mkdocs build --strict`, hook `docs/hooks/execute.py`, in CI after the tests); here
only their fences are parsed, so that none goes unrun.
"""

import re
from pathlib import Path

import pytest

from tests import interpreter

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
GUIDES = sorted((REPO / "docs").glob("*.md"))
TIMEOUT_SECONDS = 120


def _blocks() -> list:
  """One `pytest.param(code, id="README.md:LINE")` per python block, LINE its fence's line."""
  return [
    pytest.param(block.code, id=f"README.md:{block.line}")
    for block in interpreter.python_blocks(README.read_text())
  ]


BLOCKS = _blocks()


@pytest.fixture(scope="module")
def runs(request):
  """The run of each selected block, by id (`interpreter.run_blocks`)."""
  selected = {
    item.callspec.id: item.callspec.params["code"]
    for item in request.session.items
    if getattr(item, "originalname", None) == "test_python_block_runs"
  }
  return interpreter.run_blocks(selected, cwd=REPO, timeout_per_block=TIMEOUT_SECONDS)


@pytest.mark.parametrize("document", [README, *GUIDES], ids=lambda path: path.name)
def test_every_python_fence_is_found(document):
  # A fence the pattern misses (unclosed, or closed at another indent) would go unrun,
  # here for README.md and by the site's build for a guide.
  text = document.read_text()
  assert len(interpreter.python_blocks(text)) == text.count("```python")


def test_the_readme_and_the_guides_hold_python_blocks():
  assert BLOCKS
  assert sum(len(interpreter.python_blocks(guide.read_text())) for guide in GUIDES) > 0


def test_an_indented_fence_is_found_and_dedented():
  text = "1. A step:\n\n   ```python\n   x = 1\n     y = 2\n   ```\n\n```python\nz = 3\n```\n"
  assert interpreter.python_blocks(text) == [
    interpreter.Block(3, "x = 1\n  y = 2\n"),
    interpreter.Block(8, "z = 3\n"),
  ]


@pytest.mark.parametrize("code", BLOCKS)
def test_python_block_runs(code, runs, request):
  block_id = request.node.callspec.id
  result = runs[block_id]
  assert not isinstance(result, str), f"the block at {block_id} {result}"
  exit_code = result.returncode
  assert exit_code == 0, (
    f"the block at {block_id} exited with {exit_code}:\n{result.stderr[-4000:]}"
  )


def test_the_readme_starts_with_the_answer():
  # Within its first 60 lines: the two set-up commands (the demo; the tests), the three
  # names a newcomer needs, and a whole runnable example, its closing fence included.
  head = "\n".join(README.read_text().splitlines()[:60]) + "\n"
  commands = re.search(r"```bash\n(.*?)```", head, re.S)
  assert commands, "no set-up block in README.md's first 60 lines"
  demo, tests = [line for line in commands[1].splitlines() if line and not line.startswith("#")]
  assert "pip install" in demo and demo.endswith("optaccum demo")
  assert "pip install" in tests and tests.endswith("-m pytest -q")
  for name in ("optaccum.accumulate(", "optaccum.apply_gradients(", "optaccum.microbatch("):
    assert f"`{name}" in head, name
  [example] = interpreter.python_blocks(head)
  # A whole example: it builds the transformation, trains with it, and checks the result.
  for part in ("optaccum.accumulate(", "tx.update(", "assert "):
    assert part in example.code, part

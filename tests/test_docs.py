"""Every ```python block of README.md and docs/*.md runs as written, on its own.

Each block runs in a fresh `python -c` from the repository root, with warnings as
errors and JAX on the CPU. Standard dtype promotion, as a reader would run it:
optax 0.2.8's Adam family itself fails strict promotion. A block that needs
several devices asks for them itself (`XLA_FLAGS`, before it imports jax).
"""

import concurrent.futures
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

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


def _run(code: str) -> subprocess.CompletedProcess | str:
  """Runs `code` in a fresh interpreter; the process, or why it did not finish.

  The block runs in a process group of its own, so that a timeout also ends any
  process it started.
  """
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONWARNINGS="error")
  env.pop("XLA_FLAGS", None)
  args = [sys.executable, "-c", code]
  with subprocess.Popen(
    args,
    cwd=REPO,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    start_new_session=True,
  ) as process:
    try:
      stdout, stderr = process.communicate(timeout=TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
      os.killpg(process.pid, signal.SIGKILL)
      process.communicate()
      return f"did not finish in {TIMEOUT_SECONDS} s"
  return subprocess.CompletedProcess(args, process.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def runs(request):
  """The run of each selected block, by id, started in the background a few at a time."""
  selected = {
    item.callspec.id: item.callspec.params["code"]
    for item in request.session.items
    if getattr(item, "originalname", None) == "test_python_block_runs"
  }
  with concurrent.futures.ThreadPoolExecutor(PARALLEL) as pool:
    yield {block_id: pool.submit(_run, code) for block_id, code in selected.items()}


def test_every_python_fence_is_found():
  # A fence the pattern misses (unclosed, or closed at another indent) would go unrun.
  fences = sum(document.read_text().count("```python") for document in DOCUMENTS)
  assert len(BLOCKS) == fences > 0


@pytest.mark.parametrize("code", BLOCKS)
def test_python_block_runs(code, runs, request):
  block_id = request.node.callspec.id
  result = runs[block_id].result()
  assert not isinstance(result, str), f"the block at {block_id} {result}"
  exit_code = result.returncode
  assert exit_code == 0, (
    f"the block at {block_id} exited with {exit_code}:\n{result.stderr[-4000:]}"
  )

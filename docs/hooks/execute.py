"""MkDocs hook: every ```python block of every page runs when the site builds.

The blocks run as the tests run README.md's (`tests/interpreter.py`): each as
`__main__` in a namespace of its own, from the repository root, with warnings as
errors and JAX on the CPU; a page's blocks share one fresh interpreter, and a block
that sets `XLA_FLAGS` or the JAX configuration gets one of its own. A block that
fails fails the build, naming the page, the block's number and line, and its error.

Under `mkdocs serve` a page runs again only when its text changed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import sys
import time
from pathlib import Path
from types import ModuleType

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import Files

REPO = Path(__file__).resolve().parents[2]
# Per block; the slowest guide block takes about 20 s on two loaded cores.
TIMEOUT_SECONDS = 120
# The machines that build the site have two cores.
PARALLEL = 2

log = logging.getLogger(f"mkdocs.hooks.{__name__}")
# Hashes of the page texts whose blocks all ran in this process (`mkdocs serve`).
_passed: set[str] = set()


def _interpreter() -> ModuleType:
  """`tests/interpreter.py`, loaded by its path: the hook runs outside the tests."""
  name = "_optaccum_docs_interpreter"
  if name not in sys.modules:
    spec = importlib.util.spec_from_file_location(name, REPO / "tests" / "interpreter.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
  return sys.modules[name]


def _digest(text: str) -> str:
  return hashlib.sha256(text.encode()).hexdigest()


def on_files(files: Files, config: MkDocsConfig) -> Files:
  """Runs the python blocks of every documentation page, before any page renders."""
  pages = {}
  for file in files.documentation_pages():
    text = file.content_string
    if _digest(text) not in _passed:
      path = Path(config.docs_dir, file.src_uri)
      pages[path.relative_to(REPO).as_posix() if path.is_relative_to(REPO) else str(path)] = text
  start = time.monotonic()
  failures = _interpreter().check_documents(
    pages, cwd=REPO, timeout_per_block=TIMEOUT_SECONDS, parallel=PARALLEL
  )
  _passed.update(_digest(pages[page]) for page, failed in failures.items() if not failed)
  failed = [failure for page_failures in failures.values() for failure in page_failures]
  if failed:
    raise PluginError(f"python blocks failed ({len(failed)}):\n\n" + "\n\n".join(failed))
  log.info(f"ran the python blocks of {len(pages)} pages in {time.monotonic() - start:.0f} s")
  return files

"""The documentation site: a reference entry for every public name, and guides whose
blocks run when it builds (`mkdocs build --strict` in CI; mkdocs.yml, docs/hooks/).

A public name added without its `::: optaccum...` entry in docs/reference/ fails here;
an entry for a name that is not public (or no longer exists) fails too.
"""

import importlib
import re
import types
from pathlib import Path

import pytest
import yaml

import optaccum
from tests import interpreter

REPO = Path(__file__).resolve().parent.parent
REFERENCE = REPO / "docs" / "reference"
NAMESPACES = ["skip", "flax", "parallel", "checkpoint", "planning", "compat"]
# `::: identifier` at the start of a line: one mkdocstrings entry.
ENTRY = re.compile(r"^::: *(\S+) *$", re.M)


def _entries() -> list[tuple[str, str]]:
  """Every `(page, identifier)` of the reference pages, in order."""
  return [
    (page.name, identifier)
    for page in sorted(REFERENCE.glob("*.md"))
    for identifier in ENTRY.findall(page.read_text())
  ]


def _public_names() -> list[str]:
  """`optaccum.NAME` for each name of `optaccum.__all__`, `optaccum.NS.NAME` for each
  name of a sub-namespace's `__all__`."""
  names = [f"optaccum.{name}" for name in optaccum.__all__]
  for namespace in NAMESPACES:
    module = importlib.import_module(f"optaccum.{namespace}")
    names += [f"optaccum.{namespace}.{name}" for name in module.__all__]
  return names


def _config() -> dict:
  return yaml.safe_load((REPO / "mkdocs.yml").read_text())


def _nav_pages(nav) -> list[str]:
  """The page paths a nav names, depth first."""
  if isinstance(nav, str):
    return [nav]
  if isinstance(nav, dict):
    return [page for value in nav.values() for page in _nav_pages(value)]
  return [page for item in nav for page in _nav_pages(item)]


def test_the_namespaces_are_the_top_levels_modules():
  modules = [
    name for name in optaccum.__all__ if isinstance(getattr(optaccum, name), types.ModuleType)
  ]
  assert sorted(modules) == sorted(NAMESPACES)


@pytest.mark.parametrize("name", _public_names())
def test_every_public_name_has_exactly_one_reference_entry(name):
  pages = [page for page, identifier in _entries() if identifier == name]
  assert len(pages) == 1, f"{name} has {len(pages)} `::: {name}` entries in docs/reference/"


def test_every_reference_entry_is_public_and_on_its_namespaces_page():
  public = set(_public_names())
  entries = _entries()
  assert entries
  for page, identifier in entries:
    assert identifier == "optaccum" or identifier in public, (
      f"docs/reference/{page} documents {identifier}, which is not in an `__all__`"
    )
    parts = identifier.split(".")
    namespace = parts[1] if len(parts) > 1 and parts[1] in NAMESPACES else None
    expected = f"{namespace}.md" if namespace else "index.md"
    assert page == expected, f"{identifier} belongs on docs/reference/{expected}, not {page}"


def test_the_nav_names_every_page_and_every_reference_page():
  config = _config()
  pages = _nav_pages(config["nav"])
  assert len(pages) == len(set(pages))
  reference = sorted(f"reference/{page.name}" for page in REFERENCE.glob("*.md"))
  assert reference == sorted(["reference/index.md", *(f"reference/{n}.md" for n in NAMESPACES)])
  assert sorted(page for page in pages if page.startswith("reference/")) == reference
  assert "index.md" in pages


def test_the_site_build_runs_the_guides_blocks_and_fails_on_warnings():
  config = _config()
  assert config["hooks"] == ["docs/hooks/execute.py"]
  assert "hooks/" in config["exclude_docs"].split()
  assert config["strict"] is True
  assert config["validation"]["links"]["not_found"] == "warn"


def test_a_failing_block_is_named_by_document_block_number_and_line_with_its_error(tmp_path):
  text = (
    "# Page\n\n```python\nprint('first')\n```\n\nText.\n\n"
    "```python\nimport sys\n\nraise ValueError('the second block fails')\n```\n"
  )
  failures = interpreter.check_documents(
    {"docs/page.md": text, "docs/fine.md": "```python\nx = 1\n```\n"},
    cwd=tmp_path,
    timeout_per_block=60,
  )
  assert failures["docs/fine.md"] == []
  [failure] = failures["docs/page.md"]
  assert failure.startswith("docs/page.md, block 2 (line 9) exited with 1:\n")
  assert "ValueError: the second block fails" in failure


def test_a_block_that_changes_the_process_runs_in_an_interpreter_of_its_own(tmp_path):
  text = (
    "```python\nimport os\n\nos.environ['OPTACCUM_SITE_MARK'] = '1'\n```\n\n"
    "```python\nimport os\n\nassert os.getenv('OPTACCUM_SITE_MARK') is None, 'leaked'\n```\n"
  )
  failures = interpreter.check_documents({"docs/page.md": text}, cwd=tmp_path, timeout_per_block=60)
  assert failures == {"docs/page.md": []}

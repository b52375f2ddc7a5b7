"""Signatures name what they take: few parameters of the package are typed `Any`."""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "optaccum"

# optax 6%, Equinox 4%, Optimistix 7%, Flax NNX 14% (see STYLE.md).
MAX_ANY_SHARE = 0.15


def _is_any(annotation: ast.expr | None) -> bool:
  """Whether an annotation says nothing: missing, `Any`, or a union or Optional with `Any` in it.

  Reads the annotation's text, so an alias to `Any` (`PyTree`) counts as a name;
  `Callable[..., Any]` or `dict[str, Any]` name their outer type and count as named too.
  """
  if annotation is None:
    return True
  if isinstance(annotation, ast.Constant) and isinstance(annotation.value, str):
    return _is_any(ast.parse(annotation.value, mode="eval").body)
  if isinstance(annotation, ast.Name):
    return annotation.id == "Any"
  if isinstance(annotation, ast.Attribute):
    return annotation.attr == "Any"
  if isinstance(annotation, ast.BinOp) and isinstance(annotation.op, ast.BitOr):
    return _is_any(annotation.left) or _is_any(annotation.right)
  if isinstance(annotation, ast.Subscript):
    outer = annotation.value
    name = outer.id if isinstance(outer, ast.Name) else getattr(outer, "attr", "")
    if name in ("Optional", "Union"):
      members = annotation.slice
      elements = members.elts if isinstance(members, ast.Tuple) else [members]
      return any(_is_any(element) for element in elements)
  return False


def _parameters(function: ast.FunctionDef | ast.AsyncFunctionDef) -> list[ast.arg]:
  """Every parameter a caller passes to `function`, `*args` and `**kwargs` too; not self/cls."""
  arguments = function.args
  every = [
    *arguments.posonlyargs,
    *arguments.args,
    *arguments.kwonlyargs,
    *([arguments.vararg] if arguments.vararg else []),
    *([arguments.kwarg] if arguments.kwarg else []),
  ]
  return [argument for argument in every if argument.arg not in ("self", "cls")]


def count_any(source: str) -> tuple[int, int]:
  """Returns (parameters typed `Any` or not at all, parameters) over every def in `source`.

  Nested functions count; lambdas, which cannot be annotated, do not.
  """
  typed_any = total = 0
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
      for parameter in _parameters(node):
        total += 1
        typed_any += _is_any(parameter.annotation)
  return typed_any, total


@pytest.mark.parametrize(
  ("signature", "is_any"),
  [
    ("x: Any", True),
    ("x: typing.Any", True),
    ("x: Any | None", True),
    ("x: None | Any", True),
    ("x: Optional[Any]", True),
    ("x: Union[int, Any]", True),
    ("x: 'Any'", True),
    ("x", True),
    ("*args", True),
    ("**kwargs: Any", True),
    ("x: PyTree", False),
    ("x: object", False),
    ("x: Callable[..., Any]", False),
    ("x: dict[str, Any]", False),
    ("x: int | None", False),
    ("**kwargs: object", False),
  ],
)
def test_annotation_counts_as_any_by_its_text(signature, is_any):
  assert count_any(f"def f({signature}): pass") == (int(is_any), 1)


def test_self_and_cls_are_not_parameters():
  source = "class A:\n  def f(self, x: int): pass\n  @classmethod\n  def g(cls): pass"
  assert count_any(source) == (0, 1)


def test_at_most_15_percent_of_parameters_are_any():
  counts = {path.name: count_any(path.read_text()) for path in sorted(PACKAGE.glob("*.py"))}
  typed_any = sum(any_count for any_count, _ in counts.values())
  total = sum(total for _, total in counts.values())
  share = typed_any / total
  table = "\n".join(
    f"  {name:<20} {any_count:>4} / {count:<4}"
    for name, (any_count, count) in sorted(counts.items(), key=lambda item: -item[1][0])
  )
  assert share <= MAX_ANY_SHARE, (
    f"{typed_any} of {total} parameters ({share:.1%}) are typed Any or not at all; "
    f"at most {MAX_ANY_SHARE:.0%} may be. Any / parameters per file:\n{table}"
  )

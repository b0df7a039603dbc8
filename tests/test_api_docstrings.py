"""The API reference is generated from the docstrings: every public name has a readable one.

For every name in `fpsolve.__all__` (and the public methods and properties of the classes
among them): a one-line summary; for callables that take arguments, an `Args:` section (for
classes, the constructor's arguments); an `Example:` section whose ```python block runs, as
shown, in a fresh namespace holding only `torch` and `fpsolve`.
"""
from __future__ import annotations

import enum
import inspect
import re
import textwrap
from typing import Any, Iterator, List, Tuple

import pytest
import torch

import fpsolve

FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _own_members(cls: type) -> Iterator[Tuple[str, Any]]:
    """The public methods and properties that `cls` itself defines (not inherited ones)."""
    for name, value in vars(cls).items():
        if name.startswith("_") or name == "extra_repr":
            continue
        if isinstance(value, (property, staticmethod, classmethod)) or inspect.isfunction(value):
            yield f"{cls.__name__}.{name}", getattr(cls, name)


def _documented() -> List[Tuple[str, Any]]:
    """Every public name and, for classes, their own public methods/properties."""
    out = []
    for name in fpsolve.__all__:
        obj = getattr(fpsolve, name)
        out.append((name, obj))
        if inspect.isclass(obj):
            out.extend(_own_members(obj))
    return out


DOCUMENTED = _documented()
IDS = [n for n, _ in DOCUMENTED]


def _doc(obj: Any) -> str:
    """The object's own docstring, dedented (no inherited one: `inspect.getdoc` would give a
    class's base docstring to an undocumented subclass)."""
    raw = obj.fget.__doc__ if isinstance(obj, property) else getattr(obj, "__doc__", None)
    return inspect.cleandoc(raw or "")


def _takes_arguments(obj: Any) -> bool:
    """Whether the callable (a class: its constructor) takes arguments beyond self/cls."""
    if isinstance(obj, property) or (inspect.isclass(obj) and issubclass(obj, BaseException)):
        return False
    if inspect.isclass(obj) and (issubclass(obj, tuple) or isinstance(obj, enum.EnumMeta)):
        return False   # NamedTuple fields and enum members are documented in prose or Attributes
    if inspect.isclass(obj) and getattr(obj, "_is_protocol", False):
        return False
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return False
    return any(p not in ("self", "cls") for p in params)


def _section(doc: str, title: str) -> str:
    """The body of a Google-style section (`Title:` on its own line), dedented; '' if absent."""
    m = re.search(rf"^{title}:\n((?:[ \t]+.*\n|\n)+)", doc + "\n", re.M)
    return textwrap.dedent(m.group(1)) if m else ""


def _example_code(doc: str) -> str:
    """The code of the first ```python block in the docstring's Example: section ('' if none)."""
    block = FENCE.search(_section(doc, "Example"))
    return block.group(1) if block else ""


@pytest.mark.parametrize("name, obj", DOCUMENTED, ids=IDS)
def test_a_summary_line(name: str, obj: Any) -> None:
    doc = _doc(obj)
    assert doc, f"{name} has no docstring"
    lines = doc.splitlines()
    assert lines[0].strip() and len(lines[0]) <= 120, f"{name}: the first line should be a short summary"
    assert len(lines) == 1 or not lines[1].strip(), \
        f"{name}: the summary should be one line, followed by a blank line"


@pytest.mark.parametrize("name, obj", [(n, o) for n, o in DOCUMENTED if "." not in n],
                         ids=[n for n in IDS if "." not in n])
def test_args_and_example_sections(name: str, obj: Any) -> None:
    doc = _doc(obj)
    if _takes_arguments(obj):
        # A result type that users read but do not build (Solution, Report) lists its fields
        # under Attributes: instead.
        documented = _section(doc, "Args") or (inspect.isclass(obj) and _section(doc, "Attributes"))
        assert documented, f"{name} takes arguments but its docstring has no Args: section"
    assert _example_code(doc), f"{name}: no Example: section with a ```python block"


@pytest.mark.parametrize("name, obj", [(n, o) for n, o in DOCUMENTED if "." in n],
                         ids=[n for n in IDS if "." in n])
def test_methods_document_their_arguments(name: str, obj: Any) -> None:
    doc = _doc(obj)
    if _takes_arguments(obj):
        assert _section(doc, "Args"), f"{name} takes arguments but its docstring has no Args: section"
    assert _section(doc, "Returns") or _example_code(doc), \
        f"{name}: say what it returns (Returns:) or show it (Example:)"


EXAMPLES = [(n, o) for n, o in DOCUMENTED if _example_code(_doc(o))]


@pytest.mark.parametrize("name, obj", EXAMPLES, ids=[n for n, _ in EXAMPLES])
def test_the_example_runs(name: str, obj: Any) -> None:
    code = _example_code(_doc(obj))
    torch.manual_seed(0)
    namespace = {"torch": torch, "fpsolve": fpsolve, "__name__": f"example:{name}"}
    exec(compile(code, f"<{name} Example>", "exec"), namespace)


def test_the_checks_catch_a_missing_section() -> None:
    """The section finder does not mistake prose for a section, nor miss an indented block."""
    doc = "Summary.\n\nArgs: in prose.\n\nExample:\n    ```python\n    y = 1\n    ```\n"
    assert _section(doc, "Args") == ""
    assert _example_code(doc) == "y = 1\n"
    assert not _takes_arguments(fpsolve.Status)
    assert _takes_arguments(fpsolve.solve)
    with pytest.raises(ZeroDivisionError):
        exec(compile(_example_code("S.\n\nExample:\n    ```python\n    1 / 0\n    ```\n"), "<t>", "exec"), {})


@pytest.mark.parametrize("name", [n for n in fpsolve.__all__ if callable(getattr(fpsolve, n))
                                  and not (isinstance(getattr(fpsolve, n), type)
                                           and issubclass(getattr(fpsolve, n), (BaseException, enum.Enum)))])
def test_every_parameter_is_documented(name):
    """Every parameter of a public function or constructor has its entry under Args."""
    obj = getattr(fpsolve, name)
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        pytest.skip(f"{name} has no inspectable signature")
    doc = inspect.getdoc(obj) or ""
    missing = [p for p in sig.parameters if p not in ("self", "options", "args", "kwargs")
               and f"{p}:" not in doc and f"{p} (" not in doc]
    assert not missing, f"{name}: parameters not documented: {missing}"

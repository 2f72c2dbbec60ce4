"""Fail on a module or a function that has grown past the size one reader can hold.

Limits (``[tool.histoseg.shape]`` in pyproject.toml): a module of at most
``max_module_lines`` lines, a function or method of at most ``max_function_lines`` lines
(decorators and docstring included), in the package and harness sources; tests are exempt.

``known_oversize`` lists what was already over when the check came in, each at its size: an
entry that grows fails, one that shrinks must have its number lowered, and one back within
its limit must be removed, so the list only gets shorter. Anything else over a limit fails.

    .venv/bin/python scripts/check_shape.py        # exit 0, or one line per offence and 1
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("histoseg", "bench")


def is_test(path: Path) -> bool:
    return path.name.startswith("test_") or path.name == "conftest.py"


def sizes(path: Path, root: Path = ROOT) -> Iterator[tuple[str, int, str]]:
    """``(name, lines, kind)`` for the module and for every function in it."""
    text = path.read_text(encoding="utf-8")
    rel = path.relative_to(root).as_posix()
    yield rel, len(text.splitlines()), "module"
    yield from _functions(ast.parse(text, filename=rel), f"{rel}::")


def _functions(parent: ast.AST, prefix: str) -> Iterator[tuple[str, int, str]]:
    """Every function below ``parent``, named by its qualified path (``Class.method``)."""
    for node in ast.iter_child_nodes(parent):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            name = prefix + node.name
            if not isinstance(node, ast.ClassDef):
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                yield name, node.end_lineno - first + 1, "function"
            yield from _functions(node, name + ".")
        else:
            yield from _functions(node, prefix)


def offences(config: dict, root: Path = ROOT) -> list[str]:
    """One line per module or function over its limit, or grown past its known size."""
    limits = {"module": config["max_module_lines"], "function": config["max_function_lines"]}
    known: dict[str, int] = dict(config.get("known_oversize", {}))
    found: list[str] = []
    seen: set[str] = set()
    for top in SOURCES:
        for path in sorted((root / top).rglob("*.py")):
            if is_test(path):
                continue
            for name, lines, kind in sizes(path, root):
                limit = limits[kind]
                if name in known:
                    seen.add(name)
                    if lines > known[name]:
                        found.append(f"{name}: {lines} lines, grew past its known {known[name]}")
                    elif lines <= limit:
                        found.append(
                            f"{name}: {lines} lines, now within {limit}: remove it from "
                            "known_oversize in pyproject.toml"
                        )
                    elif lines < known[name]:
                        found.append(
                            f"{name}: {lines} lines, shrank from {known[name]}: lower its "
                            "known_oversize entry in pyproject.toml to match"
                        )
                elif lines > limit:
                    found.append(f"{name}: {lines} lines, over the {kind} limit of {limit}")
    found += [
        f"{name}: in known_oversize but no such module or function" for name in known.keys() - seen
    ]
    return found


def main() -> int:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["histoseg"]["shape"]
    found = offences(config)
    for line in found:
        print(line)
    known = len(config.get("known_oversize", {}))
    print(f"shape: {len(found)} offence(s); {known} known oversize entries left to split")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())

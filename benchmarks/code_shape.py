"""Code shape against issue 26's targets: functions over 60 lines, classes over 250, modules over 450.

    python benchmarks/code_shape.py                  # fxdrop/ and cli/
    python benchmarks/code_shape.py fxdrop/cache     # some folders or files
    python benchmarks/code_shape.py --functions 40   # other limits

A function or class counts from its `def`/`class` line to its last line (docstring, comments and
blank lines inside included, decorators not); a module counts every line of its file. Nested
functions and methods are listed on their own, under their qualified name. Exits 1 when something
is over a limit, so it can gate a check.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _defs(tree: ast.AST, prefix: str = "") -> Iterator[tuple[str, ast.AST]]:
    """(qualified name, node) of every function and class, nested ones included."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            name = f"{prefix}{node.name}"
            yield name, node
            yield from _defs(node, name + ".")
        else:
            yield from _defs(node, prefix)


def over_limits(path: Path, functions: int, classes: int, modules: int) -> list[tuple[str, str, int, int]]:
    """(kind, where, lines, limit) of what in `path` is over its limit."""
    text = path.read_text()
    where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    out = []
    if (n := len(text.splitlines())) > modules:
        out.append(("module", str(where), n, modules))
    for name, node in _defs(ast.parse(text, str(path))):
        n = node.end_lineno - node.lineno + 1
        kind, limit = ("class", classes) if isinstance(node, ast.ClassDef) else ("function", functions)
        if n > limit:
            out.append((kind, f"{where}:{node.lineno} {name}", n, limit))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("paths", nargs="*", type=Path, default=[ROOT / "fxdrop", ROOT / "cli"])
    p.add_argument("--functions", type=int, default=60)
    p.add_argument("--classes", type=int, default=250)
    p.add_argument("--modules", type=int, default=450)
    args = p.parse_args()
    files = sorted(f for p in args.paths for f in ([p] if p.is_file() else p.rglob("*.py")))
    rows = [r for f in files for r in over_limits(f.resolve(), args.functions, args.classes, args.modules)]
    for kind, where, n, limit in sorted(rows, key=lambda r: (r[0], -r[2])):
        print(f"{kind:8} {n:5} > {limit:<4} {where}")
    print(f"{len(rows)} over the limits in {len(files)} files")
    return 1 if rows else 0


if __name__ == "__main__":
    sys.exit(main())

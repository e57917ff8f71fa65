"""Print the sizes a newcomer meets: the longest functions in nrexp/ and the longest modules.

    python scripts/code_shape.py [--top N]

tests/test_code_shape.py holds the limits (issue 24): no function over 100 lines, the training loop
(train.run_loop) at most 80, nrexp/fused.py at most 450 lines.
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "nrexp"


def function_sizes(root: Path = ROOT) -> list[tuple[int, str]]:
    """(lines, "module.py:qualified.name") of every function and method, longest first."""
    sizes = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text())
        stack = [(node, "") for node in tree.body]
        while stack:
            node, prefix = stack.pop()
            if isinstance(node, ast.ClassDef):
                stack += [(child, f"{prefix}{node.name}.") for child in node.body]
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                sizes.append((node.end_lineno - node.lineno + 1, f"{path.relative_to(root)}:{prefix}{node.name}"))
                stack += [(child, f"{prefix}{node.name}.") for child in node.body]
    return sorted(sizes, reverse=True)


def module_sizes(root: Path = ROOT) -> list[tuple[int, str]]:
    return sorted(
        ((len(p.read_text().splitlines()), str(p.relative_to(root))) for p in root.rglob("*.py")), reverse=True
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=10)
    top = parser.parse_args().top
    print("longest functions:")
    for lines, name in function_sizes()[:top]:
        print(f"  {lines:4d}  {name}")
    print("longest modules:")
    for lines, name in module_sizes()[:top]:
        print(f"  {lines:4d}  {name}")


if __name__ == "__main__":
    main()

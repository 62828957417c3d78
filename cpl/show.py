"""Print a plan tree as an indented outline: ``python -m cpl.show OUT/trees[/ID.json] [--min-visits N]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cpl.formats import Step, display_text
from cpl.tree import Node, Tree


def outline(tree: Tree, *, min_visits: int = 1, width: int = 100) -> str:
    lines = [f"tree {tree.id}: {tree.question}", f"gold {tree.gold}; {tree.simulations_done} simulations"]

    def walk(node: Node, indent: int) -> None:
        for child in sorted(tree.children(node), key=lambda c: -c.N):
            if child.N < min_visits and child.reward is None:
                continue
            shown = display_text(Step(child.kind, child.text), tree.config.format) if child.kind else child.text
            text = " / ".join(line.strip() for line in shown.splitlines() if line.strip())
            mark = {True: " ✓", False: " ✗"}.get(child.correct, "") if child.correct is not None else ""
            head = f"{'  ' * indent}[{child.kind} N={child.N} V={child.V:+.2f}{mark}] "
            lines.append(head + (text if len(head) + len(text) <= width else text[: width - len(head) - 1] + "…"))
            walk(child, indent + 1)

    walk(tree.root, 0)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("path", type=Path, help="a tree JSON file or a trees/ directory")
    p.add_argument("--min-visits", type=int, default=1, help="hide unvisited plan steps")
    p.add_argument("--width", type=int, default=110)
    args = p.parse_args(argv)
    files = sorted(args.path.glob("*.json")) if args.path.is_dir() else [args.path]
    if not files or not all(f.is_file() for f in files):
        print(f"cpl.show: error: no tree JSON at {args.path}", file=sys.stderr)
        return 2
    for f in files:
        print(outline(Tree.model_validate_json(f.read_text()), min_visits=args.min_visits, width=args.width))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())

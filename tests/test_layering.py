"""Layering: `cpl/` is the algorithm as a pure library; it never imports the services or network clients.

Every import statement in cpl/ (top level and inside functions) is read from the source, so an import hidden
in a function body counts too. docs/architecture.md describes the layers.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = ("services", "httpx", "aiohttp", "redis", "celery", "requests", "fastapi", "uvicorn")


def imported_modules(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def test_cpl_imports_no_service_and_no_network_client():
    offenders = []
    for path in sorted((REPO / "cpl").rglob("*.py")):
        for line, module in imported_modules(path):
            if module.split(".")[0] in FORBIDDEN:
                offenders.append(f"{path.relative_to(REPO)}:{line}: import {module}")
    assert offenders == [], "cpl/ must stay a pure library:\n" + "\n".join(offenders)


def test_the_check_sees_imports_inside_functions(tmp_path):
    sample = tmp_path / "m.py"
    sample.write_text("def f():\n    import httpx\n    from services.common import app\n")
    assert [m for _, m in imported_modules(sample)] == ["httpx", "services.common"]


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """cpl module -> the cpl modules it imports (anywhere in the file)."""
    modules = {module_name(p): p for p in (REPO / "cpl").rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for _, module in imported_modules(path):
            while module and module not in modules:
                module = module.rpartition(".")[0]
            if module and module != name and not name.startswith(module + "."):
                targets.add(module)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_no_import_cycles_inside_cpl():
    """A cycle hidden by a function-level import still couples two modules (models.tiny <-> models.value_head)."""
    assert cycles(import_graph()) == []


def test_code_and_docs_cite_only_files_in_the_repo():
    """The design handbook lives outside the repository; a newcomer must be able to follow every reference."""
    offenders = []
    for pattern in ("cpl/**/*.py", "services/**/*.py", "tests/**/*.py", "bench/**/*.py", "docs/**/*.md", "*.md"):
        for path in REPO.glob(pattern):
            if path == Path(__file__):
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if "DESIGN" in line:
                    offenders.append(f"{path.relative_to(REPO)}:{number}")
    assert offenders == []


NOT_REFERENCES = {
    "services.md",
    "cpl.example.com",
    "cpl.toy.corpus",
    "services.search",
    "cpl.train",
    "cpl.search",
    "cpl.rounds",
}
"""Dotted words that are not module paths: file names, a host name, a seed string, a package still to come,
Celery task names (``cpl.train.run``)."""


def test_dotted_references_in_code_and_docs_resolve():
    """`cpl.x.y` / `services.x.y` named in docstrings and docs exist (no stale pointers for a newcomer)."""
    import importlib
    import re

    stale = []
    paths = [*REPO.glob("cpl/**/*.py"), *REPO.glob("services/**/*.py"), *REPO.glob("docs/**/*.md")]
    for path in paths:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for ref in re.findall(r"\b((?:cpl|services)(?:\.[A-Za-z_]\w*)+)", line):
                if ref in NOT_REFERENCES or any(ref.startswith(n + ".") for n in NOT_REFERENCES):
                    continue
                parts = ref.split(".")
                for k in range(len(parts), 0, -1):
                    try:
                        obj = importlib.import_module(".".join(parts[:k]))
                    except ImportError:
                        continue
                    try:
                        for attr in parts[k:]:
                            obj = getattr(obj, attr)
                    except AttributeError:
                        stale.append(f"{path.relative_to(REPO)}:{number}: {ref}")
                    break
    assert stale == []

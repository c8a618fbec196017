"""The package's shape (docs/architecture.md): which rooms exist, which way imports point, no circles.

Read from the source with `ast`, so it needs no servers and catches a wrong import the
moment it is written, not when some code path first runs it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.pure

SRC = Path(__file__).resolve().parents[1] / "src" / "mailflow"

# Rank of each room: a module may import its own room and rooms of a LOWER rank, never a
# room of the same or a higher rank (domain rooms talk through events, not imports).
RANKS: dict[str, float] = {
    "errors": 0,
    "log": 0,
    "config": 0.5,
    "infra": 1,
    "testing": 1,
    "events": 2,
    "mail": 2,
    "consumers": 3,
    "outbound": 4,
    "tenants": 4,
    "projectors": 4,
    "inbound": 4,
    "runtime": 5,
    "api": 5.25,  # the HTTP gateway (/api/v1), mounted by web
    "web": 5.5,  # the HTTP side; `mailflow web` (commands) serves it
    "commands": 6,
    "cli": 7,
    "__main__": 8,
}
TOP_LEVEL_MODULES = {"__init__.py", "__main__.py", "cli.py", "config.py", "errors.py", "log.py"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported mailflow module, at module level?) for every import in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top_level = {id(node) for node in tree.body}
    # Imports under `if TYPE_CHECKING:` are for the type checker only.
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in ast.walk(node):
                top_level.discard(id(sub))
                sub._type_only = True  # type: ignore[attr-defined]
    found = []
    for node in ast.walk(tree):
        if getattr(node, "_type_only", False):
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name == "mailflow" or name.startswith("mailflow."):
                found.append((name, id(node) in top_level))
    return found


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in SRC.rglob("*.py")}


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_the_package_top_level_holds_only_the_entry_point_and_the_floor():
    top = {p.name for p in SRC.iterdir() if p.suffix == ".py"}
    assert top == TOP_LEVEL_MODULES
    rooms = {p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert rooms <= set(RANKS), f"a room without a rank in docs/architecture.md: {rooms - set(RANKS)}"


def test_every_module_says_in_its_first_line_which_room_it_is():
    missing = [m for m, p in _modules().items() if not ast.get_docstring(ast.parse(p.read_text()))]
    assert missing == []


def test_imports_point_only_down_the_rooms():
    known = _modules()
    wrong = []
    for module, path in known.items():
        room = _room(module)
        if room == "__init__":
            continue
        for target, _ in _imports(path):
            while target not in known and "." in target:
                target = target.rsplit(".", 1)[0]  # `from mailflow.x import name`: the module is x
            other = _room(target)
            if other in (room, "__init__"):
                continue
            if RANKS[other] >= RANKS[room]:
                wrong.append(f"{module} imports {target}")
    assert sorted(set(wrong)) == []


def test_there_is_no_import_circle_among_module_level_imports():
    known = _modules()
    graph: dict[str, set[str]] = {m: set() for m in known}
    for module, path in known.items():
        for target, at_top in _imports(path):
            if not at_top:
                continue
            while target not in known and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in known and target != module and not module.startswith(target + "."):
                graph[module].add(target)
    # A package importing its own submodules at init is how Python packages work, not a circle
    # (outbound/__init__.py registers its inline projections); drop package -> own child edges.
    for module in graph:
        graph[module] = {t for t in graph[module] if not t.startswith(module + ".")}
    seen: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        seen[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if seen.get(t) == 1:
                return stack[stack.index(t) :] + [t]
            if t not in seen:
                cycle = visit(t)
                if cycle:
                    return cycle
        stack.pop()
        seen[m] = 2
        return None

    for m in sorted(graph):
        if m not in seen:
            cycle = visit(m)
            assert cycle is None, " -> ".join(cycle)


def test_mailflow_help_imports_no_room_below_the_cli():
    import subprocess
    import sys

    code = (
        "import sys; sys.argv=['mailflow','--help']\n"
        "from mailflow.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('mailflow.'))\n"
        "print('LOADED', ','.join(loaded))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    loaded = out.split("LOADED ", 1)[1].strip().split(",")
    assert loaded == ["mailflow.cli"]

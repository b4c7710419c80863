"""The shape of the code, checked: no import cycle in tunneld/ (TYPE_CHECKING and
function-level imports count), the pure core imports no I/O framework, tunnelctl stays thin,
and no module grows past the size limit of one job."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("tunneld", "tunnelctl")
#: modules with no I/O framework in them (design.md §2): tested byte-in / event-out
PURE = ("spec", "markers", "printed", "urls", "state", "wire", "socks", "remote", "openfail",
        "spool", "rcfile", "openlog", "jobs", "jobpoll",
        "reload", "window", "mux", "names", "errors", "desktop", "sshconfig")
FRAMEWORKS = ("asyncio", "asyncssh", "pydantic", "uvloop")
#: a module is one job: about this many lines at most
MAX_LINES = 470


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``name`` imports, anywhere in the file."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                prefix = base[:len(base) - node.level + 1]
                mod = ".".join(prefix + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {n: _imports(n, p, set(mods)) for n, p in mods.items()}


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                cycles.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("name", PURE)
def test_the_pure_core_imports_no_framework(name):
    path = ROOT / "tunneld" / f"{name}.py"
    tree = ast.parse(path.read_text())
    used = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            used |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level:
            used.add((node.module or "").split(".")[0])
    assert not used & set(FRAMEWORKS), f"tunneld/{name}.py imports {used & set(FRAMEWORKS)}"
    graph = _graph()
    for dep in graph[f"tunneld.{name}"]:
        assert dep.split(".")[-1] in PURE or dep == "tunneld", \
            f"tunneld/{name}.py imports {dep}, which is not pure"


def test_tunnelctl_imports_only_the_thin_part_of_tunneld():
    """The pure modules and paths (stdlib and platformdirs): never the daemon's."""
    graph = _graph()
    allowed = {"tunneld", "tunneld.paths"} | {f"tunneld.{p}" for p in PURE}
    for name, deps in graph.items():
        if name.startswith("tunnelctl"):
            extra = {d for d in deps if d.startswith("tunneld")} - allowed
            assert not extra, f"{name} imports {extra}"


@pytest.mark.parametrize("name,path", sorted(_modules().items()))
def test_one_module_is_one_job_of_bounded_size(name, path):
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(ROOT)} has {n} lines (at most {MAX_LINES})"

"""The import graph runs one way: wire <- auth/upstream <- session <- server <- app <- cli.

Read from the source (ast), so a new import that points up, or a cycle
between two modules, fails here before anyone has to follow it at run time.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "lakeproxy"

#: Floors, lowest first. A module may import its own floor and those below.
#: The first matching prefix decides (longest prefixes first within a floor).
FLOORS: list[tuple[str, ...]] = [
    ("lakeproxy.wire", "lakeproxy.config", "lakeproxy.errors", "lakeproxy.log",
     "lakeproxy.metrics", "lakeproxy.readiness", "lakeproxy.tls", "lakeproxy.cancel",
     "lakeproxy.auth.provider", "lakeproxy.auth.backoff", "lakeproxy.fds",
     "lakeproxy.listen"),
    ("lakeproxy.retry", "lakeproxy.client_auth", "lakeproxy.auth"),
    ("lakeproxy.upstream",),
    ("lakeproxy.splice", "lakeproxy.boundaries", "lakeproxy.pool", "lakeproxy.session"),
    ("lakeproxy.server", "lakeproxy.admin"),
    ("lakeproxy.app",),
    ("lakeproxy.cli", "lakeproxy.check", "lakeproxy.demo", "lakeproxy.__main__",
     "lakeproxy.emulator"),
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    name = ".".join(parts)
    return name.removesuffix(".__init__")


def _imports(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith("lakeproxy"):
                out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("lakeproxy"))
    return out


def _floor(module: str) -> int | None:
    best: tuple[int, int] | None = None  # (prefix length, floor)
    for floor, prefixes in enumerate(FLOORS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (
                best is None or len(prefix) > best[0]
            ):
                best = (len(prefix), floor)
    return None if best is None else best[1]


GRAPH = {_module_name(p): _imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_every_module_has_a_floor(module: str) -> None:
    if module == "lakeproxy":
        return
    assert _floor(module) is not None, f"{module}: add it to FLOORS in {__file__}"


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if m != "lakeproxy"))
def test_imports_point_down(module: str) -> None:
    mine = _floor(module)
    assert mine is not None
    up = sorted(
        dep for dep in GRAPH[module]
        if dep != "lakeproxy" and (_floor(dep) or 0) > mine
    )
    assert not up, f"{module} (floor {mine}) imports from a higher floor: {up}"


def test_no_cycles() -> None:
    def resolve(dep: str) -> str | None:
        return dep if dep in GRAPH else None

    state: dict[str, int] = {}  # 1 visiting, 2 done
    stack: list[str] = []

    def visit(mod: str) -> None:
        state[mod] = 1
        stack.append(mod)
        for dep in sorted(GRAPH[mod]):
            target = resolve(dep)
            # a package's __init__ re-exports its modules: importing the
            # package from inside it is not a cycle worth reporting
            if target is None or target == "lakeproxy" or mod.startswith(target + "."):
                continue
            if state.get(target) == 1:
                cycle = [*stack[stack.index(target):], target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[mod] = 2

    for mod in sorted(GRAPH):
        if mod not in state:
            visit(mod)


def test_wire_and_splice_stay_pure() -> None:
    """wire/ imports only itself; the splice imports nothing from wire/."""
    for mod, deps in GRAPH.items():
        if mod.startswith("lakeproxy.wire"):
            assert all(d.startswith("lakeproxy.wire") for d in deps), (mod, deps)
    assert not any(d.startswith("lakeproxy.wire") for d in GRAPH["lakeproxy.splice"])

"""The layout stays one-way: no import cycle between relay's packages and top-level modules
(HACKING.md, "Module map"). Imports under `if TYPE_CHECKING:` do not count."""

from __future__ import annotations

import ast
from pathlib import Path

RELAY = Path(__file__).parents[2] / "relay"


def _unit(module: str) -> str:
    return ".".join(module.split(".")[:2])  # relay.deliver.pool -> relay.deliver


def _imports() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for path in RELAY.rglob("*.py"):
        module = ".".join(path.relative_to(RELAY.parent).with_suffix("").parts).removesuffix(".__init__")
        tree = ast.parse(path.read_text())
        typing_only = {
            id(node)
            for block in ast.walk(tree)
            if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
            for node in ast.walk(block)
        }
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            for name in names:
                if name.startswith("relay.") and _unit(name) != _unit(module):
                    edges.setdefault(_unit(module), set()).add(_unit(name))
    return edges


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_between_packages():
    cycle = _cycle(_imports())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_message_path_does_not_import_the_lifecycle():
    edges = _imports()
    for package in ("relay.listen", "relay.pipeline", "relay.deliver", "relay.sign", "relay.posture"):
        assert not edges.get(package, set()) & {"relay.server", "relay.wiring", "relay.cli"}, package

"""The tree tells the architecture (issue 26): each part of gradtrack imports only what the layout allows, and no
module of ``gradtrack/`` or ``backends/`` imports another in a cycle.

The rules are written once, here, and checked on the source (``ast``, nothing imported), the way
``tests/test_docs.py`` guards the reference. ``docs/development.md`` shows the same table. Imports under
``if TYPE_CHECKING:`` are annotations only and exempt; every other import counts, in a function too.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).parent.parent
PACKAGES = {"gradtrack": ROOT / "gradtrack", "gradtrack_mlflow": ROOT / "backends" / "gradtrack_mlflow",
            "gradtrack_wandb": ROOT / "backends" / "gradtrack_wandb"}  # fmt: skip
# The public contract plugin authors import, and the checks and state format every part shares.
CONTRACT = {"gradtrack.events", "gradtrack.hookspecs", "gradtrack.naming", "gradtrack.state", "gradtrack.validate",
            "gradtrack._version"}  # fmt: skip
# The face: what users call, which wires the parts together. It may import any part.
FACE = {"gradtrack", "gradtrack.tracker", "gradtrack.calibration", "gradtrack.cli", "gradtrack.integrations"}
# part -> what it may import besides itself and the contract
ALLOWED: dict[str, set[str]] = {
    "contract": set(),
    "measure": set(),
    "judge": set(),
    "heal": set(),
    "policies": {"measure", "judge"},
    "handover": {"judge.quantiles"},
    "step": {"measure", "policies", "judge", "heal", "handover"},
    "delivery": {"handover", "judge.quantiles"},
    # first-party plugins, which run in the reporter process: the contract, the hand-over and delivery's helpers
    "backend": {"handover", "delivery", "root", "cli"},
}
SDKS = ("mlflow", "wandb", "gradtrack_mlflow", "gradtrack_wandb")


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported module
    line: int
    typing_only: bool
    top_level: bool  # executed when the module is imported (not in a function)


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts))
            found[name.removesuffix(".__init__")] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> Iterator[Import]:
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def visit(node: ast.AST, typing_only: bool, top_level: bool) -> Iterator[Import]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                yield from visit(child, True, top_level)
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield Import(name, alias.name, child.lineno, typing_only, top_level)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    base = ".".join([*package.split(".")[: len(package.split(".")) - child.level + 1], base]).strip(".")
                for alias in child.names:
                    candidate = f"{base}.{alias.name}"
                    yield Import(name, candidate if candidate in known else base, child.lineno, typing_only, top_level)
            yield from visit(child, typing_only, top_level and not isinstance(child, ast.FunctionDef |
                                                                                     ast.AsyncFunctionDef))

    yield from visit(tree, False, True)


def part_of(module: str) -> str | None:
    """The part a module belongs to (None: the face, which may import anything)."""
    if module in CONTRACT:
        return "contract"
    if module.startswith(("gradtrack_mlflow", "gradtrack_wandb")):
        return "backend"
    if module == "gradtrack.judge.quantiles":
        return "judge.quantiles"
    if module in FACE or module.startswith("gradtrack.integrations"):
        return None
    parts = module.split(".")
    return parts[1] if parts[0] == "gradtrack" and len(parts) > 2 else None


def allowed(source: str, target: str) -> bool:
    mine = part_of(source)
    if mine is None:
        return True
    theirs = part_of(target)
    if target == "gradtrack":
        theirs = "root"
    elif target == "gradtrack.cli":
        theirs = "cli"
    if theirs in (mine, "contract") or (theirs == "judge.quantiles" and mine == "judge"):
        return True
    return theirs in ALLOWED[mine] or (theirs == "judge.quantiles" and "judge" in ALLOWED[mine])


def graph() -> list[Import]:
    found = modules()
    known = set(found)
    return [edge for name, path in found.items() for edge in imports(name, path, known)]


def test_the_core_never_imports_a_backend_or_its_sdk() -> None:
    leaks = [f"{e.source}:{e.line} imports {e.target}" for e in graph()
             if e.source.startswith("gradtrack.") or e.source == "gradtrack"
             if e.target.split(".")[0] in SDKS]  # fmt: skip
    assert leaks == []


def test_each_part_imports_only_what_the_layout_allows() -> None:
    known = set(modules())
    crossings = sorted(f"{e.source}:{e.line} imports {e.target}" for e in graph()
                       if e.target in known and not e.typing_only and not allowed(e.source, e.target))  # fmt: skip
    assert crossings == []


def test_no_module_imports_another_in_a_cycle() -> None:
    known = set(modules())
    edges: dict[str, set[str]] = {name: set() for name in known}
    for edge in graph():
        if edge.top_level and not edge.typing_only and edge.target in known and edge.target != edge.source:
            edges[edge.source].add(edge.target)
    cycles = _cycles(edges)
    assert cycles == []


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in edges[node]:
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            connect(node)
    return found


def test_the_rules_see_the_whole_tree() -> None:
    found = modules()
    assert {"gradtrack.step.pipeline", "gradtrack.delivery.outbox", "gradtrack_mlflow.backend"} <= set(found)
    assert len(graph()) > 200  # the imports were read at all
    assert not allowed("gradtrack.step.pipeline", "gradtrack.delivery.outbox")  # the rules can fail
    assert not allowed("gradtrack.judge.detection", "gradtrack.handover.records")


def test_no_module_is_longer_than_700_lines() -> None:
    long = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    assert {name: lines for name, lines in long.items() if lines > 700} == {}

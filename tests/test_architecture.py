"""The package's layers (docs/architecture.md), checked without import-linter: an AST walk of
every module under gateway/ finds its imports (top-level and inside functions), and none may reach
a layer above its own. The same table is pyproject.toml's [tool.importlinter] contract."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "gateway"

# High to low; a module may import its own layer's modules and any layer below.
LAYERS: list[set[str]] = [
    {"gateway.cli"},
    {"gateway.runtime"},
    {"gateway.console"},
    {"gateway.admin", "gateway.verify", "gateway.webhooks"},  # independent of each other
    {"gateway.proxy"},
    {"gateway.usage"},
    {"gateway.coherence"},
    {"gateway.h1", "gateway.keytable"},  # independent of each other
    {"gateway.ratelimit"},
    {"gateway.routing"},
    {"gateway.config", "gateway.errors", "gateway.metrics", "gateway.logs"},
]
INDEPENDENT = ({"gateway.h1", "gateway.keytable"}, {"gateway.admin", "gateway.verify", "gateway.webhooks"})
# The one module that may import aiohttp's internals (docs/http-engine.md).
AIOHTTP_INTERNALS = ("aiohttp.base_protocol", "aiohttp.http_parser", "aiohttp.http_exceptions", "aiohttp.streams")
COMPAT = "gateway.h1.compat"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """Every module `path` imports, absolute (relative imports resolved), with its line."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            # `from gateway import errors`: the names may be modules themselves
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return found


def component(module: str) -> str | None:
    """The layer entry (`gateway.h1`, `gateway.proxy`...) a gateway module belongs to, if any."""
    for layer in LAYERS:
        for entry in layer:
            if module == entry or module.startswith(entry + "."):
                return entry
    return None


def rank(entry: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if entry in layer)


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer() -> None:
    unplaced = [module_name(p) for p in MODULES if component(module_name(p)) is None]
    assert sorted(unplaced) == ["gateway", "gateway.__main__"]  # the package root and `python -m gateway`


def wrong_imports(module: str, imported: list[tuple[int, str]]) -> list[str]:
    """The imports of `module` that reach above its layer, or into an independent sibling."""
    source = component(module)
    if source is None:
        return []
    wrong = []
    for line, name in imported:
        target = component(name)
        if target is None or target == source:
            continue
        if rank(target) < rank(source):
            wrong.append(f"line {line}: {name} is above {source}")
        elif rank(target) == rank(source) and any({source, target} <= group for group in INDEPENDENT):
            wrong.append(f"line {line}: {name} is a sibling {source} must not import")
    return wrong


@pytest.mark.parametrize("path", MODULES, ids=[module_name(p) for p in MODULES])
def test_no_module_imports_a_higher_layer(path: Path) -> None:
    wrong = wrong_imports(module_name(path), imports(path))
    assert not wrong, wrong


def test_the_upstream_client_sees_the_client_side_only_through_the_downstream_protocol() -> None:
    imported = {module for _, module in imports(PACKAGE / "h1" / "client.py")}
    assert "gateway.h1.downstream" in imported
    banned = ("gateway.h1.server", "gateway.keytable", "gateway.routing")
    assert not [m for m in imported if m.startswith(banned)]


@pytest.mark.parametrize("path", MODULES, ids=[module_name(p) for p in MODULES])
def test_only_the_compat_module_imports_aiohttp_internals(path: Path) -> None:
    if module_name(path) == COMPAT:
        return
    assert not [(line, m) for line, m in imports(path) if m.startswith(AIOHTTP_INTERNALS)]


def test_the_check_catches_upward_and_sibling_imports() -> None:
    """The check itself: an upward import, a sibling import and a lazy one are caught."""
    assert wrong_imports("gateway.keytable.lookup", [(1, "gateway.proxy")])
    assert wrong_imports("gateway.h1.client", [(1, "gateway.keytable.record")])
    assert wrong_imports("gateway.verify.verifier", [(1, "gateway.admin.api")])
    assert wrong_imports("gateway.config", [(1, "gateway.routing")])
    assert not wrong_imports("gateway.proxy", [(1, "gateway.h1.server"), (2, "gateway.keytable.record")])
    assert not wrong_imports("gateway.errors", [(1, "gateway.config")])  # one layer, not independent
    assert component("gateway.configuration") is None  # a prefix is not a package


def test_the_walk_finds_imports_inside_functions() -> None:
    module = PACKAGE / "cli" / "main.py"  # imports gateway.runtime.serve inside a function
    assert "gateway.runtime.serve" in {name for _, name in imports(module)}


# Task creation: the loop keeps only a weak reference to a task, so one whose result is dropped
# can be collected mid-flight. Ruff's RUF006 checks `asyncio.create_task`/`asyncio.ensure_future`;
# this checks every `.create_task(` and `ensure_future(` whatever the receiver (`loop.create_task`
# included). A TaskGroup holds its own tasks.
TASK_MAKERS = frozenset({"create_task", "ensure_future"})


def unheld_tasks(source: str) -> list[int]:
    """The lines where a task is created and its result dropped (a bare expression statement)."""
    tree = ast.parse(source)
    groups = {
        item.optional_vars.id
        for node in ast.walk(tree)
        if isinstance(node, ast.AsyncWith)
        for item in node.items
        if isinstance(item.context_expr, ast.Call)
        and ast.unparse(item.context_expr.func).endswith("TaskGroup")
        and isinstance(item.optional_vars, ast.Name)
    }
    lines = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)):
            continue
        func = node.value.func
        if isinstance(func, ast.Attribute) and func.attr in TASK_MAKERS:
            if not (isinstance(func.value, ast.Name) and func.value.id in groups):
                lines.append(node.lineno)
        elif isinstance(func, ast.Name) and func.id in TASK_MAKERS:
            lines.append(node.lineno)
    return lines


@pytest.mark.parametrize("path", MODULES, ids=[module_name(p) for p in MODULES])
def test_every_task_the_gateway_creates_is_held(path: Path) -> None:
    assert not unheld_tasks(path.read_text()), f"{path}: hold the task (a name, a set, or a TaskGroup)"


def test_the_check_catches_dropped_tasks_on_any_receiver() -> None:
    assert unheld_tasks("loop.create_task(work())\n") == [1]
    assert unheld_tasks("self._loop.create_task(work())\n") == [1]
    assert unheld_tasks("asyncio.ensure_future(work())\n") == [1]
    assert unheld_tasks("ensure_future(work())\n") == [1]
    held = "t = loop.create_task(work())\ntasks.add(asyncio.ensure_future(w()))\nawait loop.create_task(w())\n"
    assert unheld_tasks(f"async def f():\n{''.join('    ' + line + chr(10) for line in held.splitlines())}") == []
    grouped = "async def f():\n    async with asyncio.TaskGroup() as g:\n        g.create_task(work())\n"
    assert unheld_tasks(grouped) == []

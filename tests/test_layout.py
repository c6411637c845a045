"""The tree's shape: no import circle among the project's modules, and the arrows point one way
(the engine knows nothing of the service; the API never loads torch). Read from the sources with
`ast`, so an import inside a function counts as much as one at the top of a module."""
from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("erq_core", "service", "storage", "worker", "erq_client")
SERVICE_SIDE = {"service", "storage", "worker", "erq_client", "fastapi", "starlette", "celery", "kombu", "uvicorn",
                "sqlalchemy", "httpx"}
ENGINE = {"torch", "timm", "torchvision", "onnx", "safetensors"}


@lru_cache(maxsize=1)
def project_modules() -> dict[str, Path]:
    found = {"erq_cli": ROOT / "erq_cli.py"}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imported_names(module: str) -> set[str]:
    """Every dotted name the module imports, wherever the import statement is."""
    path = project_modules()[module]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return names


def _project_module(name: str) -> str | None:
    modules = project_modules()
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


@lru_cache(maxsize=None)
def project_imports(module: str) -> frozenset[str]:
    """The project's modules that `module` names in an import (not the packages above them)."""
    targets = {_project_module(name) for name in imported_names(module) if name.split(".")[0] in
               {m.split(".")[0] for m in project_modules()}}
    return frozenset(targets - {None, module})


def external_imports(module: str) -> set[str]:
    project = {m.split(".")[0] for m in project_modules()}
    return {name.split(".")[0] for name in imported_names(module)} - project - {""}


def import_cycles() -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in project_imports(module):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            group = []
            while not group or group[-1] != module:
                group.append(stack.pop())
            if len(group) > 1:
                cycles.append(sorted(group))

    for module in sorted(project_modules()):
        if module not in index:
            visit(module)
    return cycles


def loaded_with(module: str) -> set[str]:
    """The project's modules that importing `module` may load: what it imports, the packages above
    each (Python runs a package's __init__ first), and so on."""
    seen, todo = set(), [module]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        parents = [".".join(current.split(".")[:n]) for n in range(1, current.count(".") + 1)]
        todo.extend([*project_imports(current), *parents])
    return seen


def test_the_graph_sees_imports_inside_functions():
    # storage/artifacts/factory.py imports the S3 store inside open_store (boto3 only where needed)
    assert "storage.artifacts.s3" in project_imports("storage.artifacts.factory")
    assert "storage.artifacts.folder" in project_imports("storage.artifacts.factory")


def test_no_import_cycle_among_the_projects_modules():
    assert import_cycles() == []


def test_the_engine_imports_nothing_of_the_service_side():
    engine = [m for m in project_modules() if m.split(".")[0] == "erq_core"]
    offending = {m: sorted(external_imports(m) & SERVICE_SIDE | {t.split(".")[0] for t in project_imports(m)} &
                           SERVICE_SIDE) for m in engine}
    assert {m: names for m, names in offending.items() if names} == {}


def test_storage_imports_nothing_of_the_api_the_workers_or_torch():
    storage = [m for m in project_modules() if m.split(".")[0] == "storage"]
    offending = {m: sorted(({t.split(".")[0] for t in project_imports(m)} & {"service", "worker"}) |
                           (external_imports(m) & ENGINE)) for m in storage}
    assert {m: names for m, names in offending.items() if names} == {}


@pytest.mark.parametrize("side", ["service", "storage"])
def test_the_service_side_never_loads_the_engine(side):
    """What any API module may load, inside functions included, reaches no module that imports torch."""
    roots = [m for m in project_modules() if m.split(".")[0] == side]
    reached = set().union(*(loaded_with(m) for m in roots))
    heavy = {m: sorted(external_imports(m) & ENGINE) for m in reached}
    assert {m: names for m, names in heavy.items() if names} == {}


def test_the_api_app_never_loads_the_worker_package():
    assert sorted(m for m in loaded_with("service.app") if m.split(".")[0] == "worker") == []


def test_the_api_never_asks_which_store_it_has():
    """No `isinstance` on a store class in service/: every read goes through the store's methods."""
    stores = {node.name for path in (ROOT / "storage").rglob("*.py") for node in ast.walk(ast.parse(path.read_text()))
              if isinstance(node, ast.ClassDef) and node.name.endswith(("Store", "Uploads"))}
    assert {"ArtifactStore", "FolderStore", "S3Store", "FolderUploads", "S3Uploads"} <= stores
    asked = [(str(path.relative_to(ROOT)), node.lineno) for path in (ROOT / "service").rglob("*.py")
             for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("isinstance", "issubclass")
             and stores & {n.id if isinstance(n, ast.Name) else getattr(n, "attr", "") for n in ast.walk(node.args[1])}]
    assert asked == []

"""The shape of the code: no import cycles among the project's modules, a core (persona/) without Dagster or
orchestration imports, short modules (a long one says why in its docstring), and test modules that import no other.

Run alone: `.venv/bin/python -m pytest -q tests/test_architecture.py`. Imports inside functions count: a cycle
through a lazy import is still a cycle of dependencies.
"""
import ast
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("persona", "assets", "orchestration")
LONG = "Why this module is long:"


@pytest.fixture(scope="module")
def graph():
    sys.path.insert(0, str(ROOT))
    return grimp.build_graph(*PACKAGES, include_external_packages=True)


def project_modules(graph) -> list[str]:
    return sorted(m for m in graph.modules if m.split(".")[0] in PACKAGES and m not in PACKAGES)


def test_no_import_cycles(graph):
    cycles = []
    for module in project_modules(graph):
        for imported in graph.find_modules_directly_imported_by(module):
            if imported.split(".")[0] in PACKAGES and imported not in PACKAGES \
                    and graph.chain_exists(importer=imported, imported=module):
                cycles.append(" -> ".join(graph.find_shortest_chain(importer=imported, imported=module)) +
                              f" -> {imported}")
    assert cycles == []


def test_the_core_imports_no_dagster_and_no_orchestration(graph):
    for module in (m for m in project_modules(graph) if m.startswith("persona.")):
        for forbidden in ("dagster", "assets", "orchestration"):
            assert not graph.chain_exists(importer=module, imported=forbidden, as_packages=True), (module, forbidden)


def test_modules_are_short_or_say_why():
    long = []
    for path in sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")):
        lines = path.read_text(encoding="utf-8").count("\n")
        if lines > 350 and LONG not in (ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""):
            long.append(f"{path.relative_to(ROOT)}: {lines} lines")
    assert long == []


def test_no_test_module_imports_another():
    """Shared helpers live in conftest.py (fixtures) or in the helper modules beside it (builders, pipeline,
    processes): a test module that imports another runs that module's imports and fixtures in an order of its own."""
    tests = Path(__file__).resolve().parent
    modules = {p.stem for p in tests.glob("test_*.py")}
    found = []
    for path in sorted(tests.glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            found += [f"{path.name} imports {n}" for n in names if n.split(".")[0] in modules]
    assert found == []

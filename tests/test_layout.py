"""The repository's layout: what may import what, and what ``pip install .`` ships."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import List

ROOT = Path(__file__).resolve().parent.parent

# Everything that runs outside the test suite: the plugin, the CPU runtime, the demo and the
# benchmarks.
OUTSIDE_TESTS = ("megatron_densemixer", "megatron_cpu", "examples", "benchmarks")


def _imported_modules(path: Path) -> List[str]:
    """Every module an ``import`` or ``from ... import`` statement of ``path`` names."""
    modules = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            modules.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.append(node.module)
    return modules


def test_nothing_outside_tests_imports_tests():
    """Catches the plugin, the CPU runtime, the demo or the benchmarks importing from
    ``tests``: what they share with the tests lives in ``megatron_cpu``."""
    offenders = []
    for folder in OUTSIDE_TESTS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for module in _imported_modules(path):
                if module == "tests" or module.startswith("tests."):
                    offenders.append(f"{path.relative_to(ROOT)}: {module}")
    assert not offenders, f"modules outside tests/ import the test suite: {offenders}"


def test_import_scan_sees_tests_imports(tmp_path):
    """Guards the test above against a scan that misses an import form."""
    path = tmp_path / "module.py"
    path.write_text(
        "import tests.support.builders\n"
        "from tests import support\n"
        "def f():\n"
        "    from tests.support.reference import Model\n"
    )
    assert _imported_modules(path) == ["tests.support.builders", "tests", "tests.support.reference"]


def test_only_the_plugin_is_shipped():
    """Catches setup.py's package discovery picking up ``megatron_cpu``, ``tests``,
    ``examples`` or ``benchmarks``: only ``megatron_densemixer`` is installed."""
    setup = (ROOT / "setup.py").read_text()
    found = re.search(r"find_packages\(include=\[([^\]]*)\]\)", setup)
    assert found, "setup.py no longer lists the shipped packages in find_packages(include=[...])"
    patterns = re.findall(r'"([^"]+)"', found.group(1))
    assert patterns and all(p.split(".")[0] == "megatron_densemixer" for p in patterns), patterns

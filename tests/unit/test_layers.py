"""The layers of docs/architecture.md, read from the imports: a module that reaches upward fails here with its name and line."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from dcr_pipelines.lib.settings import PROJECT_ROOT

PACKAGE = PROJECT_ROOT / "dcr_pipelines"
# layer -> top-level modules it must not import (its own package-relative names resolved to dcr_pipelines.<x>)
FORBIDDEN = {
    "lib": {"dagster", "dagster_dbt", "psycopg", "dcr_pipelines.store", "dcr_pipelines.services", "dcr_pipelines.defs", "dcr_pipelines.cli"},
    "store": {"dagster", "dagster_dbt", "dcr_pipelines.services", "dcr_pipelines.defs", "dcr_pipelines.cli"},
    "services": {"dagster", "dagster_dbt", "dcr_pipelines.defs", "dcr_pipelines.cli"},
    "defs": {"psycopg", "dcr_pipelines.cli"},
    "cli": {"psycopg"},
}
# the package's top-level modules sit in the Dagster layer: the definitions and the runner that launches them
FORBIDDEN |= {"definitions.py": FORBIDDEN["defs"], "runner.py": FORBIDDEN["defs"]}
ALLOWED = {"lib/database.py": {"psycopg"}}  # connection URLs, the embedded server and advisory locks


def _imports(path: Path, source: str | None = None) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import, relative ones resolved against the file's package."""
    module = ".".join(path.relative_to(PROJECT_ROOT).with_suffix("").parts)
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module.removesuffix(".__init__")
    out = []
    for node in ast.walk(ast.parse(source if source is not None else path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.append((node.lineno, name))
            out += [(node.lineno, f"{name}.{alias.name}") for alias in node.names]
    return out


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_no_layer_imports_from_above(layer: str) -> None:
    problems = []
    files = [PACKAGE / layer] if layer.endswith(".py") else sorted((PACKAGE / layer).rglob("*.py"))
    assert files and all(f.is_file() for f in files), layer
    for path in files:
        rel = str(path.relative_to(PACKAGE))
        for line, name in _imports(path):
            for banned in FORBIDDEN[layer] - ALLOWED.get(rel, set()):
                if name == banned or name.startswith(banned + "."):
                    problems.append(f"dcr_pipelines/{rel}:{line}: imports {name} ({layer}/ may not import {banned})")
    assert not problems, "\n".join(problems)


def test_the_checker_catches_an_upward_import() -> None:
    """The rule is not vacuous: a relative import of the store from inside lib/ resolves to dcr_pipelines.store."""
    names = [n for _, n in _imports(PACKAGE / "lib" / "privacy" / "probe.py", "from ...store import ledger\nfrom ..policy import models\n")]
    assert "dcr_pipelines.store.ledger" in names
    assert "dcr_pipelines.lib.policy.models" in names

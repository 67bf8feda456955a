"""The top-level modules keep their place in the layers (pyproject.toml's import-linter
contracts cover the package; these two files sit outside it, so they are read here)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = {"data", "models", "ensemble", "ensembling"}
# What each may import of the project: models.py nothing, data.py the layers below it.
ALLOWED = {"models.py": set(), "data.py": {"ensembling.errors", "ensembling.readers"}}


def project_imports(path):
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module == "ensembling":
            found |= {f"ensembling.{alias.name}" for alias in node.names}  # its modules
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return {name for name in found if name.split(".")[0] in PROJECT}


@pytest.mark.parametrize("name", sorted(ALLOWED))
def test_top_level_modules_import_only_the_layers_below_them(name):
    assert project_imports(ROOT / name) <= ALLOWED[name]


def test_the_check_sees_an_upward_import(tmp_path):
    upward = tmp_path / "data.py"
    upward.write_text("import keras\nfrom ensembling import readers, train\n")
    assert project_imports(upward) == {"ensembling.readers", "ensembling.train"}
    assert not project_imports(upward) <= ALLOWED["data.py"]

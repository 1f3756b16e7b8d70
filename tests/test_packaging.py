"""Packaging: pyproject.toml's dependency ranges admit the exact pins of requirements.txt (the tested lock), both
list the same packages, every pinned package is used by the code and every third-party import is pinned, and
the setuptools package list covers every folder of mdpl."""
from __future__ import annotations

import ast
import importlib.util
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [*(ROOT / "mdpl").rglob("*.py"), *(ROOT / "scripts").glob("*.py"), *(ROOT / "tests").glob("*.py"),
           ROOT / "run.py", ROOT / "make_arrow.py", ROOT / "config.py"]
#: distribution -> the modules it provides that the code imports (where the names differ).
IMPORT_NAMES = {"pytorch-lightning": {"pytorch_lightning", "lightning_fabric"}, "open-clip-torch": {"open_clip"},
                "pillow": {"PIL"}, "mlflow-skinny": {"mlflow"}}
#: used without an import statement of their own: checked separately below.
NOT_IMPORTED = {"tensorboard", "setuptools", "wandb"}


def _requirements_txt() -> dict[str, Requirement]:
    reqs = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            reqs[canonicalize_name(req.name)] = req
    return reqs


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _pyproject_requirements() -> dict[str, Requirement]:
    project = _pyproject()["project"]
    extras = project["optional-dependencies"]
    lines = project["dependencies"] + extras["test"] + extras["loggers"]
    return {canonicalize_name(r.name): r for r in map(Requirement, lines) if canonicalize_name(r.name) != "mdpl"}


def _imported_modules() -> set[str]:
    names: set[str] = set()
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def test_pyproject_ranges_admit_the_pins() -> None:
    pins, ranges = _requirements_txt(), _pyproject_requirements()
    assert set(pins) == set(ranges), "requirements.txt and pyproject.toml must list the same packages"
    for name, pin in pins.items():
        exact = [s.version for s in pin.specifier if s.operator == "=="]
        if exact:
            assert ranges[name].specifier.contains(exact[0]), f"{name}=={exact[0]} is outside {ranges[name]}"
            assert len(ranges[name].specifier) >= 1 and "==" not in str(ranges[name].specifier), name
        else:                                                    # a bound, not a pin (setuptools<81)
            assert pin.specifier == ranges[name].specifier, name


def test_every_pinned_package_is_used_and_every_import_pinned() -> None:
    pins = _requirements_txt()
    imported = _imported_modules()
    unused = [n for n in pins if n not in NOT_IMPORTED and not IMPORT_NAMES.get(n, {n}) & imported]
    assert unused == []
    local = {p.stem for p in SOURCES} | {"mdpl"}
    third_party = imported - set(sys.stdlib_module_names) - local - {"__future__"}
    unpinned = sorted(third_party - set().union(*(IMPORT_NAMES.get(n, {n}) for n in pins)))
    assert unpinned == [], f"imported but not in requirements.txt / pyproject.toml: {unpinned}"
    # not imported by name: Lightning's TensorBoardLogger / WandbLogger need tensorboard / wandb; sacred imports
    # pkg_resources
    assert "TensorBoardLogger(" in (ROOT / "mdpl" / "engine" / "trainer.py").read_text()
    assert "WandbLogger(" in (ROOT / "mdpl" / "engine" / "trainer.py").read_text()   # Lightning's, imports wandb
    sacred_deps = Path(importlib.util.find_spec("sacred").origin).parent / "dependencies.py"
    assert "import pkg_resources" in sacred_deps.read_text()


def test_setuptools_finds_every_mdpl_package() -> None:
    from setuptools import find_packages

    config = _pyproject()["tool"]["setuptools"]["packages"]["find"]
    found = set(find_packages(str(ROOT), include=config["include"]))
    folders = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "mdpl").rglob("*.py")}
    assert folders == found and {"mdpl", "mdpl.engine", "mdpl.data.writers"} <= found
    assert [p for p in (ROOT / "mdpl").rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc")] == []  # no data

"""The import arrows point one way: every module's imports, read with ``ast`` (function-level
and ``TYPE_CHECKING`` imports included), checked against the layers below.

No module is on an import circle either. A module's layer is its subpackage (one level under
``pytest_longctx``); the flat modules are the contract. The layers, lowest first, and what
each may import of the project (itself always)::

    contract   spec protocol errors rope shapes hookspec questions   nothing else of the project
    access     pytest_longctx.access.*     registry runcontrol guard contract
    facade     pytest_longctx (the package __init__)                 contract, access
    measure    pytest_longctx.measure.*                              contract, access
    session    pytest_longctx.session.*    (the pytest11 entry)      contract, access, facade, measure
    isolation  pytest_longctx.isolation.*                            ... and session
    certify    pytest_longctx.certify.*                              ... and isolation
    tools      pytest_longctx.tools.*      (console scripts)         every layer of the package, reference
    backends   pytest_longctx.backends.*   (folder backends/)        contract
    reference  pytest_longctx.reference.*  (folder reference/)       contract
    suite      pytest_longctx.conformance.* (folder conformance/)    every layer of the package but tools, reference

Backends and the suite are found at run time (backends as entry points of the group
``pytest_longctx.backends``, the suite's folder by ``find_spec``), never imported by the plugin. Importing any
submodule runs the package ``__init__`` first (the facade) and its subpackage's; those
implicit steps are not arrows. A new flat module, or a new subpackage, has no layer until
it is placed here: the test fails until it is.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Tuple

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "pytest_longctx"

CONTRACT = ("spec", "protocol", "errors", "rope", "shapes", "hookspec", "questions")
SUBPACKAGES = ("access", "measure", "session", "isolation", "certify", "tools")
PACKAGE_LAYERS = ("facade", *SUBPACKAGES)

ALLOWED: Dict[str, Tuple[str, ...]] = {
    "contract": ("contract",),
    "access": ("contract", "access"),
    "facade": ("contract", "access"),
    "measure": ("contract", "access", "measure"),
    "session": ("contract", "access", "facade", "measure", "session"),
    "isolation": ("contract", "access", "facade", "measure", "session", "isolation"),
    "certify": ("contract", "access", "facade", "measure", "session", "isolation", "certify"),
    "tools": (*PACKAGE_LAYERS, "contract", "reference"),
    "backends": ("contract", "backends"),
    "reference": ("contract", "reference"),
    "suite": ("contract", "access", "facade", "measure", "session", "isolation", "certify", "reference", "suite"),
    "unplaced": (),
}


def layer_of(module: str) -> str:
    """The layer of a project module (a dotted name under ``pytest_longctx``): its subpackage,
    or the contract for a listed flat module; anything else is "unplaced"."""
    if module == PACKAGE:
        return "facade"
    top = module.split(".")[1]
    if top in SUBPACKAGES:
        return top
    if top in ("backends", "reference"):
        return top
    if top == "conformance":
        return "suite"
    return "contract" if top in CONTRACT else "unplaced"


def folder_of(package: str, mapping: Mapping[str, str]) -> str:
    """The folder of a package as setuptools finds it: the longest mapped prefix, then the rest."""
    parts = package.split(".")
    for cut in range(len(parts), 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in mapping:
            return "/".join([mapping[prefix], *parts[cut:]])
    return "/".join(parts)


def source_modules(root: Path) -> Dict[str, Path]:
    """Dotted module name -> file, through pyproject's packages and package-dir mapping (as installed)."""
    config = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    modules: Dict[str, Path] = {}
    for package in config["packages"]:
        for path in sorted((root / folder_of(package, config["package-dir"])).glob("*.py")):
            modules[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return modules


def imports_of(module: str, source: str, known: Mapping[str, object]) -> Iterator[Tuple[int, str]]:
    """(line, project module) for every import in ``source``, at any depth of the tree."""
    is_package = module in known and str(known[module]).endswith("__init__.py")
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != PACKAGE:
                continue
            # `from pkg import sub` imports the module pkg.sub when there is one.
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known]
            for name in subs or [target]:
                yield node.lineno, name


def wrong_arrows(sources: Mapping[str, str], known: Mapping[str, object]) -> List[str]:
    """One line per import that points the wrong way, naming the module and the import."""
    wrong = []
    for module, source in sorted(sources.items()):
        here = layer_of(module)
        for line, target in imports_of(module, source, known):
            there = layer_of(target)
            if there not in ALLOWED[here]:
                wrong.append(f"{module} ({here}) line {line} imports {target} ({there}); "
                             f"{here} may import only {', '.join(ALLOWED[here])}")
    return wrong


def circles(sources: Mapping[str, str], known: Mapping[str, object]) -> List[str]:
    """"a -> b -> ... -> a" for each module on an import circle, function-level imports included
    (a lazy import that only hides a circle is a wrong arrow too)."""
    graph = {m: {t for _, t in imports_of(m, s, known) if t != m} for m, s in sources.items()}
    found = []
    for start in sorted(graph):
        stack = [(start, [start])]
        seen = set()
        while stack:
            node, path = stack.pop()
            for nxt in sorted(graph.get(node, ())):
                if nxt == start:
                    found.append(" -> ".join(path + [start]))
                    stack = []
                    break
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
    return found


def test_every_arrow_points_the_right_way() -> None:
    modules = source_modules(ROOT)
    assert len(modules) > 40 and f"{PACKAGE}.conformance.conftest" in modules  # the mapping was read
    sources = {name: path.read_text() for name, path in modules.items()}
    assert wrong_arrows(sources, modules) == []


def test_every_project_import_names_a_module_that_exists() -> None:
    """A module that moved leaves no import of its old place behind (a relative import into a
    sibling that is not there would otherwise pass as an arrow of the right layer)."""
    modules = source_modules(ROOT)
    missing = [f"{name} line {line} imports {target}"
               for name, path in sorted(modules.items())
               for line, target in imports_of(name, path.read_text(), modules) if target not in modules]
    assert missing == []


def test_no_import_circle() -> None:
    modules = source_modules(ROOT)
    assert circles({name: path.read_text() for name, path in modules.items()}, modules) == []


def test_a_circle_hidden_in_a_function_is_found() -> None:
    sources = {"pytest_longctx.session.fixtures": "def f():\n    from ..certify.finder import lengths\n",
               "pytest_longctx.certify.finder": "from ..isolation.deadline import x\n",
               "pytest_longctx.isolation.deadline": "from ..session.fixtures import get_state\n"}
    assert circles(sources, source_modules(ROOT))[0] == (
        "pytest_longctx.certify.finder -> pytest_longctx.isolation.deadline -> pytest_longctx.session.fixtures"
        " -> pytest_longctx.certify.finder")


def test_every_listed_layer_and_contract_module_exists() -> None:
    modules = source_modules(ROOT)
    missing = [name for name in (*CONTRACT, *SUBPACKAGES) if f"{PACKAGE}.{name}" not in modules]
    assert missing == []


def test_every_module_has_a_layer_and_every_subpackage_is_installed() -> None:
    """A new flat module or subpackage must be placed in a layer; a folder with an ``__init__``
    that pyproject does not list would be left out of the wheel (and of these checks)."""
    modules = source_modules(ROOT)
    assert [m for m in modules if layer_of(m) == "unplaced"] == []
    folders = sorted(p.parent.name for p in (ROOT / PACKAGE).glob("*/__init__.py"))
    assert [f for f in folders if f"{PACKAGE}.{f}" not in modules] == []
    assert layer_of(f"{PACKAGE}.helpers") == "unplaced" and ALLOWED["unplaced"] == ()


@pytest.mark.parametrize(("module", "source", "expected"), [
    ("pytest_longctx.spec", "def f():\n    from .session.fixtures import get_state\n",
     "pytest_longctx.spec (contract) line 2 imports pytest_longctx.session.fixtures (session); "
     "contract may import only contract"),
    ("pytest_longctx.access.registry", "from pytest_longctx import backends\n",
     "pytest_longctx.access.registry (access) line 1 imports pytest_longctx.backends (backends); "
     "access may import only contract, access"),
    ("pytest_longctx.session.options", "import pytest_longctx.conformance.conftest\n",
     "pytest_longctx.session.options (session) line 1 imports pytest_longctx.conformance.conftest (suite); "
     "session may import only contract, access, facade, measure, session"),
    ("pytest_longctx.measure.inputs", "if True:\n    from ..reference import apply_rope\n",
     "pytest_longctx.measure.inputs (measure) line 2 imports pytest_longctx.reference (reference); "
     "measure may import only contract, access, measure"),
    ("pytest_longctx.measure.workloads", "from ..session.settings import Settings\n",
     "pytest_longctx.measure.workloads (measure) line 1 imports pytest_longctx.session.settings (session); "
     "measure may import only contract, access, measure"),
    ("pytest_longctx.session.terminal", "from ..certify import render\n",
     "pytest_longctx.session.terminal (session) line 1 imports pytest_longctx.certify.render (certify); "
     "session may import only contract, access, facade, measure, session"),
    ("pytest_longctx.certify.writer", "from ..tools.bench import main\n",
     "pytest_longctx.certify.writer (certify) line 1 imports pytest_longctx.tools.bench (tools); "
     "certify may import only contract, access, facade, measure, session, isolation, certify"),
    ("pytest_longctx.backends.numpy_backend", "from ..session.fixtures import opened\n",
     "pytest_longctx.backends.numpy_backend (backends) line 1 imports pytest_longctx.session.fixtures (session); "
     "backends may import only contract, backends"),
    ("pytest_longctx.conformance.test_x", "from pytest_longctx.backends import numpy_backend\n",
     "pytest_longctx.conformance.test_x (suite) line 1 imports pytest_longctx.backends.numpy_backend (backends); "
     "suite may import only contract, access, facade, measure, session, isolation, certify, reference, suite"),
], ids=["contract-to-session-in-a-function", "access-to-backends", "session-to-suite", "measure-to-reference-nested",
        "measure-to-session", "session-to-certify", "certify-to-tools", "backend-to-session-relative",
        "suite-to-backend"])
def test_a_wrong_arrow_fails_naming_module_and_import(module: str, source: str, expected: str) -> None:
    known = source_modules(ROOT)
    assert wrong_arrows({module: source}, known) == [expected]


def test_a_wrong_import_written_into_a_copy_of_the_tree_is_found(tmp_path: Path) -> None:
    """The whole path, files and pyproject mapping included, on a tree with one module made wrong."""
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    for folder in ("pytest_longctx", "backends", "reference", "conformance"):
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    rope = tmp_path / "pytest_longctx" / "rope.py"
    rope.write_text(rope.read_text() + "\n\ndef _late():\n    from pytest_longctx.measure.stats import Stats\n")
    modules = source_modules(tmp_path)
    wrong = wrong_arrows({name: path.read_text() for name, path in modules.items()}, modules)
    assert len(wrong) == 1 and wrong[0].startswith("pytest_longctx.rope (contract) line ")
    assert "imports pytest_longctx.measure.stats (measure)" in wrong[0]


def test_loading_the_plugin_imports_no_backend_reference_suite_or_tool() -> None:
    """The same arrows at run time, where an importlib call would not show in the source: a
    fresh interpreter loads the plugin modules and lists what of the project it imported."""
    code = ("import importlib, sys\n"
            "import pytest_longctx.session.plugin as p\n"
            "for name in p.pytest_plugins: importlib.import_module(name)\n"
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('pytest_longctx'))))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert "pytest_longctx.session.fixtures" in out and "pytest_longctx.certify.finder" in out
    assert [m for m in out if layer_of(m) in ("backends", "reference", "suite", "tools")] == []

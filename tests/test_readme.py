"""The README stays true: its example backend is the file, and the file passes the suite."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

import pytest_longctx.conformance as conformance

ROOT = Path(__file__).resolve().parent.parent
SUITE = os.path.dirname(conformance.__file__)


def test_readme_shows_the_example_backend_verbatim() -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    example = (ROOT / "examples" / "minimal_backend.py").read_text()
    assert example in blocks


def test_readme_shows_a_shipped_profile_verbatim() -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```toml\n(.*?)```", readme, flags=re.S)
    profile = (ROOT / "pytest_longctx" / "profiles" / "7b-sim-16k-ladder.toml").read_text()
    assert profile in blocks


def test_readme_lists_every_option() -> None:
    """The options table stays true: every --longctx option the plugin adds has a row."""
    from pytest_longctx.options import OPTIONS

    readme = (ROOT / "README.md").read_text()
    names = ["backend", "profile", "report", "report-md", "report-html"] + [o.name for o in OPTIONS]
    missing = [n for n in names if f"| `--longctx-{n} " not in readme and f"| `--longctx-{n}` |" not in readme]
    assert not missing, missing


def test_readme_gives_the_two_setup_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    assert 'pip install -e ".[dev]"\npytest\n' in readme
    assert "pytest --longctx-backend=cpu\n" in readme


def test_the_example_backend_passes_the_suite(pytester: pytest.Pytester) -> None:
    pytester.syspathinsert(ROOT)
    result = pytester.runpytest(
        SUITE, "-p", "no:cacheprovider",
        "--longctx-backend=examples.minimal_backend:MinimalBackend",
        "--longctx-shape=n_layers=2,n_heads=8,n_kv_heads=2,head_dim=64,theta=10000",
        "--longctx-positions=4096",
    )
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) == 0 and outcomes.get("errors", 0) == 0, result.stdout.str()[-3000:]
    assert outcomes["passed"] >= 20

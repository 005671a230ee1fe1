"""The README stays a front door, and no link of the README or docs/ leads nowhere.

The README's examples live on the docs pages now (tests/test_docs.py pins them); what is
pinned here is the README's own promise: short, the set-up commands and the main job where a
newcomer sees them, and no reference to a file a user of the package does not have.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]
SHIPPED_TEXT = PAGES + sorted((ROOT / "pytest_longctx" / "session" / "profiles").glob("*.toml"))

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", flags=re.S | re.M)


def _links(page: Path) -> Iterator[Tuple[str, str]]:
    """(target path, anchor) of every relative link outside code blocks."""
    for target in LINK.findall(FENCE.sub("", page.read_text())):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        yield path, anchor


def _anchors(page: Path) -> List[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to '-'."""
    headings = re.findall(r"^#+ (.+)$", FENCE.sub("", page.read_text()), flags=re.M)
    return [re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings]


def test_readme_is_at_most_200_lines() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines, but should have at most 200"


def test_readme_gives_the_setup_commands_and_the_main_job_in_its_first_40_lines() -> None:
    head = "\n".join(README.read_text().splitlines()[:40]) + "\n"
    assert 'pip install -e ".[dev]"\npytest\n' in head
    assert "\npytest --longctx-backend=cpu\n" in head


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path) -> None:
    broken = []
    for path, anchor in _links(page):
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            broken.append(f"{path} (no such file)")
        elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
            broken.append(f"{path}#{anchor} (no such heading)")
    assert not broken, f"{page.relative_to(ROOT)}: {broken}"


@pytest.mark.parametrize("path", SHIPPED_TEXT, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_reference_to_a_file_users_do_not_have(path: Path) -> None:
    """Paths of folders outside the project (notes, seeds) or of someone's checkout."""
    text = path.read_text()
    found = re.findall(r"\.\./shared|shared/(?:notes|seeds)|/work/|/wt-[a-z]+/", text)
    assert not found, f"{path.relative_to(ROOT)}: {sorted(set(found))}"

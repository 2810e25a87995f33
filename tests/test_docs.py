"""The README and docs/ pages: every relative link reaches a file, every #anchor a heading."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def anchor(title: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found, fence = set(), False
    for line in page.read_text(encoding="utf-8").splitlines():
        fence ^= line.startswith("```")
        heading = None if fence else re.match(r"#+ (.*)", line)
        if heading:
            found.add(anchor(heading.group(1)))
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_resolve(page: Path) -> None:
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text(encoding="utf-8")):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        file, _, fragment = target.partition("#")
        dest = (page.parent / file) if file else page
        assert dest.exists(), f"{page.name}: {target}: no such file"
        if fragment and dest.suffix == ".md":
            assert fragment in anchors(dest), f"{page.name}: {target}: no such heading"


def test_readme_is_a_short_page_that_links_the_reference() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text) < 12_000  # the reference lives in docs/
    for needed in ("pip install", "make demo", "make test", "## Quickstart", "## Example output"):
        assert needed in text, needed
    # every docs page is reachable: linked from the README or from another page
    linked = set(re.findall(r"\]\(docs/([\w-]+\.md)", text))
    for page in PAGES[1:]:
        linked |= set(re.findall(r"\]\(([\w-]+\.md)", page.read_text(encoding="utf-8")))
    unlinked = {p.name for p in PAGES[1:]} - linked
    assert not unlinked, sorted(unlinked)
    assert "target is not met" not in text and "not met" not in text

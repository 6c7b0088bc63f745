"""Every relative link in README.md and docs/*.md points at a file of the
repository (a result file the text cites, a page, a source file), and every
``#anchor`` on a Markdown page names one of its headings."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", flags=re.S | re.M)


def relative_links(page: Path) -> list[str]:
    """The link targets of ``page`` outside code blocks that are not URLs."""
    text = FENCE.sub("", page.read_text())
    targets = [a or b for a, b in LINK.findall(text)]
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


def heading_anchors(page: Path) -> set[str]:
    """The anchors GitHub makes of a page's headings: lower case, punctuation
    other than ``-`` and ``_`` dropped, spaces made ``-``."""
    text = FENCE.sub("", page.read_text())
    anchors = set()
    for title in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


def test_the_pages_have_links() -> None:
    assert len(PAGES) > 1
    assert relative_links(REPO / "README.md")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page: Path) -> None:
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and file.suffix == ".md" and anchor not in heading_anchors(file):
            broken.append(f"{target} (no heading makes #{anchor})")
    assert not broken, f"{page.relative_to(REPO)}: " + "; ".join(broken)


def test_the_anchor_rule_matches_github(tmp_path: Path) -> None:
    """Headings of the kinds these pages use, against the anchors GitHub gives them."""
    page = tmp_path / "page.md"
    page.write_text("# 2:4 activation sparsity\n\n## `sparsetrain export`\n\n### Speed (bf16, 16k tokens) ##\n\n"
                    "```\n# not a heading\n```\n\n## Resume, DDP, Collider, MTP\n")
    assert heading_anchors(page) == {"24-activation-sparsity", "sparsetrain-export", "speed-bf16-16k-tokens",
                                     "resume-ddp-collider-mtp"}

"""Every relative link in README.md and docs/*.md reaches an existing file and heading,
and every page of docs/ is linked from the README."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# [text](target) or [text](target "title"); images too. Not inside code (stripped first).
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # http:, https:, mailto:, ...


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to ``-``."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _without_code(text: str) -> str:
    """``text`` without fenced blocks and inline code spans, where links are not links."""
    text = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.S | re.M)
    return re.sub(r"(`+)(?!`).*?(?<!`)\1(?!`)", "", text, flags=re.S)


def anchors(page: Path) -> set[str]:
    """Every anchor of ``page``'s headings; a repeated heading gets ``-1``, ``-2``, ..."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    text = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", page.read_text("utf-8"), flags=re.S | re.M)
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M):
        # Markup in a heading (`code`, **bold**, [link](x)) leaves only its text in the anchor.
        plain = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
        anchor = github_anchor(plain)
        count = seen.get(anchor, 0)
        seen[anchor] = count + 1
        found.add(anchor if count == 0 else f"{anchor}-{count}")
    return found


def links(page: Path) -> list[str]:
    """The relative link targets of ``page`` (same-page ``#anchor`` ones included)."""
    text = _without_code(page.read_text("utf-8"))
    return [t for t in LINK.findall(text) if not EXTERNAL.match(t)]


def test_github_anchor_and_duplicates(tmp_path: Path) -> None:
    assert github_anchor("Run against your Kafka") == "run-against-your-kafka"
    assert github_anchor("What to do: `control resume`") == "what-to-do-control-resume"
    page = tmp_path / "p.md"
    page.write_text("# A\n## Notes\n```\n# not a heading\n```\n## Notes\n", encoding="utf-8")
    assert anchors(page) == {"a", "notes", "notes-1"}


def test_link_extraction_skips_code_and_external_links(tmp_path: Path) -> None:
    page = tmp_path / "p.md"
    page.write_text(
        "[a](docs/a.md) [b](https://x.org/b.md) `[c](c.md)`\n```\n[d](d.md)\n```\n"
        '[e](#here "title") ![f](img/f.png)\n',
        encoding="utf-8",
    )
    assert links(page) == ["docs/a.md", "#here", "img/f.png"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for target in links(page):
        path_part, _, anchor = target.partition("#")
        file = (page.parent / path_part).resolve() if path_part else page
        if not file.exists() or ROOT not in (file, *file.parents):
            broken.append(f"{target}: no file {file}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading for #{anchor} in {file.name}")
    assert not broken, f"{page.relative_to(ROOT)}: broken links:\n  " + "\n  ".join(broken)


def test_every_docs_page_is_linked_from_the_readme() -> None:
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in links(ROOT / "README.md")}
    unlinked = [p.name for p in PAGES[1:] if p.resolve() not in linked]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"

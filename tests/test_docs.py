"""The guide and its pages: README.md stays short, and every relative link in README.md and docs/*.md resolves."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")  # [text](target); the text may span lines


def _outside_fences(text):
    """The text with fenced code blocks blanked (a link or heading inside one is code, not markdown)."""
    out, fence = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fence = not fence
            line = ""
        out.append("" if fence else line)
    return "\n".join(out)


def slug(heading):
    """GitHub's anchor of a heading: lowercase, punctuation other than '-' and '_' dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path):
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.*)$", _outside_fences(path.read_text()), re.M)}


def broken_links(path):
    """Every relative link of a markdown file whose file or #anchor does not exist, as 'target (why)'."""
    broken = []
    for target in LINK.findall(_outside_fences(path.read_text())):
        if re.match(r"(https?|mailto):", target):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.is_file():
            broken.append(f"{target} (no file {dest})")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {dest.name})")
    return broken


def test_the_readme_is_a_guide_of_at_most_300_lines():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300


def test_there_are_docs_pages():
    assert len(PAGES) > 1


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(page):
    assert broken_links(page) == []


def test_a_broken_link_or_anchor_is_caught(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## A `code` heading: with punctuation\n")
    page = tmp_path / "page.md"
    page.write_text("# Page\n\n[ok](other.md#a-code-heading-with-punctuation) [ok](#page) [web](https://x.org/y)\n"
                    "[no file](missing.md) [no anchor](other.md#nope) [no local\nanchor](#nowhere)\n"
                    "```\n[in code](not-a-link.md)\n```\n")
    assert [b.split(" (")[0] for b in broken_links(page)] == ["missing.md", "other.md#nope", "#nowhere"]


PATH_MENTION = re.compile(r"`((?:segfromxai|scripts|bench|tests|recipes)/[\w/.\-]*\.(?:py|toml|sh))`")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_file_a_page_names_exists(page):
    """A module, script or recipe named in backticks (``segfromxai/run/local.py``) is where the page says."""
    missing = sorted({p for p in PATH_MENTION.findall(page.read_text()) if not (ROOT / p).is_file()})
    assert missing == []

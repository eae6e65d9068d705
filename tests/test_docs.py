"""The README and docs/ as a reader meets them: every relative link leads somewhere, the README stays short.

A link is a markdown inline link or image (``[text](path)``, ``![alt](path#anchor)``), a reference definition
(``[name]: path``) or an HTML ``href``/``src``, outside fenced code and inline code. A relative one must name an
existing file (relative to the page), and its ``#anchor`` a heading of that file, slugged as GitHub slugs them
(a link that is only ``#anchor`` points into its own page).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import ROOT, readme_block

README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 250

FENCE = re.compile(r"^(```|~~~)")
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")
HTML_TARGET = re.compile(r"""(?:href|src)\s*=\s*["']([^"']+)["']""")
HTML_ANCHOR = re.compile(r"""<a\s+(?:name|id)\s*=\s*["']([^"']+)["']""")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
EXTERNAL = re.compile(r"^(?:[a-zA-Z][a-zA-Z0-9+.-]*:|//)")


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    out, fence = [], None
    for number, line in enumerate(text.splitlines(), 1):
        mark = FENCE.match(line.lstrip())
        if mark and (fence is None or mark.group(1) == fence):
            fence = mark.group(1) if fence is None else None
            continue
        if fence is None:
            out.append((number, line))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text lowercased, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link renders as its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").replace("*", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor a page offers: its headings' slugs (repeats numbered -1, -2, ... as GitHub does) and
    explicit ``<a id=...>``/``<a name=...>``."""
    seen: dict[str, int] = {}
    found = set()
    for _, line in prose_lines(path.read_text()):
        found.update(HTML_ANCHOR.findall(line))
        match = HEADING.match(line)
        if match:
            base = slug(match.group(2))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every link on a page, outside code."""
    out = []
    for number, line in prose_lines(path.read_text()):
        reference = REFERENCE.match(line)
        if reference:
            out.append((number, reference.group(1)))
            continue
        line = INLINE_CODE.sub("", line)
        out += [(number, target) for target in INLINE_LINK.findall(line) + HTML_TARGET.findall(line)]
    return out


def broken(path: Path) -> list[str]:
    """What is wrong with a page's relative links, one line each (empty: all resolve)."""
    problems = []
    for number, target in links(path):
        if EXTERNAL.match(target):
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        where = f"{path.relative_to(ROOT)}:{number}: {target}"
        if not dest.exists():
            problems.append(f"{where}: no such file")
        elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
            problems.append(f"{where}: no heading #{anchor} in {dest.name}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves_to_a_file_and_heading(page: Path):
    assert not broken(page), "\n".join(broken(page))


def test_the_readme_stays_short():
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES}): move detail to docs/"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(ROOT / target.partition("#")[0]).resolve() for _, target in links(README) if not EXTERNAL.match(target)}
    orphans = [p.name for p in PAGES[1:] if p.resolve() not in linked]
    assert not orphans, f"docs pages no README link leads to: {orphans}"


def test_the_readmes_tested_blocks_are_there():
    """tests/test_pipeline_dvc.py and tests/test_rehearsal.py run these blocks as written."""
    assert "dvc exp run" in readme_block("readme-commands")
    assert readme_block("readme-imagenet").startswith("CFG=configs/imagenet.yaml ")


def test_slugs_are_githubs():
    assert slug("On SLURM: `distill submit`") == "on-slurm-distill-submit"
    assert slug("Where the data lives: local paths or URLs") == "where-the-data-lives-local-paths-or-urls"
    assert slug("ImageNet, the paper's recipe") == "imagenet-the-papers-recipe"
    assert slug("`slurm`: `distill submit`") == "slurm-distill-submit"
    assert slug("uint8 across the worker_queue") == "uint8-across-the-worker_queue"
    assert slug("See [the store](store.md) now") == "see-the-store-now"


def test_a_broken_link_is_caught(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    (tmp_path / "other.md").write_text("# Other page\n\n## A part\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n[ok](other.md#a-part) [self](#page) [web](https://example.org/x.md) `[code](nowhere.md)`\n"
        "[gone](missing.md) ![img](missing.png) [bad anchor](other.md#no-part)\n\n```\n[fenced](nowhere.md)\n```\n"
        "[ref]: other.md#nope\n"
    )
    problems = broken(page)
    assert [p.split(": ", 1)[1] for p in problems] == [
        "missing.md: no such file",
        "missing.png: no such file",
        "other.md#no-part: no heading #no-part in other.md",
        "other.md#nope: no heading #nope in other.md",
    ]

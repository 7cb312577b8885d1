"""The docs hold together: every relative link and anchor resolves, every function a page names exists in
tinypeft, the index lists every page, VECTORS.md lists every golden case, and the math delimiters pair up
(an unpaired `$$` or ```math fence swallows the rest of a page on GitHub)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tinypeft.vectors import SPECS

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PAGES = [*sorted(DOCS.glob("*.md")), ROOT / "VECTORS.md", ROOT / "examples" / "port_torch" / "README.md"]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: its text without markdown, lowercased, punctuation dropped, spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {github_anchor(line.lstrip("#")) for line in page.read_text().splitlines() if line.startswith("#")}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_and_anchors_resolve(page):
    for target in LINK.findall(page.read_text()):
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        assert resolved.exists(), f"{page.name}: link to {target} goes nowhere"
        if anchor:
            assert anchor in anchors(resolved), f"{page.name}: {target}: no heading with that anchor"


def defined_names() -> set[str]:
    names = set()
    for source in (ROOT / "tinypeft").rglob("*.py"):
        text = source.read_text()
        names |= set(re.findall(r"^\s*(?:def|class) (\w+)", text, flags=re.M))
        for cls, body in re.findall(r"^class (\w+).*?:\n((?:[ \t]+.*\n|\n)*)", text, flags=re.M):
            names |= {f"{cls}.{m}" for m in re.findall(r"^    def (\w+)", body, flags=re.M)}
    return names


@pytest.mark.parametrize("page", sorted(DOCS.glob("*.md")), ids=lambda p: p.name)
def test_every_function_a_page_names_exists(page):
    known = defined_names()
    text = " ".join(page.read_text().split())  # a Functions: list may wrap
    for listed in re.findall(r"Functions:(.*?)(?:\.\s|\.$)", text):
        for name in re.findall(r"`([\w.]+)`", listed):
            if not name.endswith(".py"):
                assert name in known, f"{page.name} names {name}, which tinypeft does not define"


def test_the_index_lists_every_page():
    listed = set(LINK.findall((DOCS / "index.md").read_text()))
    for page in DOCS.glob("*.md"):
        if page.name != "index.md":
            assert page.name in listed, f"docs/index.md does not list {page.name}"


def test_vectors_md_lists_every_case():
    text = (ROOT / "VECTORS.md").read_text()
    for spec in SPECS:
        assert f"| `{spec.name}` | {spec.description} |" in text, spec.name


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_math_delimiters_pair_up(page):
    text = page.read_text()
    assert text.count("$$") % 2 == 0
    fences = re.findall(r"^```(\w*)", text, flags=re.M)
    assert len(fences) % 2 == 0, "an unclosed code fence"
    for line in text.splitlines():
        if not line.startswith(("```", "    ")):
            inline = line.replace("$$", "").replace("\\$", "")
            assert inline.count("$") % 2 == 0, f"{page.name}: an unpaired $ in: {line}"


def test_the_readme_table_of_what_peft_reads_is_the_registry_s():
    from tinypeft.methods.registry import peft_table

    text = (ROOT / "README.md").read_text()
    start = text.index("-->\n", text.index("<!-- peft-table")) + 4
    assert text[start : text.index("\n<!-- /peft-table -->")] == peft_table()
